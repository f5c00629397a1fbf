"""agent.mqtt.state_gate without an agent: game states per session, only the newest waiting,
every Ack sent once; and agent.core.rate_limit.exempt, by which states skip the chat limit."""

from __future__ import annotations

from collections.abc import Callable

from agent.core.rate_limit import RateLimiter, exempt
from agent.mqtt.acks import Ack
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


def test_exempt_passes_every_limiter_uncounted_on_its_thread_only() -> None:
    limiter = RateLimiter(1, 60.0)
    assert limiter.allow("s")
    with exempt():
        assert limiter.allow("s") and limiter.allow("s")
        limiter.refund("s")  # nothing was counted: nothing taken back
    assert not limiter.allow("s")  # the one counted before is still there
