from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.core.outcome import OVERLOADED, SHUTTING_DOWN
from agent.core.rate_limit import RATE_LIMITED
from agent.core.sessions import Session
from agent.mqtt.topics import Topics
from agent.service.config import AgentConfig
from engine.api import EngineError
from engine.tokenizer import Tokenizer
from projects import ProjectSpec
from tests.chat_rig import ChatRig
from tests.fake_engine import FakeEngine, tiny_tokenizer

PROJECTS = {
    "maze": ProjectSpec("maze", "You guide a maze game.", temperature=0.6, max_tokens=100),
    "general": ProjectSpec("general", "You are helpful."),
}


class Replies:
    """The publish callable: records (topic, payload) and lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: str) -> None:
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)

    def on(self, topic: str) -> list[str]:
        return [p for t, p in self.items if t == topic]


MakeRouter = Callable[..., tuple[ChatRig, FakeEngine, Replies]]


@pytest.fixture
def make_router() -> Iterator[MakeRouter]:
    routers: list[ChatRig] = []

    def make(engine: FakeEngine | None = None, **overrides: object) -> tuple[ChatRig, FakeEngine, Replies]:
        engine = engine or FakeEngine()
        config = AgentConfig(projects=("maze", "general"), **overrides)  # type: ignore[arg-type]
        replies = Replies()
        router = ChatRig(config, engine, PROJECTS, Topics(config.projects), replies)
        router.start()
        routers.append(router)
        return router, engine, replies

    yield make
    for router in routers:
        router.stop()


def send(router: ChatRig, project: str = "maze", **fields: object) -> None:
    router.handle_message(f"{project}/user_input", json.dumps(fields).encode())


def test_reply_on_default_and_custom_topic(make_router: MakeRouter) -> None:
    router, engine, replies = make_router()
    send(router, sessionId="s1", message="hello")
    send(router, "general", sessionId="s2", message="hi", replyTopic="general/assistant_response/s2/c")
    replies.wait(2)
    assert replies.on("maze/assistant_response/s1") == ["echo: hello"]
    assert replies.on("general/assistant_response/s2/c") == ["echo: hi"]
    assert router.lanes.pending == 0


def test_history_and_system_prompt(make_router: MakeRouter) -> None:
    router, engine, replies = make_router()
    send(router, sessionId="s", message="one")
    replies.wait(1)
    send(router, sessionId="s", message="two")
    replies.wait(2)
    prompt = engine.prompts[-1]
    assert prompt.startswith("<|im_start|>system\nYou guide a maze game.<|im_end|>")
    assert "<|im_start|>assistant\necho: one<|im_end|>" in prompt
    assert engine.user_turns() == ["one", "two"]
    send(router, sessionId="s", message="three", systemPrompt="New rules.")
    send(router, sessionId="s", message="four")  # the new prompt stays
    replies.wait(4)
    assert engine.prompts[-1].startswith("<|im_start|>system\nNew rules.<|im_end|>")
    assert router.store.get(("maze", "s")).system_prompt == "New rules."
    assert router.store.get(("general", "s")) is None


def test_sampling_parameters(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(max_tokens=50)
    send(router, sessionId="a", message="x", temperature=0, maxTokens=1000, topP=0.3)
    send(router, sessionId="b", message="x")
    send(router, "general", sessionId="c", message="x")
    replies.wait(3)
    by_session = {r.metadata["session_id"]: r.sampling for r in engine.requests}
    assert by_session["a"].greedy and by_session["a"].max_tokens == 50 and by_session["a"].top_p == 0.3
    assert by_session["b"].temperature == 0.6 and by_session["b"].max_tokens == 50  # project defaults
    assert by_session["c"].temperature == 0.7 and by_session["c"].top_p == 0.9  # agent defaults


def test_turns_of_a_session_in_order(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(engine=FakeEngine(delay=0.05))
    for i in range(5):
        send(router, sessionId="s", message=f"m{i}")
    send(router, sessionId="other", message="x")
    replies.wait(6)
    assert replies.on("maze/assistant_response/s") == [f"echo: m{i}" for i in range(5)]
    last = next(i for i, r in enumerate(engine.requests) if r.metadata["session_id"] == "s"
                and engine.user_turns(i)[-1] == "m4")
    assert engine.user_turns(last) == [f"m{i}" for i in range(5)]  # each turn saw the ones before
    assert router.store.get(("maze", "s")).turns[-1] == ("m4", "echo: m4")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_one_in_flight_per_session(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(engine=FakeEngine(delay=2))
    send(router, sessionId="s", message="a")
    send(router, sessionId="s", message="b")
    send(router, sessionId="t", message="c")
    wait_until(lambda: len(engine.requests) >= 2)
    time.sleep(0.05)
    assert sorted(r.metadata["session_id"] for r in engine.requests) == ["s", "t"]
    assert router.lanes.pending == 3


def test_overloaded(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(engine=FakeEngine(delay=0.3), max_queue=2)
    for i in range(4):
        send(router, sessionId=f"s{i}", message="x")
    replies.wait(4)
    assert replies.items[0] == ("maze/assistant_response/s2", OVERLOADED)
    assert replies.items[1] == ("maze/assistant_response/s3", OVERLOADED)


def test_rate_limit(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(max_requests_per_session=2)
    for _ in range(4):
        send(router, sessionId="s", message="x")
    send(router, sessionId="t", message="y")
    replies.wait(5)
    assert replies.on("maze/assistant_response/s").count(RATE_LIMITED) == 2
    assert replies.on("maze/assistant_response/t") == ["echo: y"]


def test_a_copy_of_an_answered_request_gets_the_same_reply_generated_once(
    make_router: MakeRouter,
) -> None:
    """A redelivered request (same session, requestId and message) gets its reply again, not
    a second generation and not silence; an invalid one gets its error again."""
    router, engine, replies = make_router(FakeEngine(delay=0.05))
    for _ in range(2):  # the copy arrives while the first is being answered: one reply
        send(router, sessionId="s", message="x", requestId="r1", responseFormat="json")
    replies.wait(1)
    send(router, sessionId="s", message="x", requestId="r1", responseFormat="json")  # answered
    send(router, sessionId="s", message="bad", requestId="r3", temperature="hot")
    send(router, sessionId="s", message="bad", requestId="r3", temperature="hot")
    replies.wait(4)
    time.sleep(0.1)
    topic = "maze/assistant_response/s"
    first, again = replies.on(topic)[:2]
    assert first == again and json.loads(first)["text"] == "echo: x"  # identical, timings too
    assert [r.split(" in [")[0] for r in replies.on(topic)[2:]] == [
        "Error: temperature must be a number"] * 2
    assert len(replies.items) == 4 and engine.user_turns() == ["x"]
    assert router.store.get(("maze", "s")).turns == [("x", "echo: x")]  # recorded once


def test_a_retry_of_a_refused_request_is_served(make_router: MakeRouter) -> None:
    """Issue 15 item 1: overloaded, rate limited and invalid requests are not remembered: a
    retry with the same requestId is answered (and a refused request does not count against
    the rate limit)."""
    router, engine, replies = make_router(FakeEngine(delay=0.2), max_queue=1,
                                          max_requests_per_session=1, rate_limit_window=0.5)
    send(router, sessionId="busy", message="first")
    send(router, sessionId="o", message="retry me", requestId="r-o")  # overloaded
    send(router, sessionId="e", message="   ", requestId="r-e")  # empty: invalid
    replies.wait(3)  # first answered: room again
    send(router, sessionId="o", message="retry me", requestId="r-o")
    replies.wait(4)
    send(router, sessionId="e", message="fixed", requestId="r-e")
    send(router, sessionId="o", message="too soon", requestId="r-l")  # rate limited
    replies.wait(6)
    time.sleep(0.6)  # the window is over
    send(router, sessionId="o", message="too soon", requestId="r-l")
    replies.wait(7)
    assert replies.on("maze/assistant_response/o") == [
        OVERLOADED, "echo: retry me", RATE_LIMITED, "echo: too soon"]
    assert replies.on("maze/assistant_response/e") == ["Error: empty message", "echo: fixed"]


def test_another_message_with_a_sessions_next_request_id_does_not_silence_it(
    make_router: MakeRouter,
) -> None:
    router, engine, replies = make_router()
    send(router, sessionId="v", message="attacker's text", requestId="next-id")
    send(router, sessionId="v", message="victim's question", requestId="next-id")
    replies.wait(2)
    assert replies.on("maze/assistant_response/v") == [
        "echo: attacker's text", "echo: victim's question"]


def test_timeout_cancels_and_next_turn_runs(make_router: MakeRouter) -> None:
    engine = FakeEngine(delay=0.5)
    router, engine, replies = make_router(engine=engine, request_timeout=0.2)
    send(router, sessionId="s", message="slow")
    send(router, sessionId="s", message="queued")
    items = replies.wait(2, timeout=3)
    assert all(p.startswith("Error: ") for _, p in items)
    assert engine.cancelled  # the generation in flight was cancelled
    engine.delay = 0
    send(router, sessionId="s", message="fast")
    replies.wait(3)
    assert replies.items[-1][1] == "echo: fast"
    assert router.store.get(("maze", "s")).turns == [("fast", "echo: fast")]  # no failed turns


def test_engine_failure_leaves_history(make_router: MakeRouter) -> None:
    router, engine, replies = make_router()
    send(router, sessionId="s", message="one")
    replies.wait(1)
    engine.fail = "out of memory"
    send(router, sessionId="s", message="two")
    replies.wait(2)
    assert replies.items[-1][1] == "Error: out of memory"
    engine.fail = None
    engine.submit_error = EngineError("engine stopped")
    send(router, sessionId="s", message="three")
    replies.wait(3)
    assert replies.items[-1][1] == "Error: engine stopped"
    engine.submit_error = RuntimeError("bug")
    send(router, sessionId="s", message="four")
    replies.wait(4)
    assert replies.items[-1][1].startswith("Error: ")
    assert router.store.get(("maze", "s")).turns == [("one", "echo: one")]
    assert router.lanes.pending == 0


def test_too_long_message_leaves_session(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(max_history_tokens=200)
    send(router, sessionId="s", message="one")
    replies.wait(1)
    send(router, sessionId="s", message="z" * 1000)
    replies.wait(2)
    assert replies.items[-1][1].startswith("Error: ") and "too long" in replies.items[-1][1]
    assert router.store.get(("maze", "s")) == Session("You guide a maze game.", [("one", "echo: one")])


def test_history_trimmed_to_budget(make_router: MakeRouter) -> None:
    engine = FakeEngine(budgets={"maze": 400})
    router, engine, replies = make_router(engine=engine, max_history_tokens=300, max_tokens=150)
    for i in range(8):
        send(router, sessionId="s", message=f"message number {i} " + "w" * 30)
        replies.wait(i + 1)
    for request in engine.requests:
        assert len(request.prompt_token_ids) + request.sampling.max_tokens <= 400
        assert len(request.prompt_token_ids) <= 300
    assert engine.user_turns()[-1].startswith("message number 7")
    assert len(engine.user_turns()) < 8


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_reasoning_stripped(make_router: MakeRouter, mode: str) -> None:
    router, engine, replies = make_router()
    engine.think = mode
    send(router, sessionId="s", message="q")
    assert replies.wait(1)[0][1] == "echo: q"
    assert router.store.get(("maze", "s")).turns == [("q", "echo: q")]


def test_reasoning_kept_without_skip_thinking(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(skip_thinking=False)
    engine.think = "closed"
    send(router, sessionId="s", message="q")
    assert "<think>" in replies.wait(1)[0][1]


def test_empty_answer_is_an_error(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(engine=FakeEngine(reply=lambda p, r: "<think>only</think>"))
    send(router, sessionId="s", message="q")
    assert replies.wait(1)[0][1].startswith("Error: ")
    assert router.store.get(("maze", "s")) is None


def test_bad_input_and_unknown_topic(make_router: MakeRouter) -> None:
    router, engine, replies = make_router()
    router.handle_message("maze/user_input", b"\xff\xfe not utf-8")
    router.handle_message("maze/user_input", b"42")
    router.handle_message("nobody/user_input", b"{}")
    send(router, sessionId="s", message="")
    items = replies.wait(3)
    assert ("maze/assistant_response/s", "Error: empty message") in items
    raw = [p for t, p in items if t.startswith("maze/assistant_response/default-")]
    assert sorted(raw) == ["echo: 42", "echo: \ufffd\ufffd not utf-8"]


def test_stop_answers_pending(make_router: MakeRouter) -> None:
    router, engine, replies = make_router(engine=FakeEngine(delay=5))
    send(router, sessionId="s", message="a")
    send(router, sessionId="s", message="b")
    wait_until(lambda: len(engine.requests) == 1)
    router.stop()
    assert [p for _, p in replies.items] == [SHUTTING_DOWN, SHUTTING_DOWN]
    assert engine.cancelled
    send(router, sessionId="s", message="late")
    assert replies.items[-1][1] == SHUTTING_DOWN


def test_never_publishes_on_reserved_topics(make_router: MakeRouter) -> None:
    router, engine, replies = make_router()
    router.publish("maze/user_input", "x")
    router.publish("maze/assistant_response/#", "x")
    assert replies.items == []


QWQ_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def qwq_like_tokenizer() -> Tokenizer:
    """A copy of the fake engine's tokenizer (shared, cached) whose template opens <think>."""
    hf = copy.deepcopy(tiny_tokenizer().hf)
    hf.chat_template = QWQ_LIKE_TEMPLATE
    return Tokenizer(hf)


def test_prompt_opened_reasoning_cut_off_by_max_tokens_is_a_clear_error(make_router: MakeRouter) -> None:
    """QwQ's template opens <think> in the prompt: a completion that never reaches </think>
    is all reasoning, so it must not be sent as the answer."""
    engine = FakeEngine(reply=lambda prompt, request: "Hmm, the user asks about mazes. Let me")
    engine.tokenizer = qwq_like_tokenizer()
    assert engine.tokenizer.opens_reasoning
    router, _, replies = make_router(engine)
    send(router, sessionId="s1", message="hello", maxTokens=6)
    [(_, reply)] = replies.wait(1)
    assert reply.startswith("Error: the model was still reasoning")


def test_prompt_opened_reasoning_is_stripped_up_to_the_close(make_router: MakeRouter) -> None:
    engine = FakeEngine(reply=lambda prompt, request: "the user greets me.\n</think>\n\nHello!")
    engine.tokenizer = qwq_like_tokenizer()
    router, _, replies = make_router(engine)
    send(router, sessionId="s1", message="hello")
    assert replies.wait(1) == [("maze/assistant_response/s1", "Hello!")]


def test_a_request_states_its_own_deadline(make_router: MakeRouter) -> None:
    """Issue 15 item 17: `timeoutS` (capped by --request_timeout): at its deadline the request
    gets the timeout error, and the late answer is never published (a client that gave up
    would take it as the answer to its next question)."""
    router, engine, replies = make_router(FakeEngine(delay=0.6), request_timeout=0.4)
    send(router, sessionId="own", message="quick", timeoutS=0.1)
    send(router, sessionId="cap", message="capped", timeoutS=1000)
    items = replies.wait(2, timeout=3)
    time.sleep(0.5)  # the engine's late answers come and go unpublished
    assert replies.on("maze/assistant_response/own") == [
        "Error: no answer within 0.1 s. Please try again."]
    assert replies.on("maze/assistant_response/cap") == [
        "Error: no answer within 0.4 s. Please try again."]
    assert len(replies.items) == 2 and items[0][0] == "maze/assistant_response/own"
    send(router, sessionId="bad", message="x", timeoutS=-1)
    assert replies.wait(3)[-1][1] == "Error: timeoutS must be a number in (0, 86400], got -1"


def test_a_turn_ended_while_its_generation_is_submitted_is_cancelled_once(
    make_router: MakeRouter,
) -> None:
    """The turn times out (or its client goes away) on another thread while the engine takes
    its request: the thread that ended it and the one that submitted it both see a generation
    to cancel; the engine hears of it once."""
    holder: list[ChatRig] = []

    class EndedDuringSubmit(FakeEngine):
        def submit(self, request):  # type: ignore[no-untyped-def]
            super().submit(request)
            [turn] = holder[0].lanes.unanswered()
            holder[0].core.expire(turn)  # what the deadline watcher's thread would do now

    router, engine, replies = make_router(EndedDuringSubmit(delay=5.0))
    holder.append(router)
    send(router, sessionId="s", message="hi")
    replies.wait(1)
    assert replies.items[0][1].startswith("Error: no answer within")
    assert engine.cancelled == [engine.requests[0].request_id]
