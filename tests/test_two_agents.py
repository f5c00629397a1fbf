"""Two agents with the same --agent_id (issue 15, item 3), against a real Mosquitto: they
took the session from each other (15 and 28 reconnects in 23 s) and answered 43 of 300
requests twice. Now the second one stops with one ERROR line and the first serves on."""

from __future__ import annotations

import logging
import secrets
import threading
import time

import pytest

from agent.mqtt.rival import elder_rival
from agent.service.app import Agent, MqttConnectError
from agent.service.config import AgentConfig
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]


def test_the_elder_of_two_online_statuses() -> None:
    mine = ("2026-12-07T10:00:05Z", "bbbb")
    online = {"state": "online", "startedAt": "2026-12-07T10:00:01Z", "instance": "aaaa"}
    assert elder_rival(mine, online) == "started at 2026-12-07T10:00:01Z, instance aaaa"
    assert elder_rival(mine, {**online, "state": "offline"}) is None  # it has gone
    assert elder_rival(mine, {**online, "instance": "bbbb"}) is None  # our own (a broker restart)
    assert elder_rival(mine, {**online, "startedAt": "2026-12-07T10:00:09Z"}) is None  # younger
    assert elder_rival(mine, {"state": "online"}) is None  # an older agent without instances
    assert elder_rival(mine, None) is None
    same_second = {**online, "startedAt": mine[0]}
    assert elder_rival(mine, same_second) is not None  # a tie: the smaller instance stays


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_second_agent_with_an_agent_id_stops_and_the_first_serves_on(
    broker: Broker, client: OldClient, protocol: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    c = {"projects": ("general",), "mqtt_broker": broker.host, "mqtt_port": broker.port,
         "mqtt_protocol": protocol, "agent_id": f"twin-{secrets.token_hex(3)}",
         "reconnect_max_delay": 0.5, "stats_interval": 0}
    first = Agent(AgentConfig(**c), FakeEngine())
    first.start()
    time.sleep(1.1)  # a later startedAt for the second
    second = Agent(AgentConfig(**c), FakeEngine())
    errors: list[BaseException] = []

    def run_second() -> None:
        try:
            second.run_forever()
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            errors.append(exc)

    runner = threading.Thread(target=run_second)
    runner.start()
    try:
        runner.join(20)
        assert not runner.is_alive(), "the second agent kept running"
        assert len(errors) == 1 and isinstance(errors[0], MqttConnectError)
        assert "two agents must not share --agent_id" in str(errors[0])
        assert first.mqtt.wait_ready(10)
        for i in range(5):
            assert client.ask("general", f"s{i}", f"still here {i}") == f"echo: still here {i}"
        time.sleep(2)  # no more takeovers
        assert first.mqtt.ready
        lines = [r for r in caplog.records if r.levelno == logging.ERROR
                 and "two agents must not share" in r.getMessage()]
        assert len(lines) == 1
        connects = caplog.text.count(f"as vllm-deploy-{c['agent_id']}")
        assert connects <= 6, connects  # first, second, the first back, and a round more
    finally:
        second.stop()
        first.stop()
