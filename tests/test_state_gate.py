"""agent.mqtt.state_gate without an agent: game states per session, only the newest waiting,
every Ack sent once; and the core's session_limit=False, by which states skip the chat limit."""

from __future__ import annotations

from collections.abc import Callable

from agent.core.rate_limit import RATE_LIMITED
from agent.mqtt.acks import Ack
from agent.mqtt.protocol import ChatRequest
from agent.mqtt.state_gate import StateGate


class Sent:
    """Acks that record their message's name when sent."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def ack(self, name: str) -> Ack:
        return Ack(lambda mid, qos: self.names.append(name), 0, 1, 0, lambda: 0)


class Core:
    """Takes each submitted state's Ack, as a turn would (``hold``), until ``answer``."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.turns: list[tuple[str, Ack]] = []

    def submitter(self, name: str) -> Callable[[Ack], bool]:
        def submit(after: Ack) -> bool:
            if self.refuse:
                return False
            self.turns.append((name, after.hold()))
            return True
        return submit

    def answer(self) -> str:
        name, after = self.turns.pop(0)
        after()
        return name


def test_a_newer_state_replaces_the_waiting_one() -> None:
    gate, core, sent = StateGate(10), Core(), Sent()
    for name in ("s0", "s1", "s2", "s3"):
        gate.offer("g", core.submitter(name), sent.ack(name))
    assert [n for n, _ in core.turns] == ["s0"] and sent.names == ["s1", "s2"]
    assert gate.superseded == 2
    assert core.answer() == "s0" and sent.names == ["s1", "s2", "s0"]
    assert [n for n, _ in core.turns] == ["s3"]  # the newest, submitted once s0 was answered
    assert core.answer() == "s3" and sent.names[-1] == "s3"
    assert gate.busy() == 0  # nothing kept once the session's states are answered


def test_sessions_do_not_wait_for_each_other() -> None:
    gate, core, sent = StateGate(10), Core(), Sent()
    gate.offer("a", core.submitter("a0"), sent.ack("a0"))
    gate.offer("b", core.submitter("b0"), sent.ack("b0"))
    assert [n for n, _ in core.turns] == ["a0", "b0"] and gate.busy() == 2


def test_a_refused_state_frees_its_session() -> None:
    gate, core, sent = StateGate(10), Core(refuse=True), Sent()
    gate.offer("g", core.submitter("s0"), sent.ack("s0"))
    assert sent.names == ["s0"] and gate.busy() == 0
    core.refuse = False
    gate.offer("g", core.submitter("s1"), sent.ack("s1"))
    assert [n for n, _ in core.turns] == ["s1"]


def test_the_states_rate_limit_is_per_second() -> None:
    now = [0.0]
    gate = StateGate(2, clock=lambda: now[0])
    assert gate.allow("g") and gate.allow("g") and not gate.allow("g") and gate.allow("h")
    now[0] = 1.0
    assert gate.allow("g")


def test_requests_outside_the_session_limit_are_not_counted_by_it() -> None:
    from agent.mqtt.topics import Topics
    from agent.service.config import AgentConfig
    from tests.chat_rig import ChatRig
    from tests.fake_engine import FakeEngine
    from tests.test_router import PROJECTS, Replies

    config = AgentConfig(projects=("maze",), max_requests_per_session=1)
    replies = Replies()
    rig = ChatRig(config, FakeEngine(), PROJECTS, Topics(config.projects), replies)
    rig.start()
    try:
        for i in range(3):
            state = ChatRequest("maze", "g", f"state {i}", "maze/assistant_response/g")
            rig.chat.submit(state, session_limit=False)
            replies.wait(i + 1)
        rig.chat.submit(ChatRequest("maze", "g", "chat", "maze/assistant_response/g"))
        rig.chat.submit(ChatRequest("maze", "g", "chat again", "maze/assistant_response/g"))
        replies.wait(5)
    finally:
        rig.stop()
    payloads = [p for _, p in replies.items]
    assert payloads[:3] == ["echo: state 0", "echo: state 1", "echo: state 2"]
    assert sorted(payloads[3:]) == sorted(["echo: chat", RATE_LIMITED])  # the first one counted
