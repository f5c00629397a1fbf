"""README.md, statement by statement: what no other test checks.

Every row of the README's flag table against the parser (the flag, both spellings, its
default, its environment variable, its YAML key, the choices and off-forms it lists); the
example command lines; the set-up script (apt-get, the venv stamp, Redis); the demo; the
systemd files; a few more claims. Each test quotes the README sentence it checks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.service.settings import Settings, SettingsError, parse_settings
from tests.setup_script import SETUP, fake_tool, source_setup

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
UNIT = ROOT / "systemd" / "vllm-deploy.service"
ENV_EXAMPLE = ROOT / "systemd" / "vllm-deploy.env.example"


@pytest.fixture(autouse=True)
def _no_site_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """These tests pass their environment explicitly; a VLLM_DEPLOY_* of the shell must not
    leak into the ones that read os.environ (the demo, the launcher)."""
    for key in [k for k in os.environ if k.startswith("VLLM_DEPLOY_") and k != "VLLM_DEPLOY_CACHE"]:
        monkeypatch.delenv(key)
    yield


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> Settings:
    """The settings for ``argv`` with only ``env`` as the environment."""
    return parse_settings(argv, dict(env or {}))


def code_block_after(heading: str) -> str:
    """The first fenced code block of README.md after the line ``heading``."""
    rest = README.split(heading, 1)[1]
    return rest.split("```", 2)[1].split("\n", 1)[1]


def command_words(block: str) -> list[str]:
    """A shell command of a code block as words (line continuations joined)."""
    return shlex.split(block.replace("\\\n", " "))


# ---------------------------------------------------------------- the flag table


@dataclass(frozen=True)
class Row:
    flag: str  # underscore spelling, without "--"
    default: str
    env: str
    meaning: str


def table_rows() -> list[Row]:
    """The rows of README.md's flag table (between its markers)."""
    table = README.split("<!-- flag-table:begin -->", 1)[1].split("<!-- flag-table:end -->", 1)[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        flag, default, env, meaning = (c.replace("\\|", "|") for c in cells)
        rows.append(Row(flag.strip("`").removeprefix("--"), default.strip("`"), env.strip("`"),
                        meaning))
    return rows


ROWS = table_rows()
ROW_IDS = [row.flag for row in ROWS]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files some flags need: a PEM CA certificate and key (openssl), a password file, a YAML."""
    from tests.test_mqtt_tls import _make_ca

    folder = tmp_path_factory.mktemp("readme-files")
    cert, key = _make_ca(folder, "ca")
    password = folder / "password"
    password.write_text("from-the-file\n")
    password.chmod(0o600)
    config = folder / "empty.yaml"
    config.write_text("{}\n")
    keys = folder / "api-keys"
    keys.write_text("first-key\nsecond-key\n")
    both = folder / "cert-and-key.pem"  # a client certificate with its key in the same file
    both.write_text(cert.read_text() + key.read_text())
    return {"ca": str(cert), "cert": str(cert), "key": str(key), "both": str(both),
            "pw": str(password), "cfg": str(config), "keys": str(keys)}


@dataclass(frozen=True)
class Sample:
    """A value other than the default for one flag: as typed, as parsed, and the flags it
    needs beside it. ``{ca}``, ``{key}`` ... name the files of the ``files`` fixture."""

    text: str
    value: Any
    companions: tuple[str, ...] = ()

    def typed(self, paths: Mapping[str, str]) -> str:
        return self.text.format(**paths)

    def expected(self, paths: Mapping[str, str]) -> Any:
        return self.value.format(**paths) if isinstance(self.value, str) else self.value

    def argv(self, paths: Mapping[str, str]) -> list[str]:
        return [word.format(**paths) for word in self.companions]


TLS = ("--mqtt_tls",)
SAMPLES: dict[str, Sample] = {
    "projects": Sample("maze driving", ("maze", "driving")),
    "model": Sample("/srv/models/Qwen2.5-7B-Instruct", "/srv/models/Qwen2.5-7B-Instruct"),
    "model_provider": Sample("modelscope", "modelscope"),
    "model_cache_dir": Sample("/srv/hf-cache", "/srv/hf-cache"),
    "model_revision": Sample("v1.0", "v1.0"),
    "auto_download": Sample("true", True),
    "quantization": Sample("awq", "awq"),
    "bnb_quant_type": Sample("fp4", "fp4"),
    "dtype": Sample("bfloat16", "bfloat16"),
    "max_model_len": Sample("8192", 8192),
    "seed": Sample("7", 7),
    "device": Sample("cpu", "cpu"),
    "visible_devices": Sample("2", "2"),
    "tensor_parallel_size": Sample("1", 1),  # the only value this engine takes
    "gpu_memory_utilization": Sample("0.95", 0.95),
    "cpu_memory_utilization": Sample("0.25", 0.25),
    "kv_cache_dtype": Sample("fp8", "fp8"),
    "block_size": Sample("32", 32),
    "num_kv_blocks": Sample("64", 64),
    "enable_prefix_caching": Sample("false", False),
    "max_num_seqs": Sample("8", 8),
    "enforce_eager": Sample("true", True),
    "max_num_batched_tokens": Sample("2048", 2048),
    "temperature": Sample("0.2", 0.2),
    "top_p": Sample("0.5", 0.5),
    "max_tokens": Sample("256", 256),
    "max_tokens_limit": Sample("1024", 1024),
    "max_history_tokens": Sample("2000", 2000),
    "skip_thinking": Sample("false", False),
    "max_concurrent_sessions": Sample("50", 50),
    "session_timeout": Sample("600", 600.0),
    "max_requests_per_session": Sample("5", 5),
    "max_requests_per_client": Sample("50", 50),
    "rate_limit_window": Sample("30", 30.0),
    "state_rate_limit": Sample("4", 4),
    "max_queue": Sample("16", 16),
    "max_payload_bytes": Sample("5000", 5000),
    "request_timeout": Sample("45", 45.0),
    "num_workers": Sample("2", 2),
    "session_store": Sample("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    "shutdown_timeout": Sample("10", 10.0),
    "mqtt_broker": Sample("mqtt.example.lan", "mqtt.example.lan"),
    "mqtt_port": Sample("8883", 8883),
    "mqtt_username": Sample("llm", "llm"),
    "mqtt_password": Sample("pw", "pw"),
    "mqtt_password_file": Sample("{pw}", "{pw}"),
    "mqtt_protocol": Sample("3.1.1", "3.1.1"),
    "mqtt_keepalive": Sample("30", 30),
    "connect_timeout": Sample("5", 5.0),
    "reconnect_max_delay": Sample("10", 10.0),
    "client_id": Sample("box-1", "box-1"),
    "session_expiry": Sample("3600", 3600),
    "mqtt_tls": Sample("true", True),
    "mqtt_ca_certs": Sample("{ca}", "{ca}", TLS),
    "mqtt_certfile": Sample("{both}", "{both}", TLS),
    "mqtt_keyfile": Sample("{key}", "{key}", (*TLS, "--mqtt_certfile", "{both}")),
    "mqtt_tls_insecure": Sample("true", True, TLS),
    "share_group": Sample("clinic1", "clinic1"),
    "control_users": Sample("operator ops.team@site", ("operator", "ops.team@site")),
    "topic_prefix": Sample("clinic1/", "clinic1/"),
    "legacy_topics": Sample("true", True),
    "legacy_project": Sample("maze", "maze"),
    "legacy_driving_project": Sample("racing", "racing"),
    "status_prefix": Sample("clinic_status", "clinic_status"),
    "agent_id": Sample("box-1", "box-1"),
    "stats_interval": Sample("0", 0.0),
    "metrics_port": Sample("9400", 9400),
    "http_port": Sample("8000", 8000),
    "http_host": Sample("0.0.0.0", "0.0.0.0", ("--api_key", "k1")),
    "served_model_name": Sample("qwen2.5-7b", "qwen2.5-7b"),
    "api_key": Sample("k1", ("k1",)),
    "api_key_file": Sample("{keys}", "{keys}"),
    "http_ssl_certfile": Sample("{cert}", "{cert}"),
    "http_ssl_keyfile": Sample("{key}", "{key}"),
    "http_cors_origins": Sample("https://portal.lab.example", ("https://portal.lab.example",)),
    "config": Sample("{cfg}", "{cfg}"),
    "log_level": Sample("DEBUG", "DEBUG"),
    "debug_log": Sample("/var/log/vllm-deploy/debug_info.log",
                        "/var/log/vllm-deploy/debug_info.log"),
    "debug_log_max_bytes": Sample("5000", 5000),
}


def value_of_cell(cell: str, like: Any) -> Any:
    """A default cell of the README table as a value of the type of ``like``."""
    if cell == "unset":
        return None
    if cell == '""':
        return ""
    if isinstance(like, bool):
        return {"true": True, "false": False}[cell]
    if isinstance(like, tuple):
        return () if cell == "none" else tuple(cell.split())
    return type(like)(cell) if isinstance(like, (int, float)) else cell


def listed_choices(meaning: str) -> list[str] | None:
    """The values a row's meaning lists in parentheses, ``(a / b / c)``; None if none."""
    found = re.findall(r"\(([^()]* / [^()]*)\)", meaning)
    return found[-1].split(" / ") if found else None


def test_the_table_has_a_row_for_every_flag_of_the_parser() -> None:
    """README: "### All flags" -- the table lists the launcher's flags, no more, no fewer."""
    from agent.service.settings import build_parser

    parser_flags = {action.dest for action in build_parser()._actions if action.dest != "help"}
    assert set(ROW_IDS) == parser_flags
    assert sorted(SAMPLES) == sorted(ROW_IDS), "add a sample value for each new row"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_each_flag_parses_in_both_spellings(row: Row, files: dict[str, str]) -> None:
    """README: "Every flag also has a dash spelling (`--max-tokens`)." """
    sample = SAMPLES[row.flag]
    for spelling in (f"--{row.flag}", "--" + row.flag.replace("_", "-")):
        settings = parse([*sample.argv(files), spelling, sample.typed(files)])
        assert getattr(settings, row.flag) == sample.expected(files), spelling
        assert settings.sources[row.flag] == "command line"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_each_default_is_the_one_in_the_table(row: Row) -> None:
    """README flag table, column "default": what a flag is when nothing sets it."""
    settings = parse([])
    value = getattr(settings, row.flag)
    assert settings.sources[row.flag] == "default"
    assert value == value_of_cell(row.default, value), f"--{row.flag}: README says {row.default}"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_each_environment_variable_sets_its_flag(row: Row, files: dict[str, str]) -> None:
    """README: "command line > environment (`VLLM_DEPLOY_<FLAG>`, e.g.
    `VLLM_DEPLOY_MAX_TOKENS=512`; an empty variable counts as unset)" and the table's
    "environment" column."""
    sample = SAMPLES[row.flag]
    assert row.env == "VLLM_DEPLOY_" + row.flag.upper()
    settings = parse(sample.argv(files), {row.env: sample.typed(files)})
    assert getattr(settings, row.flag) == sample.expected(files)
    assert settings.sources[row.flag] == "environment"
    assert parse(sample.argv(files), {row.env: ""}).sources[row.flag] == "default"


@pytest.mark.parametrize("row", [r for r in ROWS if r.flag != "config"],
                         ids=[i for i in ROW_IDS if i != "config"])
def test_each_flag_is_a_yaml_key(row: Row, files: dict[str, str], tmp_path: Path) -> None:
    """README: "`--config site.yaml` reads settings from a file whose keys are the flag
    names" (every flag but --config itself)."""
    sample = SAMPLES[row.flag]
    value = sample.expected(files)
    config = tmp_path / "site.yaml"
    typed = list(value) if isinstance(value, tuple) else value
    config.write_text(yaml.safe_dump({row.flag: typed}))
    settings = parse([*sample.argv(files), "--config", str(config)])
    assert getattr(settings, row.flag) == value
    assert settings.sources[row.flag] == "config file"


CHOICE_ROWS = [r for r in ROWS if listed_choices(r.meaning)]


@pytest.mark.parametrize("row", CHOICE_ROWS, ids=[r.flag for r in CHOICE_ROWS])
def test_the_listed_choices_are_exactly_what_the_flag_takes(row: Row) -> None:
    """README flag table: a meaning that ends "(a / b / c)" lists the values the flag takes."""
    choices = listed_choices(row.meaning) or []
    for choice in choices:
        assert parse([f"--{row.flag}", choice]).sources[row.flag] == "command line"
    with pytest.raises(SettingsError, match="must be one of") as refused:
        parse([f"--{row.flag}", "no-such-choice"])
    accepted = str(refused.value).split("must be one of ", 1)[1].split(", got", 1)[0]
    assert accepted.split(", ") == choices


BOOL_ROWS = [r for r in ROWS if r.default in ("true", "false")]


@pytest.mark.parametrize("row", BOOL_ROWS, ids=[r.flag for r in BOOL_ROWS])
def test_each_boolean_takes_every_form(row: Row, files: dict[str, str]) -> None:
    """README: "Booleans take `--skip_thinking`, `--skip_thinking false` (true/false, 1/0,
    yes/no) or `--no-skip_thinking`", and the table's "`--X false` or `--no-X` turns it off"."""
    assert f"`--{row.flag} false` or `--no-{row.flag}` turns it off" in row.meaning
    argv = SAMPLES[row.flag].argv(files)
    forms = {(f"--{row.flag}",): True, (f"--no-{row.flag}",): False}
    forms |= {(f"--{row.flag}", word): word in ("true", "1", "yes")
              for word in ("true", "false", "1", "0", "yes", "no")}
    for form, expected in forms.items():
        assert getattr(parse([*argv, *form]), row.flag) is expected, form


def test_block_size_takes_the_listed_sizes_only() -> None:
    """README flag table: "`--block_size` ... tokens per KV-cache block (8, 16, 32, 64 or 128)"."""
    for size in (8, 16, 32, 64, 128):
        assert parse(["--block_size", str(size)]).engine_config("/m").block_size == size
    for size in (4, 24, 256):
        with pytest.raises(SettingsError):
            parse(["--block_size", str(size)])


def test_default_cuda_graph_batch_sizes() -> None:
    """README flag table: "`--enforce_eager` ... decode steps on a GPU replay CUDA graphs
    captured for batch sizes 1, 2, 4, 8, then every 16 up to --max_num_seqs"."""
    from engine.cuda_graphs import graph_batch_sizes

    assert graph_batch_sizes(parse([]).max_num_seqs) == [1, 2, 4, 8, 16, 32]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]


# ---------------------------------------------------------------- example command lines


def test_the_running_it_for_real_example_parses(files: dict[str, str]) -> None:
    """README "Running it for real": `.venv/bin/python vLLMDeploy.py --projects maze driving
    bloodcell --model /srv/models/Qwen2.5-7B-Instruct --mqtt_broker mqtt.example.lan
    --mqtt_username llm --mqtt_password_file /etc/vllm-deploy/mqtt-password`."""
    words = command_words(code_block_after("## Running it for real"))
    assert words[:2] == [".venv/bin/python", "vLLMDeploy.py"]
    argv = [files["pw"] if w == "/etc/vllm-deploy/mqtt-password" else w for w in words[2:]]
    settings = parse(argv)
    assert settings.projects == ("maze", "driving", "bloodcell")
    assert settings.model == "/srv/models/Qwen2.5-7B-Instruct"
    agent = settings.agent_config()
    assert (agent.mqtt_broker, agent.mqtt_username, agent.mqtt_password) == \
        ("mqtt.example.lan", "llm", "from-the-file")


def old_script_command(files: Mapping[str, str]) -> list[str]:
    """How the old vLLM-based script was started (the task's product line)."""
    return ["--model", "/srv/models/Qwen2.5-7B-Instruct-AWQ", "--projects",
            "maze driving bloodcell", "--quantization", "awq", "--visible_devices", "2",
            "--max_tokens", "256", "--max_history_tokens", "2000",
            "--gpu_memory_utilization", "0.95", "--mqtt_username", "U",
            "--mqtt_password_file", files["pw"]]


def test_the_old_scripts_command_line_keeps_its_meaning(files: dict[str, str]) -> None:
    """README: "`vLLMDeploy.py` keeps the old script's flags." """
    settings = parse(old_script_command(files))
    engine = settings.engine_config("/m")
    agent = settings.agent_config()
    assert settings.projects == agent.projects == ("maze", "driving", "bloodcell")
    assert (engine.quantization, engine.gpu_memory_utilization) == ("awq", 0.95)
    assert (agent.max_tokens, agent.max_history_tokens) == (256, 2000)
    assert (agent.mqtt_username, agent.mqtt_password) == ("U", "from-the-file")
    assert settings.visible_devices == "2"


def test_the_launcher_takes_the_old_command_line_and_pins_the_gpu(files: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """README: "`--visible_devices 1` sets `CUDA_VISIBLE_DEVICES` before torch starts; an
    index that does not exist is an error at start" -- the old command line gets past the
    settings; here it stops at the GPU check (no GPU 2) or at the model folder."""
    argv = old_script_command(files)
    argv[1] = str(tmp_path / "no-model")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_DEPLOY_") and k != "CUDA_VISIBLE_DEVICES"}
    result = subprocess.run([sys.executable, str(ROOT / "vLLMDeploy.py"), *argv], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert "CUDA_VISIBLE_DEVICES=2" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "no such CUDA GPU" in errors[0] or "does not exist" in errors[0], errors[0]


def test_update_readme_command_leaves_the_readme_as_it_is(tmp_path: Path) -> None:
    """README: "Generated from `agent/service/settings_table.py` (`python -m agent.service.settings
    --update-readme README.md`)" -- the command rewrites the table to what the README holds."""
    from agent.service.settings import main

    copy = tmp_path / "README.md"
    copy.write_text(README, encoding="utf-8")
    assert main(["--update-readme", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == README


def test_the_quantize_example_and_its_options() -> None:
    """README: "`.venv/bin/python -m engine.quantize --model ./Qwen2.5-7B-Instruct --output
    ./Qwen2.5-7B-AWQ --method awq --bits 4 --group_size 128 [--calibration texts.txt]`" and
    "`--method awq|gptq|fp8|int8` ... GPTQ with ... `--act_order`, `--algorithm rtn` as the
    simple baseline"."""
    from engine.quantize.__main__ import build_parser

    words = command_words(code_block_after("To quantize a model on the box:").replace("[", "")
                          .replace("]", ""))
    assert words[:3] == [".venv/bin/python", "-m", "engine.quantize"]
    parser = build_parser()
    args = parser.parse_args(words[3:])
    assert (args.method, args.bits, args.group_size, args.calibration) == \
        ("awq", 4, 128, "texts.txt")
    method = next(a for a in parser._actions if a.dest == "method")
    assert set(method.choices) == {"awq", "gptq", "fp8", "int8", "gguf"}  # "--method gguf ..."
    more = parser.parse_args([*words[3:9], "--method", "gptq", "--act_order", "--algorithm", "rtn"])
    assert more.act_order and more.algorithm == "rtn"


# ---------------------------------------------------------------- quantization


def test_the_quantization_list_is_the_engines() -> None:
    """README: "`--quantization` unset (or `none`/`auto`) serves what the checkpoint says" and
    the table's list (none / auto / awq / gptq / squeezellm / fp8 / int8 / bitsandbytes /
    compressed-tensors): every method in it is one the engine has, and the reverse."""
    from engine.quantization import method_names, normalise_method

    listed = listed_choices(next(r for r in ROWS if r.flag == "quantization").meaning) or []
    for value in ("none", "auto"):
        assert parse(["--quantization", value]).quantization is None
    methods = {normalise_method(v) for v in listed} - {None}
    assert methods == set(method_names())


def quantized_checkpoint(folder: Path, method: str) -> dict:
    """A config.json that declares ``method`` (no weights: only the declaration is read)."""
    declared = {"quant_method": method, "bits": 4, "group_size": 128, "zero_point": True,
                "version": "gemm"}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": declared}))
    return declared


def test_a_flag_that_names_another_format_is_refused(tmp_path: Path) -> None:
    """README: "A flag that contradicts the checkpoint is refused with the fix"."""
    from engine.quantization import QuantFormatError, resolve

    declared = quantized_checkpoint(tmp_path / "awq", "awq")
    with pytest.raises(QuantFormatError, match="use --quantization awq"):
        resolve("gptq", tmp_path / "awq", declared, {})


def test_compressed_tensors_on_another_format_or_a_plain_model_is_refused(tmp_path: Path) -> None:
    """README: "A flag that contradicts the checkpoint is refused with the fix" (the flag
    --quantization compressed-tensors on an AutoAWQ checkpoint, and on a plain model)."""
    from engine.quantization import QuantFormatError, resolve

    declared = quantized_checkpoint(tmp_path / "awq", "awq")
    with pytest.raises(QuantFormatError, match="contradicts the checkpoint.*--quantization awq"):
        resolve("compressed-tensors", tmp_path / "awq", declared, {})
    (tmp_path / "plain").mkdir()
    with pytest.raises(QuantFormatError, match="not quantized.*fp8 or int8"):
        resolve("compressed-tensors", tmp_path / "plain", None, {})


def test_compressed_tensors_on_its_own_format_is_served(tmp_path: Path) -> None:
    """--quantization compressed-tensors on a compressed-tensors checkpoint: its config tells
    fp8 from int8."""
    from engine.quantization import resolve
    from tests.quant_checkpoints import ct_checkpoint

    for kind, method in (("float", "fp8"), ("int", "int8")):
        path = ct_checkpoint(tmp_path / kind, kind, "channel", True)
        declared = json.loads((path / "config.json").read_text())["quantization_config"]
        assert resolve("compressed-tensors", path, declared, {}).name == method


# ---------------------------------------------------------------- scripts/setup.sh


def test_setup_installs_a_missing_package_with_apt_get_as_root(tmp_path: Path) -> None:
    """README: "installs `python3-venv` and `mosquitto` with apt-get where they are missing
    (as root, or with password-less sudo; ...)"."""
    calls = tmp_path / "calls"
    fake_tool(tmp_path / "bin", "id", "echo 0")
    fake_tool(tmp_path / "bin", "apt-get", f'echo "$@" >> {calls}')
    result = source_setup("apt_install mosquitto", tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert "install -y -qq mosquitto" in calls.read_text()


def test_setup_without_root_or_sudo_prints_the_command(tmp_path: Path) -> None:
    """README: "(as root, or with password-less sudo; otherwise it prints the command to run)"."""
    calls = tmp_path / "calls"
    fake_tool(tmp_path / "bin", "id", "echo 1000")
    fake_tool(tmp_path / "bin", "sudo", "exit 1")  # a password would be needed
    fake_tool(tmp_path / "bin", "apt-get", f'echo "$@" >> {calls}')
    result = source_setup("apt_install mosquitto", tmp_path / "bin")
    assert result.returncode != 0 and not calls.exists()
    assert "run: sudo apt-get install -y mosquitto" in result.stderr


def test_requirements_dev_includes_the_runtime_and_the_test_oracles() -> None:
    """README: "`requirements-dev.txt` (which includes `requirements.txt`, plus the test
    oracles compressed-tensors and AutoAWQ's packing code ...)" -- AutoAWQ comes from
    scripts/setup.sh (`--no-deps` cannot be said in a requirements file)."""
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in lines
    assert any(line.startswith("compressed-tensors") for line in lines)
    assert 'AUTOAWQ_PIN="autoawq==' in SETUP.read_text()


def test_setup_starts_a_redis_that_keeps_nothing_on_disk(tmp_path: Path) -> None:
    """README: "`run_tests.sh` also needs a Redis on 127.0.0.1:6379 ...: it installs
    `redis-server` where missing and starts one (keeping nothing on disk) when none
    answers"."""
    calls, started = tmp_path / "calls", tmp_path / "started"
    record = f"printf '%s\\n' \"$@\" >> {calls}; touch {started}"  # one argument a line
    fake_tool(tmp_path / "bin", "redis-server", record)
    # "does one answer on 127.0.0.1:6379?": no until the fake redis-server ran
    fake_tool(tmp_path / "venv" / "bin", "python", f"test -e {started}")
    result = source_setup(f"VENV={shlex.quote(str(tmp_path / 'venv'))}; ensure_redis",
                          tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    args = calls.read_text().split("\n")
    assert args[args.index("--bind") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "6379"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    again = source_setup(f"VENV={shlex.quote(str(tmp_path / 'venv'))}; ensure_redis",
                         tmp_path / "bin")
    assert again.returncode == 0 and calls.read_text().split("\n") == args  # one answers


def test_run_tests_passes_arguments_to_pytest_and_fails_when_no_test_ran() -> None:
    """README: "`./run_tests.sh` ... (pytest arguments pass through: ./run_tests.sh -k settings
    -x)" and "a run in which no test ran fails (pytest's exit code 5 is not a success). CI runs
    `.ci/run`, which runs `./run_tests.sh`." (read, not run: the script sets the machine up)"""
    script = (ROOT / "run_tests.sh").read_text()
    assert '.venv/bin/python -m pytest "$@"' in script
    assert re.search(r'if \[ "\$status" -eq 5 \]; then\n(.*\n)*?\s*exit 1\n', script)
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK) and "./run_tests.sh" in ci.read_text().splitlines()[-1]


# ---------------------------------------------------------------- the demo


class Launched(Exception):
    """Raised in place of starting the agent: what the demo would have run."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        super().__init__(command)
        self.command, self.env = command, env


def test_the_demo_starts_the_agent_with_every_project_on_the_cpu_under_its_own_prefix(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README: "starts `vLLMDeploy.py` with every shipped project on the CPU under a topic
    prefix of its own (so it never meets a real deployment on the same broker)"."""
    from agent.demo import run as demo

    def launch(command: list[str], **kw: Any) -> None:
        raise Launched(command, kw["env"])

    monkeypatch.setattr(demo, "broker_answers", lambda *a, **kw: True)
    monkeypatch.setattr(demo.subprocess, "Popen", launch)
    with pytest.raises(Launched) as launched:
        demo.main(["--model", str(tmp_path)])
    command = launched.value.command
    assert command[1] == str(ROOT / "vLLMDeploy.py")
    settings = parse(command[2:])
    shipped = tuple(sorted(p.stem for p in (ROOT / "projects").glob("*.yaml")))
    assert tuple(sorted(settings.projects)) == shipped
    assert settings.device == "cpu" and settings.model == str(tmp_path)
    assert settings.topic_prefix.startswith("vllm-deploy-demo-")
    flags_in_env = [k for k in launched.value.env if k.startswith("VLLM_DEPLOY_")]
    assert flags_in_env in ([], ["VLLM_DEPLOY_CACHE"])  # the demo model's cache only


def test_the_demos_private_mosquitto_is_stopped_at_the_end(tmp_path: Path) -> None:
    """README: "it uses the system Mosquitto if one answers on localhost:1883 (else it starts
    a private one on a free port and stops it at the end)"."""
    from agent.demo.run import broker_answers, start_mosquitto

    with ExitStack() as stack:
        port = start_mosquitto(stack, tmp_path)
        assert port != 1883 and broker_answers("127.0.0.1", port)
    assert not broker_answers("127.0.0.1", port, timeout=0.5)


@pytest.mark.integration
def test_the_demo_sends_a_reply_topic_at_the_projects_sampling_and_times_the_reply(
        broker: Any) -> None:
    """README: "sends one prompt per project with a `replyTopic` at the project's own
    sampling settings, prints each reply with its round-trip time"."""
    from agent.demo.run import DemoClient
    from tests.mqtt_broker import Recorder

    with Recorder(broker, "demo-x/+/user_input") as agent:
        client = DemoClient(broker.host, broker.port, "demo-x/")
        answer: list[tuple[str | None, float]] = []
        asking = threading.Thread(target=lambda: answer.append(client.ask("maze", "hi", 10)))
        asking.start()
        request = json.loads(agent.wait_for(1, "demo-x/maze/user_input")[0])
        agent.publish(request["replyTopic"], "the reply")
        asking.join(15)
        client.close()
    assert request["replyTopic"].startswith("demo-x/maze/assistant_response/")
    assert not {"temperature", "topP", "maxTokens"} & set(request)  # the project's own
    reply, seconds = answer[0]
    assert reply == "the reply" and 0 < seconds < 10


def test_the_demo_prints_each_reply_with_its_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    """README: "prints each reply with its round-trip time"."""
    from agent.demo.run import print_table

    print_table([("maze", "Where now?", "42 ms", '{"hint": "go left"}'),
                 ("driving", "Hi", "timeout", None)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["maze", ">", "Where", "now?"]
    assert out[1].split() == ["<", '{"hint":', '"go', 'left"}', "(42", "ms)"]
    assert "(no reply)" in out[3] and "(timeout)" in out[3]


def test_the_demo_stops_the_agent_with_sigterm() -> None:
    """README: "and stops the agent with SIGTERM"."""
    from agent.demo.run import stop_process

    child = subprocess.Popen(["sleep", "30"])
    stop_process(child, "the agent", 5.0)
    assert child.returncode == -signal.SIGTERM


def test_the_demo_model_is_built_into_dot_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "builds the tiny demo model once into `.cache/`" and its options "`./run_demo.sh
    --model /path/to/model-folder`; `--random-model` uses the tiny random checkpoint"."""
    from agent.demo import run as demo
    from agent.demo.tiny_checkpoint import _default_cache_root

    monkeypatch.delenv("VLLM_DEPLOY_CACHE", raising=False)
    assert _default_cache_root().parent == ROOT / ".cache"
    with pytest.raises(SystemExit):
        demo.main(["--model", "m", "--random-model"])  # one or the other


def test_the_random_models_empty_answer_text() -> None:
    """README: "(gibberish, now and then `Error: the model returned an empty answer`)"."""
    from agent.core.reasoning import EMPTY_ANSWER

    assert EMPTY_ANSWER == "Error: the model returned an empty answer"


# ---------------------------------------------------------------- projects, models, MQTT


def test_a_project_without_a_file_gets_the_generic_assistant_and_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """README: "a project without a file in `projects/` gets the generic assistant and a
    warning"."""
    from projects import load_project

    with caplog.at_level(logging.WARNING, logger="projects"):
        spec = load_project("no_such_project")
    assert spec.name == "no_such_project"
    assert spec.system_prompt == load_project("general").system_prompt
    assert any("no_such_project" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_the_aliases_the_readme_names_exist() -> None:
    """README: "or an alias (`qwq-32b`, `qwen2.5-7b-instruct`, `llama-3.1-8b-instruct`, ...;
    see `engine/model_source.py`)"."""
    from engine.model_source import ALIASES

    assert {"qwq-32b", "qwen2.5-7b-instruct", "llama-3.1-8b-instruct"} <= set(ALIASES)


def read_connect_packet(server: socket.socket, into: list[bytes]) -> None:
    """Accepts one connection and keeps the MQTT CONNECT packet it sends."""
    conn, _ = server.accept()
    with conn:
        data = b""
        while len(data) < 2 or len(data) < packet_length(data):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        into.append(data)


def packet_length(data: bytes) -> int:
    """The whole length of the MQTT packet that ``data`` starts with (a large number while
    its length field is incomplete)."""
    length, shift = 0, 0
    for i, byte in enumerate(data[1:5], start=1):
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return 1 + i + length
    return 1 << 30


def connect_properties(packet: bytes) -> tuple[int, dict[int, bytes]]:
    """An MQTT 5 CONNECT packet's connect flags and its properties (id -> raw value)."""
    header = 1 + next(i for i in range(1, 5) if not packet[i] & 0x80)
    flags = packet[header + 7]  # after the protocol name (6 bytes) and level (1)
    at = header + 10  # after the keep-alive
    length, size = packet[at], 1  # the properties here fit a one-byte length
    sizes = {0x11: 4, 0x21: 2, 0x22: 2, 0x27: 4, 0x19: 1, 0x17: 1}
    props, i = {}, at + size
    while i < at + size + length:
        prop = packet[i]
        props[prop] = packet[i + 1:i + 1 + sizes[prop]]
        i += 1 + sizes[prop]
    return flags, props


@pytest.mark.parametrize(("max_queue", "asked"), [("40", 40), ("100000", 65535)])
def test_mqtt5_connect_asks_for_max_queue_and_a_persistent_session(max_queue: str,
                                                                   asked: int) -> None:
    """README: "The agent keeps a persistent session (`--agent_id` gives a stable client id)
    ... On MQTT 5 the agent asks for `--max_queue` (Receive Maximum)" (at most 65535)."""
    from agent.mqtt.client import MqttClient

    with socket.create_server(("127.0.0.1", 0)) as server:
        packets: list[bytes] = []
        reader = threading.Thread(target=read_connect_packet, args=(server, packets), daemon=True)
        reader.start()
        settings = parse(["--mqtt_broker", "127.0.0.1", "--mqtt_port",
                          str(server.getsockname()[1]), "--agent_id", "box-7",
                          "--mqtt_protocol", "5", "--max_queue", max_queue])
        client = MqttClient(settings.agent_config(), ["general/user_input"], lambda *a: None)
        client.start(wait=False)
        reader.join(10)
        client.stop(flush_timeout=0)
    flags, props = connect_properties(packets[0])
    assert int.from_bytes(props[0x21], "big") == asked  # Receive Maximum
    assert int.from_bytes(props[0x11], "big") == 86400  # Session Expiry: --session_expiry
    assert not flags & 0x02  # clean start off: the session is resumed
    assert b"vllm-deploy-box-7" in packets[0]


# ---------------------------------------------------------------- systemd


def unit() -> dict[str, list[str]]:
    from tests.test_systemd import unit_settings

    return unit_settings()


def test_the_unit_writes_only_its_var_folders() -> None:
    """README: "hardened (read-only system, writable only `/var/lib`, `/var/cache` and
    `/var/log/vllm-deploy`, ...)"."""
    settings = unit()
    assert settings["ProtectSystem"] == ["strict"] and settings["ProtectHome"] == ["yes"]
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert settings[key] == ["vllm-deploy"], key
    assert "ReadWritePaths" not in settings and "ReadWriteDirectories" not in settings


def test_the_unit_allows_nvidia_devices_only() -> None:
    """README: "hardened (..., NVIDIA devices only)"."""
    settings = unit()
    assert settings["DevicePolicy"] == ["closed"]
    assert settings["DeviceAllow"] and all("nvidia" in d for d in settings["DeviceAllow"])
    assert settings["User"] == ["vllm-deploy"]


def test_the_watchdog_is_60_seconds() -> None:
    """README: "`WATCHDOG=1` every `WatchdogSec`/2 (60 s)" -- WatchdogSec=60 in the unit."""
    assert unit()["WatchdogSec"] == ["60"]


def test_install_lists_its_options() -> None:
    """README: "`sudo systemd/install.sh` (`--prefix DIR`, default `/opt/vllm-deploy`;
    `--no-start`; `--root DIR` installs only the files, under DIR)"."""
    result = subprocess.run(["bash", str(ROOT / "systemd" / "install.sh"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--prefix DIR", "--no-start", "--root DIR"):
        assert option in result.stdout, option
    assert "PREFIX=/opt/vllm-deploy" in (ROOT / "systemd" / "install.sh").read_text()


def test_install_starts_the_service_except_on_a_first_installation() -> None:
    """README: "then enables the service and starts it, except on a first installation: the
    new env file is to be edited first (model, broker, credentials), then `systemctl start
    vllm-deploy`." (read, not run: a real installation needs root and systemd)"""
    script = (ROOT / "systemd" / "install.sh").read_text()
    after_enable = script.split('systemctl enable "$NAME.service"', 1)[1]
    fresh = after_enable.split('elif [ "$FRESH_ENV" = 1 ]; then', 1)[1].split("else", 1)
    assert "systemctl start" in fresh[0] and "edit" in fresh[0] and "restart" not in fresh[0]
    assert 'systemctl restart "$NAME.service"' in fresh[1].split("fi", 1)[0]


def test_the_env_example_names_flags_only() -> None:
    """README: "(from `systemd/vllm-deploy.env.example`: the usual flags as
    `VLLM_DEPLOY_<FLAG>`, and any other flag can be added the same way; the password best via
    `VLLM_DEPLOY_MQTT_PASSWORD_FILE`)"."""
    text = ENV_EXAMPLE.read_text()
    named = set(re.findall(r"^#?(VLLM_DEPLOY_\w+)=", text, flags=re.MULTILINE))
    assert "VLLM_DEPLOY_MQTT_PASSWORD_FILE" in named
    assert named <= {row.env for row in ROWS}


# ---------------------------------------------------------------- files the README names


def layout_paths() -> list[str]:
    """The files and folders of README's "## Layout" block, relative to the repository."""
    paths = []
    folder = ""
    for line in code_block_after("## Layout").splitlines():
        first = line.split()[0] if line.strip() and not line.startswith(" ") else None
        if first:
            folder = first if first.endswith("/") else ""
            paths.append(first)
        for name in re.findall(r"[\w*]+(?:/[\w*]+)*\.(?:py|md|yaml)|\b\w+/(?=\s|\)|$)",
                               line.split(None, 1)[1] if first else line):
            paths.append(name if "/" in name.rstrip("/") else folder + name)
    return paths


def test_the_layout_names_files_that_exist() -> None:
    """README "## Layout": every file and folder it names is there."""
    paths = layout_paths()
    assert len(paths) > 20
    missing = [p for p in paths if not list(ROOT.glob(p.rstrip("/")))]
    assert not missing


def test_protocol_md_travels_with_the_code() -> None:
    """README: "[docs/PROTOCOL.md](docs/PROTOCOL.md), called PROTOCOL.md below": the
    project's own copy is there and install.sh copies it. (The shared page it started from
    now says the project keeps the current version, so the two may differ.)"""
    assert "[docs/PROTOCOL.md](docs/PROTOCOL.md), called PROTOCOL.md below" in README
    copy = (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert "## A. Chat" in copy and "## Guarantees" in copy
    assert re.search(r"PAYLOAD=\([^)]*\bdocs\b", (ROOT / "systemd" / "install.sh").read_text())
