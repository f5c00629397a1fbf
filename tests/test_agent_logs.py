"""Prompts, replies and credentials stay out of the main log; --debug_log keeps the first two."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.debug_log import DEBUG_LOGGER, debug_log, disable_debug_log, enable_debug_log
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
