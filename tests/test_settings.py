"""Settings: old flags, spellings, bool forms, precedence, YAML checks, unsupported values."""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from agent.mqtt.status import AgentInfo
from agent.service.config import AgentConfig
from agent.service.settings import Settings, SettingsError, build_parser, parse_settings
from agent.service.settings_table import FLAGS, default_yaml, markdown_table, readme_table

ROOT = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}


def parse(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return parse_settings(list(argv), env if env is not None else NO_ENV)


# Every flag of the old script: command line -> setting, same name and meaning.
OLD_FLAGS = [
    (["--projects", "maze", "driving"], "projects", ("maze", "driving")),
    (["--model", "Qwen/QwQ-32B"], "model", "Qwen/QwQ-32B"),
    (["--quantization", "None"], "quantization", None),
    (["--visible_devices", "0,1"], "visible_devices", "0,1"),
    (["--gpu_memory_utilization", "0.85"], "gpu_memory_utilization", 0.85),
    (["--max_model_len", "8192"], "max_model_len", 8192),
    (["--tensor_parallel_size", "1"], "tensor_parallel_size", 1),
    (["--temperature", "0.7"], "temperature", 0.7),
    (["--top_p", "0.95"], "top_p", 0.95),
    (["--max_tokens", "1024"], "max_tokens", 1024),
    (["--max_history_tokens", "1500"], "max_history_tokens", 1500),
    (["--max_concurrent_sessions", "50"], "max_concurrent_sessions", 50),
    (["--mqtt_broker", "broker.example"], "mqtt_broker", "broker.example"),
    (["--mqtt_port", "8883"], "mqtt_port", 8883),
    (["--mqtt_username", "TangClinic"], "mqtt_username", "TangClinic"),
    (["--mqtt_password", "pw"], "mqtt_password", "pw"),
    (["--num_workers", "8"], "num_workers", 8),
    (["--skip_thinking", "False"], "skip_thinking", False),
    (["--model_provider", "modelscope"], "model_provider", "modelscope"),
    (["--model_cache_dir", "/models"], "model_cache_dir", "/models"),
    (["--model_revision", "v1.0"], "model_revision", "v1.0"),
    (["--auto_download"], "auto_download", True),
]


@pytest.mark.parametrize("argv, name, expected", OLD_FLAGS, ids=[a[0] for a, _, _ in OLD_FLAGS])
def test_old_flags_keep_name_and_meaning(argv: list[str], name: str, expected: object) -> None:
    settings = parse(*argv)
    assert getattr(settings, name) == expected
    assert settings.sources[name] == "command line"
    dashed = [argv[0].replace("_", "-"), *argv[1:]]
    assert getattr(parse(*dashed), name) == expected


def test_every_flag_has_both_spellings() -> None:
    for flag in FLAGS:
        options = build_parser()._option_string_actions
        assert "--" + flag.name in options and "--" + flag.name.replace("_", "-") in options


@pytest.mark.parametrize("argv, expected", [
    (["--skip_thinking"], True), (["--skip-thinking"], True),
    (["--skip_thinking", "False"], False), (["--skip_thinking", "false"], False),
    (["--skip_thinking", "True"], True), (["--skip_thinking", "true"], True),
    (["--skip_thinking", "0"], False), (["--skip_thinking", "1"], True),
    (["--skip_thinking", "no"], False), (["--skip_thinking", "yes"], True),
    (["--skip_thinking=false"], False), (["--no-skip_thinking"], False),
    (["--no-skip-thinking"], False), (["--noskip_thinking"], False), ([], True),
])
def test_bool_forms(argv: list[str], expected: bool) -> None:
    assert parse(*argv).skip_thinking is expected


def test_bad_bool_is_an_error() -> None:
    with pytest.raises(SettingsError, match="--skip_thinking must be true or false"):
        parse("--skip_thinking", "maybe")


@pytest.mark.parametrize("argv", [["maze", "driving"], ["maze driving"], ["maze,driving"],
                                  ["maze,", "driving"]])
def test_projects_forms(argv: list[str]) -> None:
    assert parse("--projects", *argv).projects == ("maze", "driving")


def test_projects_from_env_and_yaml(tmp_path: Path) -> None:
    assert parse(env={"VLLM_DEPLOY_PROJECTS": "maze racing"}).projects == ("maze", "racing")
    config = tmp_path / "c.yaml"
    config.write_text("projects: [maze, bloodcell]\n")
    assert parse("--config", str(config)).projects == ("maze", "bloodcell")


def test_precedence_cli_env_yaml_default(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text("max_tokens: 100\nmqtt_port: 1884\n")
    env = {"VLLM_DEPLOY_MAX_TOKENS": "200"}
    assert parse().max_tokens == 512 and parse().sources["max_tokens"] == "default"
    assert parse("--config", str(config)).max_tokens == 100
    both = parse("--config", str(config), env=env)
    assert (both.max_tokens, both.sources["max_tokens"]) == (200, "environment")
    assert (both.mqtt_port, both.sources["mqtt_port"]) == (1884, "config file")
    top = parse("--config", str(config), "--max_tokens", "300", env=env)
    assert (top.max_tokens, top.sources["max_tokens"]) == (300, "command line")


def test_config_from_env_and_empty_env_is_unset(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text("mqtt_broker: from-yaml\n")
    env = {"VLLM_DEPLOY_CONFIG": str(config), "VLLM_DEPLOY_MQTT_BROKER": ""}
    assert parse(env=env).mqtt_broker == "from-yaml"


def test_yaml_values_typed(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("mqtt_protocol: 5\nvisible_devices: 0\nskip_thinking: no\n"
                      "max_model_len: null\ntemperature: 1\n")
    s = parse("--config", str(config))
    assert (s.mqtt_protocol, s.visible_devices, s.skip_thinking) == ("5", "0", False)
    assert s.max_model_len is None and s.temperature == 1.0


def test_unknown_yaml_key_lists_valid_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("mqtt_pot: 1884\n")
    with pytest.raises(SettingsError) as err:
        parse("--config", str(config))
    message = str(err.value)
    assert "'mqtt_pot'" in message and "did you mean 'mqtt_port'" in message
    assert "valid keys:" in message and "max_tokens" in message and "\n" not in message


@pytest.mark.parametrize("text, match", [
    ("mqtt_port: abc\n", "--mqtt_port must be an integer"),
    ("max_tokens: true\n", "--max_tokens must be a integer|--max_tokens must be an integer"),
    ("skip_thinking: maybe\n", "--skip_thinking must be true or false"),
    ("projects: 5\n", "--projects must be names"),
    ("temperature: [1]\n", "--temperature must be a number"),
    ("device: tpu\n", "--device must be one of auto, cuda, cpu"),
    ("top_p: 1.5\n", "--top_p must be <= 1"),
    ("- a list\n", "must hold a mapping"),
    ("a: [\n", "cannot be read as YAML"),
])
def test_wrong_yaml_values(tmp_path: Path, text: str, match: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=match) as err:
        parse("--config", str(config))
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        parse("--config", str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("argv, match", [
    (["--tensor_parallel_size", "2"], "this engine runs a model on one GPU; use --tensor_parallel_size 1"),
    (["--quantization", "q4_k"], "--quantization must be one of none, auto, awq, gptq"),
    (["--bnb_quant_type", "nf8"], "--bnb_quant_type must be one of nf4, fp4, int8"),
    (["--kv_cache_dtype", "int4"], "--kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    (["--block_size", "12"], "block_size must be 8, 16, 32, 64 or 128, got 12"),
    (["--block_size", "4"], "--block_size must be >= 8"),
    (["--num_kv_blocks", "0"], "--num_kv_blocks must be >= 1"),
    (["--cpu_memory_utilization", "0"], "--cpu_memory_utilization must be >= 0.01"),
    (["--cpu_memory_utilization", "1.5"], "--cpu_memory_utilization must be <= 1"),
    (["--enable_prefix_caching", "sometimes"], "--enable_prefix_caching must be true or false"),
    (["--mqtt_port", "x"], "--mqtt_port must be an integer, got 'x' \\(from the command line\\)"),
    (["--max_tok", "5"], "unrecognized arguments"),  # no abbreviations
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--log_level", "loud"], "--log_level must be one of"),
])
def test_errors(argv: list[str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        parse(*argv)


def test_error_names_the_environment_variable() -> None:
    with pytest.raises(SettingsError, match="environment variable VLLM_DEPLOY_MQTT_PORT"):
        parse(env={"VLLM_DEPLOY_MQTT_PORT": "x"})


@pytest.mark.parametrize("value", ["none", "None", "auto", "AUTO"])
def test_supported_quantization_values(value: str) -> None:
    assert parse("--quantization", value).engine_config("/m").quantization is None


@pytest.mark.parametrize("value", ["awq", "GPTQ", "fp8", "bitsandbytes", "compressed-tensors"])
def test_quantization_methods_reach_the_engine_in_lower_case(value: str) -> None:
    assert parse("--quantization", value).engine_config("/m").quantization == value.lower()


def test_misc_conversions() -> None:
    s = parse("--log_level", "debug", "--max_model_len", "none", "--device", "CPU")
    assert (s.log_level, s.max_model_len, s.device) == ("DEBUG", None, "cpu")


def test_help_documents_every_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = build_parser().format_help()
    for flag in FLAGS:
        assert "--" + flag.name in text and flag.env in text, flag.name
    assert "[default: 512; env: VLLM_DEPLOY_MAX_TOKENS]" in text


def test_password_on_command_line_warns_and_is_never_shown() -> None:
    s = parse("--mqtt_password", "hunter2-secret")
    assert any("`ps`" in note and "--mqtt_password_file" in note for note in s.notices)
    assert "hunter2-secret" not in repr(s) + "\n".join(s.describe()) + repr(s.agent_config())
    assert s.agent_config().mqtt_password == "hunter2-secret"
    assert not parse(env={"VLLM_DEPLOY_MQTT_PASSWORD": "x"}).notices


def test_password_file(tmp_path: Path) -> None:
    file = tmp_path / "pw"
    file.write_text("from-file\n")
    file.chmod(0o600)
    s = parse("--mqtt_password_file", str(file))
    assert s.mqtt_password == "from-file" and not s.notices
    env = {"VLLM_DEPLOY_MQTT_PASSWORD": "from-env"}
    assert parse("--mqtt_password_file", str(file), env=env).mqtt_password == "from-file"
    assert parse("--mqtt_password", "cli", env={"VLLM_DEPLOY_MQTT_PASSWORD_FILE": str(file)}) \
        .mqtt_password == "cli"
    with pytest.raises(SettingsError, match="either --mqtt_password or --mqtt_password_file"):
        parse("--mqtt_password", "a", "--mqtt_password_file", str(file))
    with pytest.raises(SettingsError, match="either --mqtt_password or --mqtt_password_file"):
        parse(env={**env, "VLLM_DEPLOY_MQTT_PASSWORD_FILE": str(file)})
    file.chmod(0o644)
    assert "readable by other users" in parse("--mqtt_password_file", str(file)).notices[0]
    with pytest.raises(SettingsError, match="cannot be read"):
        parse("--mqtt_password_file", str(tmp_path / "missing"))


def test_configs_map_onto_config_classes() -> None:
    s = parse("--max_num_seqs", "4", "--seed", "7", "--temperature", "0", "--topic_prefix", "x/")
    engine = s.engine_config("/models/m")
    assert (engine.model_path, engine.max_num_seqs, engine.seed) == ("/models/m", 4, 7)
    agent = s.agent_config()
    assert (agent.temperature, agent.topic_prefix, agent.max_tokens) == (0.0, "x/", 512)


def test_kv_cache_settings_defaults() -> None:
    engine = parse().engine_config("/m")
    assert (engine.kv_cache_dtype, engine.cpu_memory_utilization, engine.block_size) == \
        ("auto", 0.5, 16)
    assert engine.num_kv_blocks is None and engine.enable_prefix_caching is True
    assert engine.project_shares == ()


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), ("fp8", "fp8"), ("FP8", "fp8"), ("fp8_e4m3", "fp8_e4m3"),
    ("fp8_e5m2", "fp8_e5m2"),
])
def test_kv_cache_dtype_values(value: str, expected: str) -> None:
    assert parse("--kv_cache_dtype", value).engine_config("/m").kv_cache_dtype == expected
    env = {"VLLM_DEPLOY_KV_CACHE_DTYPE": value}
    assert parse(env=env).engine_config("/m").kv_cache_dtype == expected


def test_kv_cache_flags_reach_the_engine_config(tmp_path: Path) -> None:
    engine = parse("--cpu_memory_utilization", "0.25", "--block-size", "32", "--num_kv_blocks",
                   "64", "--no-enable_prefix_caching").engine_config("/m")
    assert (engine.cpu_memory_utilization, engine.block_size, engine.num_kv_blocks,
            engine.enable_prefix_caching) == (0.25, 32, 64, False)
    config = tmp_path / "c.yaml"
    config.write_text("block_size: 8\nnum_kv_blocks: null\nenable_prefix_caching: off\n"
                      "kv_cache_dtype: fp8_e5m2\n")
    engine = parse("--config", str(config)).engine_config("/m")
    assert (engine.block_size, engine.num_kv_blocks, engine.enable_prefix_caching,
            engine.kv_cache_dtype) == (8, None, False, "fp8_e5m2")
    assert parse("--num_kv_blocks", "none").num_kv_blocks is None
    env = {"VLLM_DEPLOY_ENABLE_PREFIX_CACHING": "0", "VLLM_DEPLOY_NUM_KV_BLOCKS": "12"}
    engine = parse(env=env).engine_config("/m")
    assert (engine.enable_prefix_caching, engine.num_kv_blocks) == (False, 12)
    assert parse("--enable-prefix-caching", env=env).enable_prefix_caching is True


@pytest.mark.parametrize("argv", [["--no-enable_prefix_caching"], ["--no-enable-prefix-caching"],
                                  ["--noenable_prefix_caching"], ["--enable_prefix_caching", "false"]])
def test_prefix_caching_off_forms(argv: list[str]) -> None:
    assert parse(*argv).engine_config("/m").enable_prefix_caching is False


def test_engine_config_takes_the_project_shares() -> None:
    engine = parse("--projects", "maze", "driving").engine_config(
        "/m", project_shares={"maze": 3.0, "driving": 1.0})
    assert engine.project_shares == (("maze", 3.0), ("driving", 1.0))


def test_launcher_passes_each_projects_kv_share(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    import agent.service.app
    import engine
    import engine.model_source
    import projects
    import vLLMDeploy
    from projects import ProjectSpec

    specs = {"maze": ProjectSpec("maze", "p", kv_share=3.0),
             "driving": ProjectSpec("driving", "p", kv_share=1.0),
             "general": ProjectSpec("general", "p")}
    seen: dict[str, object] = {}

    class FakeAgent:
        def __init__(self, config: AgentConfig, engine: object, projects: dict,
                     info: object = None, **extra: object) -> None:  # store, service
            seen["agent_projects"], seen["info"] = dict(projects), info

        def run_forever(self) -> None:
            seen["ran"], seen["frozen"] = True, gc.get_freeze_count()
            gc.unfreeze()  # the rest of the test session collects as before

    def fake_create_engine(config: object) -> object:
        seen["engine_config"] = config
        return SimpleNamespace(quantization="awq 4-bit, group 128")  # as the engine loaded it

    monkeypatch.setattr(projects, "load_project", lambda name: specs[name])
    monkeypatch.setattr(engine.model_source, "resolve_model", lambda *a, **kw: tmp_path)
    monkeypatch.setattr(engine, "create_engine", fake_create_engine)
    monkeypatch.setattr(agent.service.app, "Agent", FakeAgent)
    settings = parse("--projects", "maze", "driving", "--device", "cpu", "--legacy_topics",
                     "--kv_cache_dtype", "fp8")
    vLLMDeploy.start(settings)
    config = seen["engine_config"]
    # the legacy topics' projects (general, driving) are served too: they get their shares
    assert dict(config.project_shares) == {"maze": 3.0, "driving": 1.0, "general": 1.0}
    assert config.kv_cache_dtype == "fp8" and config.model_path == str(tmp_path)
    assert set(seen["agent_projects"]) == {"maze", "driving", "general"} and seen["ran"]
    # what start-up built is out of the garbage collector's reach before serving begins
    assert seen["frozen"] > 10_000
    # the status topic names the method the engine found in the checkpoint
    assert seen["info"] == AgentInfo(model=settings.model, quantization="awq 4-bit, group 128")


def test_legacy_topic_settings() -> None:
    agent = parse().agent_config()
    assert (agent.legacy_topics, agent.legacy_project, agent.legacy_driving_project) == \
        (False, "general", "driving")
    agent = parse("--legacy_topics", "--legacy_driving_project", "racing").agent_config()
    assert agent.legacy_topics and agent.legacy_driving_project == "racing"
    with pytest.raises(SettingsError, match="invalid project name"):
        parse("--legacy_project", "a/b")


def test_every_agent_config_field_has_a_flag() -> None:
    flags = {f.name for f in FLAGS}
    missing = [f.name for f in dataclasses.fields(AgentConfig) if f.name not in flags]
    assert not missing, f"AgentConfig fields without a flag in agent/service/settings_table.py: {missing}"


def test_shipped_yaml_configs_are_valid(tmp_path: Path) -> None:
    password = tmp_path / "pw"  # the example names a file that only exists on the site
    password.write_text("x\n")
    env = {"VLLM_DEPLOY_MQTT_PASSWORD_FILE": str(password)}
    defaults = dict(parse("--config", str(ROOT / "configs" / "default.yaml")).values)
    assert defaults.pop("config").endswith("default.yaml")
    assert defaults == {k: v for k, v in parse().values.items() if k != "config"}
    example = parse("--config", str(ROOT / "configs" / "example.yaml"), env=env)
    assert example.projects == ("maze", "driving", "bloodcell", "racing")
    assert example.sources["mqtt_broker"] == "config file"


def test_default_yaml_is_generated_from_the_table() -> None:
    text = (ROOT / "configs" / "default.yaml").read_text(encoding="utf-8")
    assert text == default_yaml(), "run: python -m agent.service.settings --default-yaml > configs/default.yaml"
    uncommented = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# ") and
                            any(line.startswith(f"# {f.name}:") for f in FLAGS))
    assert yaml.safe_load(uncommented) == {f.name: (list(f.default) if isinstance(f.default, tuple)
                                                     else f.default) for f in FLAGS if f.in_yaml}


def test_readme_flag_table_is_in_sync() -> None:
    table = readme_table((ROOT / "README.md").read_text(encoding="utf-8"))
    assert table == markdown_table(), "run: python -m agent.service.settings --update-readme README.md"


def test_parsing_imports_no_torch() -> None:
    code = ("import sys; from agent.service.settings import parse_settings; import vLLMDeploy; "
            "parse_settings(['--projects', 'maze']).agent_config(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DEPLOY_")}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)


def test_systemd_env_example_parses(tmp_path: Path) -> None:
    """Every variable of the example environment file is a flag, and together they parse
    (the unit itself: tests/test_systemd.py)."""
    text = (ROOT / "systemd" / "vllm-deploy.env.example").read_text(encoding="utf-8")
    known = {f.env for f in FLAGS}
    env = {}
    for line in text.splitlines():
        if line.startswith("VLLM_DEPLOY_"):
            key, value = line.split("=", 1)
            env[key] = value.strip('"')
        elif line.startswith("#VLLM_DEPLOY_"):
            assert line[1:].split("=", 1)[0] in known, line
    assert set(env) <= known
    password = tmp_path / "mqtt_password"
    password.write_text("secret\n")
    password.chmod(0o600)
    env["VLLM_DEPLOY_MQTT_PASSWORD_FILE"] = str(password)  # the example's path is the box's
    settings = parse(env=env)
    assert settings.projects == ("maze", "driving", "bloodcell", "racing")
    assert settings.agent_config().mqtt_password == "secret" and not settings.notices


def test_default_max_model_len_is_only_a_limit() -> None:
    """The old default 4096 must not fail on a model with a shorter context; a given value may."""
    default = parse_settings(["--model", "m"]).engine_config("m")
    assert default.max_model_len is None and default.max_model_len_limit == 4096
    given = parse_settings(["--model", "m", "--max_model_len", "4096"]).engine_config("m")
    assert given.max_model_len == 4096 and given.max_model_len_limit is None
