"""The answered-requests store (agent.core.dedupe): what a copy of a request gets again."""

from __future__ import annotations

from agent.core.dedupe import AnsweredRequests, outcome_bytes, request_key
from agent.core.outcome import Outcome
from engine.api import GenerationResult


def key(i: int, message: str = "m") -> tuple:
    return request_key("p", "s", f"r{i}", message)


def test_kept_until_its_time_is_up() -> None:
    now = [0.0]
    answered = AnsweredRequests(ttl=10, clock=lambda: now[0])
    answered.remember(key(1), Outcome("hello", True))
    assert answered.reply_of(key(1)) == Outcome("hello", True)
    assert answered.reply_of(key(1, "another message")) is None  # not a copy
    assert answered.reply_of(request_key("p", "t", "r1", "m")) is None  # another session
    now[0] = 11
    assert answered.reply_of(key(1)) is None and len(answered) == 0 and answered.bytes == 0


def test_bounded_by_entries_and_by_bytes() -> None:
    answered = AnsweredRequests(ttl=100, max_entries=3)
    for i in range(10):
        answered.remember(key(i), Outcome("x", True))
    assert len(answered) == 3 and answered.reply_of(key(9)) and not answered.reply_of(key(0))
    one = outcome_bytes(key(0), Outcome("y" * 10_000, True))
    answered = AnsweredRequests(ttl=100, max_bytes=3 * one)
    for i in range(10):
        answered.remember(key(i), Outcome("y" * 10_000, True))
    assert len(answered) == 3 and answered.bytes <= 3 * one
    answered.remember(key(99), Outcome("z" * 100_000, True))  # larger than the whole bound
    assert answered.reply_of(key(99)) is None and len(answered) == 3


def test_a_long_id_counts_its_bytes() -> None:
    small = outcome_bytes(request_key("p", "s", "r", "m"), Outcome("x", True))
    big = outcome_bytes(request_key("p", "s", "r" * 100_000, "m"), Outcome("x", True))
    assert big - small >= 99_000


def test_the_result_is_kept_slim_with_what_the_envelope_reads() -> None:
    result = GenerationResult("r", "raw text", list(range(1000)), "stop", 12)
    answered = AnsweredRequests(ttl=100)
    answered.remember(key(1), Outcome("text", True, result))
    kept = answered.reply_of(key(1))
    assert kept is not None and kept.result is not None
    assert len(kept.result.token_ids) == 1000 and kept.result.text == "raw text"
    assert kept.result.token_ids.itemsize <= 8 and type(kept.result.token_ids) is not list
