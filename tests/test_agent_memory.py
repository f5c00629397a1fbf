"""The agent runs for months: whatever it keeps per session or per request (sessions, the
requestIds it has seen, rate-limit windows, latency samples, cached prompt heads) must stay
bounded, however many sessions come and go."""

from __future__ import annotations

import gc
import json
import sys

from agent.mqtt.acks import Ack
from agent.mqtt.topics import Topics
from agent.service.config import AgentConfig
from projects import ProjectSpec
from tests.chat_rig import ChatRig
from tests.fake_engine import InstantEngine

PROJECTS = {"general": ProjectSpec("general", "You are helpful.")}
# Beyond the largest built-in cap (10,000 requestIds seen, 10,000 rate-limit keys), so that
# every structure is full before the second count.
FILL, MEASURED = 12_000, 4_000


def memory() -> tuple[int, int]:
    """(objects the cyclic GC tracks, memory blocks allocated): all objects, strings too."""
    gc.collect()
    return len(gc.get_objects()), sys.getallocatedblocks()


def test_memory_stays_bounded_over_many_sessions() -> None:
    config = AgentConfig(projects=("general",), max_concurrent_sessions=50)
    replies = [0]

    def publish(topic: str, payload: str, **kwargs: object) -> None:
        replies[0] += 1

    router = ChatRig(config, InstantEngine(), PROJECTS, Topics(config.projects), publish)
    router.start()

    def serve(first: int, count: int) -> None:
        for i in range(first, first + count):
            payload = json.dumps({"sessionId": f"s{i}", "requestId": f"r{i}",
                                  "message": f"question {i} " + "x" * (i % 50),
                                  "replyTopic": f"general/assistant_response/c/s{i}"})
            router.handle_message("general/user_input", payload.encode(), None,
                                  Ack(lambda mid, qos: None, i, 1, connection=1,
                                      current=lambda: 1))
        # a second turn of some recent sessions: their history is kept, up to the cap
        for i in range(first + count - 20, first + count):
            payload = json.dumps({"sessionId": f"s{i}", "message": "and then?",
                                  "replyTopic": f"general/assistant_response/c/s{i}"})
            router.handle_message("general/user_input", payload.encode())

    try:
        serve(0, FILL)
        objects, blocks = memory()
        serve(FILL, MEASURED)
        objects_after, blocks_after = memory()
    finally:
        router.stop()
    assert replies[0] == FILL + MEASURED + 40
    assert len(router.store) <= config.max_concurrent_sessions
    # A leak of one object per request would show 4,000; what moves here is a dict resizing.
    assert objects_after - objects < 200, (objects, objects_after)
    assert blocks_after - blocks < 1_000, (blocks, blocks_after)
