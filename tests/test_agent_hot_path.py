"""The agent's request path: acknowledgement after the reply (agent.mqtt.acks), the turn started on
the receiving thread when its prompt is short, the engine's answer served on the spot when
it comes inside ``submit``, the cached system-prompt head, the tokenizer's direct encode, and
the deadline watcher letting go of answered requests."""

from __future__ import annotations

import copy
import gc
import json
import random
import string
import threading
import time
from collections.abc import Iterator

import pytest

from agent.core.conversation import INLINE_CHARS
from agent.core.deadlines import DeadlineWatcher
from agent.core.prompt_builder import PromptBuilder, to_messages
from agent.core.sessions import Session
from agent.core.turns import Turn
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.topics import Topics
from agent.service.config import AgentConfig
from engine.api import GenerationRequest
from engine.tokenizer import Tokenizer
from projects import ProjectSpec
from tests.chat_rig import ChatRig
from tests.fake_engine import FakeEngine, InstantEngine, MarkingTokenizer, tiny_tokenizer

PROJECTS = {"general": ProjectSpec("general", "You are helpful.")}
REPLY_TOPIC = "general/assistant_response/t/s1"


def random_text(rng: random.Random, n: int) -> str:
    alphabet = string.ascii_letters + string.digits + " \n\t.,!?éü日本🙂<>|"
    return "".join(rng.choice(alphabet) for _ in range(n))


class Events:
    """Publish and acknowledgements in the order they happened."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []
        self.threads: list[str] = []
        self.cond = threading.Condition()

    def publish(self, topic: str, payload: str, **kwargs: object) -> None:
        with self.cond:
            self.items.append(("publish", payload))
            self.threads.append(threading.current_thread().name)
            self.cond.notify_all()

    def ack(self, mid: int) -> Ack:
        def send(mid: int, qos: int) -> None:
            with self.cond:
                self.items.append(("ack", mid))
                self.cond.notify_all()

        return Ack(send, mid, 1, connection=1, current=lambda: 1)

    def wait(self, n: int) -> list[tuple[str, object]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, 5), self.items
            return list(self.items)


class ThreadRecordingEngine(InstantEngine):
    """Answers inside ``submit``, on the caller's thread (which it records)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def submit(self, request: GenerationRequest) -> None:
        self.threads.append(threading.current_thread().name)
        super().submit(request)


@pytest.fixture
def router_for() -> Iterator:
    routers: list[ChatRig] = []

    def make(engine: FakeEngine, **overrides: object) -> tuple[ChatRig, Events]:
        config = AgentConfig(projects=("general",), **overrides)  # type: ignore[arg-type]
        events = Events()
        router = ChatRig(config, engine, PROJECTS, Topics(config.projects), events.publish)
        router.start()
        routers.append(router)
        return router, events

    yield make
    for router in routers:
        router.stop()


def request(message: str = "hi", request_id: str = "r1") -> bytes:
    return json.dumps({"sessionId": "s1", "message": message, "requestId": request_id,
                       "replyTopic": REPLY_TOPIC}).encode()


def test_a_request_is_acknowledged_after_its_reply_and_a_copy_with_it(router_for) -> None:
    """A slow engine: the ack waits for the reply; a copy delivered again meanwhile (same
    requestId) gets no second reply, and its ack goes out with the first's, after it."""
    router, events = router_for(FakeEngine(delay=0.2))
    first, again = events.ack(1), events.ack(2)
    router.handle_message("general/user_input", request(), None, first)
    router.handle_message("general/user_input", request(), None, again)
    assert first.held and again.held and events.items == []
    assert events.wait(3) == [("publish", "echo: hi"), ("ack", 1), ("ack", 2)]
    first()  # once only
    assert len(events.items) == 3


def test_replies_given_at_once_leave_the_ack_to_the_receiving_thread(router_for) -> None:
    """Refused or bad requests (and copies of answered ones) are replied to before
    handle_message returns: it holds no ack, the receiving thread sends it."""
    router, events = router_for(FakeEngine(), max_requests_per_session=1)
    acks = [events.ack(i) for i in range(4)]
    router.handle_message("general/user_input", request("one", "a"), None, acks[0])
    events.wait(1)
    for ack, payload in zip(acks[1:], [request("two", "b"), b'{"sessionId": "s1"}',
                                       request("one", "a")], strict=True):
        router.handle_message("general/user_input", payload, None, ack)
        assert not ack.held
    assert acks[0].held


def test_ack_is_sent_once_and_only_on_its_own_connection() -> None:
    sent: list[int] = []
    connection = [1]
    ack = Ack(lambda mid, qos: sent.append(mid), 9, 1, 1, lambda: connection[0])
    threads = [threading.Thread(target=ack) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sent == [9]
    stale = Ack(lambda mid, qos: sent.append(mid), 10, 1, 1, lambda: connection[0])
    connection[0] = 2  # reconnected: the broker sends the message again, with its own ack
    stale()
    assert sent == [9]
    NO_ACK()
    assert not NO_ACK.hold().held


def test_answered_turns_are_freed_by_reference_counting(router_for) -> None:
    """A turn's engine request refers back to it (on_done); once answered, nothing of it may
    be left for the cyclic GC: that cost the agent ~50 us per request (docs/BENCHMARKS.md)."""
    router, events = router_for(InstantEngine())
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds goes to gc.garbage, not away
    try:
        for i in range(20):
            router.handle_message("general/user_input", request(f"m{i}", f"r{i}"), None,
                                  events.ack(i))
        events.wait(40)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, (Turn, GenerationRequest))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []


def test_short_prompts_start_on_the_receiving_thread_long_ones_on_a_worker(router_for) -> None:
    engine = ThreadRecordingEngine()
    router, events = router_for(engine)
    router.handle_message("general/user_input", request("short"), None, NO_ACK)
    assert engine.threads == [threading.current_thread().name]  # and answered right there
    assert events.items == [("publish", "pong")]
    assert events.threads == [threading.current_thread().name]
    rng = random.Random()
    history = [(random_text(rng, 900), random_text(rng, 900)) for _ in range(INLINE_CHARS // 1500)]
    router.store.put(("general", "s2"), Session("You are helpful.", history))
    payload = json.dumps({"sessionId": "s2", "message": "long", "replyTopic": REPLY_TOPIC})
    router.handle_message("general/user_input", payload.encode(), None, NO_ACK)
    events.wait(2)
    assert engine.threads[1].startswith("agent-worker")  # and answered there
    assert events.items[1] == ("publish", "pong") and events.threads[1] == engine.threads[1]


def test_a_cached_head_gives_the_same_ids_as_tokenizing_whole() -> None:
    rng = random.Random()
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok)
    assert builder.heads is not None
    for _ in range(12):
        system = random_text(rng, rng.randint(1, 200))
        turns = [(random_text(rng, rng.randint(1, 60)), random_text(rng, rng.randint(1, 60)))
                 for _ in range(rng.randint(1, 4))]  # a first turn takes the lead instead
        message = random_text(rng, rng.randint(1, 80))
        whole = tok.apply_chat_template(to_messages(system, turns, message))
        assert builder._ids(system, turns, message) == whole
        assert builder._ids(system, turns, message) == whole  # now from the cache
    assert len(builder.heads._heads) == 12 and all(builder.heads._heads.values())


def test_no_head_where_the_split_would_change_the_ids() -> None:
    tok = MarkingTokenizer(copy.deepcopy(tiny_tokenizer().hf))
    builder = PromptBuilder(tok)
    rng = random.Random()
    system, message = random_text(rng, 50), random_text(rng, 20)
    assert builder._ids(system, [], message) == tok.encode(
        tok.render_chat(to_messages(system, [], message)))
    assert builder.heads._heads == {system: None}


def test_tokenizer_encodes_through_the_backend_only_where_that_is_the_same() -> None:
    rng = random.Random()
    tok = tiny_tokenizer()
    assert tok.fast_encode
    for _ in range(20):
        text = random_text(rng, rng.randint(0, 100)) + rng.choice(["", "<|im_end|>", "<|im_start|>x"])
        assert tok.encode(text) == list(tok.hf.encode(text, add_special_tokens=False))
    hf = copy.deepcopy(tok.hf)
    hf.split_special_tokens = True  # encodes "<|im_end|>" as text: the backend alone would not
    slow = Tokenizer(hf)
    assert not slow.fast_encode and not PromptBuilder(slow).lock_free
    assert slow.encode("<|im_end|>") == list(hf.encode("<|im_end|>", add_special_tokens=False))


def test_the_watcher_lets_go_of_answered_items_and_still_expires_the_others() -> None:
    expired: list[dict] = []
    fired = threading.Event()
    watcher = DeadlineWatcher(lambda item: (expired.append(item), fired.set()),
                              done=lambda item: item["done"])
    watcher.start()
    try:
        items = [{"done": False} for _ in range(50)]
        for item in items:
            watcher.add(1e9, item)
        for item in items:
            item["done"] = True
        late = {"done": False}
        watcher.add(1e9, late)
        assert len(watcher) == 1  # the 50 answered ones are gone
        soon = {"done": False}
        watcher.add(time.monotonic() + 0.05, soon)
        assert fired.wait(2) and expired == [soon]
    finally:
        watcher.stop()
