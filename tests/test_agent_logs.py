"""Prompts, replies and credentials stay out of the main log; --debug_log keeps the first two.
A client cannot forge a log line, and the debug log is the agent user's alone."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.debug_log import DEBUG_LOGGER, debug_log, disable_debug_log, enable_debug_log
from agent.core.log_format import MAX_MESSAGE_CHARS, OneLineFormatter
from agent.service.app import Agent
from agent.service.config import AgentConfig
from agent.service.settings import parse_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import MOSQUITTO_PASSWD, Broker, mosquitto_available, start_broker
from tests.old_client import OldClient
from vLLMDeploy import start_debug_log

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available() or not MOSQUITTO_PASSWD,
                       reason="mosquitto and mosquitto_passwd are needed"),
]


@pytest.fixture(scope="module")
def secured() -> Iterator[Broker]:
    broker = start_broker(users={"agent": f"pw-{secrets.token_hex(8)}", "user": "user-pw"})
    yield broker
    broker.stop()


class MainLog(logging.Handler):
    """What vLLMDeploy.py's handler on the root logger would write, at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def main_log() -> Iterator[MainLog]:
    # pytest's caplog also hooks non-propagating loggers, so it is no stand-in for the root's
    # handler here: a handler of our own on the root logger is.
    handler, root = MainLog(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # stricter than INFO: not even at DEBUG
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def debug_handlers() -> Iterator[list[logging.Handler]]:
    handlers: list[logging.Handler] = []
    yield handlers
    for handler in handlers:
        disable_debug_log(handler)


def _serve_one(broker: Broker, message: str) -> str:
    password = broker.users["agent"]
    config = AgentConfig(projects=("general",), mqtt_broker=broker.host, mqtt_port=broker.port,
                         mqtt_username="agent", mqtt_password=password, connect_timeout=5.0)
    client = OldClient(broker, username="user", password=broker.users["user"])
    try:
        with Agent(config, FakeEngine()):
            return client.ask("general", "private", message)
    finally:
        client.close()


def test_main_log_never_holds_prompts_replies_or_passwords(
    secured: Broker, main_log: MainLog, debug_handlers: list[logging.Handler], tmp_path: Path,
) -> None:
    debug_file = tmp_path / "debug_info.log"
    debug_handlers.append(enable_debug_log(str(debug_file), 100_000))
    prompt = f"patient {secrets.token_hex(6)} has a cough"
    reply = _serve_one(secured, prompt)
    assert reply == f"echo: {prompt}"
    text = main_log.text
    assert "accepted" in text and "answered" in text  # the log is there (at DEBUG) ...
    assert prompt not in text  # ... without the prompt, the reply or the password
    assert secured.users["agent"] not in text
    kept = debug_file.read_text(encoding="utf-8")
    assert prompt in kept and f"reply: {reply!r}" in kept
    assert secured.users["agent"] not in kept


def test_debug_log_is_off_by_default(secured: Broker, tmp_path: Path) -> None:
    prompt = f"nobody may read {secrets.token_hex(6)}"
    records: list[logging.LogRecord] = []
    spy = logging.Handler()
    spy.emit = records.append  # type: ignore[method-assign]
    debug_log.addHandler(spy)
    try:
        assert _serve_one(secured, prompt) == f"echo: {prompt}"
    finally:
        debug_log.removeHandler(spy)
    assert records == [] and not debug_log.propagate
    assert logging.getLogger(DEBUG_LOGGER) is debug_log


def test_launcher_flag_and_rotation(tmp_path: Path, debug_handlers: list[logging.Handler]) -> None:
    path = tmp_path / "prompts.log"
    settings = parse_settings(["--debug_log", str(path), "--debug_log_max_bytes", "2000"], environ={})
    before = set(debug_log.handlers)
    start_debug_log(settings)
    debug_handlers.extend(set(debug_log.handlers) - before)
    lines = [f"request {i} message: {secrets.token_hex(20)}" for i in range(100)]
    for line in lines:
        debug_log.debug("%s", line)
    rotated = path.with_name(path.name + ".1")
    assert rotated.exists() and path.stat().st_size <= 2000 and rotated.stat().st_size <= 2000
    assert lines[-1] in path.read_text(encoding="utf-8")
    assert not (tmp_path / "prompts.log.2").exists()  # one backup only


def test_unwritable_debug_log_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "debug.log"
    with pytest.raises(ValueError, match=f"--debug_log {target}: cannot be opened"):
        enable_debug_log(str(target), 10_000)


# The agent as vLLMDeploy.py sets up its logging (main log at DEBUG on stderr, --debug_log),
# in a process of its own under umask 022, serving until its stdin closes.
LAUNCHED_AGENT = """
import os, sys
os.umask(0o022)
from vLLMDeploy import setup_logging, start_debug_log
from agent.service.app import Agent
from agent.service.config import AgentConfig
from agent.service.settings import parse_settings
from tests.fake_engine import FakeEngine
port, debug_file = int(sys.argv[1]), sys.argv[2]
settings = parse_settings(["--log_level", "DEBUG", "--debug_log", debug_file], environ={})
setup_logging(settings.log_level)
start_debug_log(settings)
config = AgentConfig(projects=("general",), mqtt_broker="127.0.0.1", mqtt_port=port,
                     connect_timeout=5.0)
with Agent(config, FakeEngine()):
    print("ready", flush=True)
    sys.stdin.read()
"""
ROOT = Path(__file__).resolve().parent.parent


def test_client_strings_cannot_forge_log_lines(broker: Broker, tmp_path: Path) -> None:
    """Ids with a newline reach the main log and the debug log escaped, never as a line of
    their own; the debug log file is 0600 under umask 022."""
    debug_file = tmp_path / "debug_info.log"
    agent = subprocess.Popen([sys.executable, "-c", LAUNCHED_AGENT, str(broker.port), str(debug_file)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    client = OldClient(broker)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        topic = "general/assistant_response/inj"
        forged = {"clientId": "c1\r\nFORGED client", "requestId": "r1\nFORGED request"}
        client.ask("general", "s1", "hello", replyTopic=topic, **forged)  # answered or refused
        client.ask("general", "s1\nFORGED session", "hi", replyTopic=topic)
        client.publish("general/user_input", json.dumps({"sessionId": "s1", "message": " ",
                                                         **forged}))  # refused: empty
        assert client.ask("general", "s2", "after", replyTopic=topic) == "echo: after"
    finally:
        client.close()
        _, stderr = agent.communicate(timeout=30)
    assert agent.returncode == 0, stderr
    assert "FORGED" in stderr, f"no id with a newline was logged at all:\n{stderr}"
    for name, text in (("main log", stderr), ("debug log", debug_file.read_text("utf-8"))):
        forged_lines = [line for line in text.splitlines() if line.startswith("FORGED")]
        assert forged_lines == [], f"{name}: a client forged {forged_lines}"
    assert stat.S_IMODE(debug_file.stat().st_mode) == 0o600


def test_debug_log_and_its_backup_are_private(tmp_path: Path,
                                              debug_handlers: list[logging.Handler]) -> None:
    path = tmp_path / "prompts.log"
    path.write_text("left by an older version\n")
    path.chmod(0o644)
    old_umask = os.umask(0o022)
    try:
        debug_handlers.append(enable_debug_log(str(path), 1000))
        for i in range(50):
            debug_log.debug("request %d message: %s", i, secrets.token_hex(20))
    finally:
        os.umask(old_umask)
    rotated = path.with_name(path.name + ".1")
    assert rotated.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(rotated.stat().st_mode) == 0o600


def test_one_line_formatter_escapes_and_bounds_the_message_only() -> None:
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "id %s done", ("a\nb\r\x1b[2J\u2028c",), None)
    assert formatter.format(record) == "WARNING id a\\nb\\r\\x1b[2J\\u2028c done"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert text.startswith("ERROR failed\nTraceback") and text.endswith("RuntimeError: boom")
    huge = logging.LogRecord("t", logging.INFO, __file__, 1, "%s", ("x" * 10**6,), None)
    line = formatter.format(huge)
    assert len(line) < MAX_MESSAGE_CHARS + 100 and line.endswith("more characters)")
