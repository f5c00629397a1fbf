"""vLLMDeploy.py as a user runs it: a subprocess, its exit code and what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vLLMDeploy.py"
USER_ERROR = 2


def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("VLLM_DEPLOY_") and k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**clean, **env})


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, and one line 'error: ...' on stderr holding every fragment; no traceback."""
    assert result.returncode == USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder that --model accepts (the engine is never reached in these tests)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_help() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--projects", "--max_tokens", "--max-tokens", "VLLM_DEPLOY_MQTT_PASSWORD",
                 "--mqtt_password_file", "--config"):
        assert text in result.stdout


def test_tensor_parallel_is_refused() -> None:
    assert_user_error(run("--tensor_parallel_size", "2"),
                      "this engine runs a model on one GPU; use --tensor_parallel_size 1")


@pytest.mark.parametrize("args, fragment", [
    (["--quantization", "q4"], "--quantization must be one of"),
    (["--mqtt_port", "x"], "--mqtt_port must be an integer"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--projects", "bad/name"], "invalid project name"),
])
def test_bad_flags(args: list[str], fragment: str) -> None:
    assert_user_error(run(*args), fragment)


def test_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max_tokenz: 5\n")
    assert_user_error(run("--config", str(config)), "unknown key(s) 'max_tokenz'", "valid keys")


def test_missing_model_path(tmp_path: Path) -> None:
    assert_user_error(run("--model", str(tmp_path / "nope")), "does not exist")


def test_model_not_in_cache(tmp_path: Path) -> None:
    assert_user_error(run("--model", "qwq-32b", "--model_cache_dir", str(tmp_path)),
                      "Qwen/QwQ-32B", "--auto_download")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU")
def test_missing_gpu_index(model_dir: Path) -> None:
    assert_user_error(run("--visible_devices", "7", "--device", "auto", "--model", str(model_dir)),
                      "--visible_devices 7", "no such CUDA GPU")


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU")
def test_device_cuda_without_gpu(model_dir: Path) -> None:
    assert_user_error(run("--device", "cuda", "--model", str(model_dir)), "no CUDA GPU")


def test_visible_devices_ignored_on_cpu(tmp_path: Path) -> None:
    result = run("--device", "cpu", "--visible_devices", "7", "--model", str(tmp_path / "nope"))
    assert "--visible_devices 7 is ignored with --device cpu" in result.stderr
    assert_user_error(result, "does not exist")


def test_bad_visible_devices(model_dir: Path) -> None:
    assert_user_error(run("--visible_devices", "zero", "--model", str(model_dir)),
                      "give GPU indices")


def test_password_on_command_line_warns_and_is_never_logged(tmp_path: Path) -> None:
    secret = "s3cr3t-do-not-log"
    result = run("--mqtt_password", secret, "--log_level", "DEBUG", "--model", str(tmp_path / "x"))
    assert "WARNING" in result.stderr and "`ps`" in result.stderr
    assert secret not in result.stdout + result.stderr
    assert result.returncode == USER_ERROR and "setting mqtt_password = '***'" in result.stderr


# Records CUDA_VISIBLE_DEVICES at the moment torch is first imported, then runs the launcher.
SPY = r"""
import importlib.abc, os, sys
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not os.path.exists(sys.argv[1]):
            with open(sys.argv[1], "w") as f:
                f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
        return None
sys.meta_path.insert(0, Spy())
import vLLMDeploy
sys.exit(vLLMDeploy.main(sys.argv[2:]))
"""


def test_visible_devices_set_before_torch_import(tmp_path: Path, model_dir: Path) -> None:
    record = tmp_path / "seen"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    result = subprocess.run(
        [sys.executable, "-c", SPY, str(record), "--visible_devices", "5", "--model",
         str(model_dir), "--max_model_len", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )
    assert record.read_text() == "5", result.stderr
    assert result.returncode != 0  # there is no GPU 5 here (nor a real model)


@pytest.mark.integration
def test_serves_a_request_with_credentials_from_a_file(tmp_path: Path) -> None:
    """The whole launcher: tiny model on the CPU, a private broker with users, one round trip."""
    import json
    import signal
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.checkpoints import tiny_checkpoint
    from tests.mqtt_broker import MOSQUITTO_PASSWD, mosquitto_available, start_broker

    if not mosquitto_available() or not MOSQUITTO_PASSWD:
        pytest.skip("mosquitto is not installed")
    broker = start_broker(users={"agent": "agent-secret-1", "client": "client-secret-2"})
    password = tmp_path / "password"
    password.write_text("agent-secret-1\n")
    password.chmod(0o600)
    log_path = tmp_path / "agent.log"
    command = [sys.executable, str(SCRIPT), "--projects", "general", "--model",
               str(tiny_checkpoint("qwen2")), "--device", "cpu", "--mqtt_broker", broker.host,
               "--mqtt-port", str(broker.port), "--mqtt_username", "agent",
               "--mqtt_password_file", str(password), "--max_model_len", "256",
               "--max_history_tokens", "128", "--max_tokens", "8", "--log_level", "DEBUG"]
    replies: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cli-test-client")
    client.username_pw_set("client", "client-secret-2")
    client.on_message = lambda c, u, msg: replies.append(msg.payload.decode())
    with log_path.open("w") as log:
        agent = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        client.connect(broker.host, broker.port)
        client.loop_start()
        client.subscribe("general/assistant_response/#", qos=1)
        request = {"message": "hello", "sessionId": "s1", "temperature": 2.0, "maxTokens": 8}
        deadline = time.monotonic() + 90
        while not replies and time.monotonic() < deadline and agent.poll() is None:
            client.publish("general/user_input", json.dumps(request), qos=1)  # until subscribed
            time.sleep(1.0)
        assert replies, log_path.read_text()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "agent-secret-1" not in text and "subscribed to general/user_input" in text
    finally:
        client.loop_stop()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        broker.stop()
