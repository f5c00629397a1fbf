"""The Redis session store against a real Redis: the same behaviour tests as the memory store
(run on both), then what only a shared store has (two boxes, TTLs, prefixes, errors)."""

from __future__ import annotations

import logging
import random
import string
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.core.session_store_redis import RedisSessionStore, SessionStoreError
from agent.core.sessions import MemorySessionStore, Session, SessionStore
from agent.service.config import AgentConfig
from agent.service.session_store import open_store
from tests.redis_server import REDIS_URL, delete_prefix, redis_prefix, require_redis

__all__ = ["redis_prefix"]  # a fixture used below

MakeStore = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """Stores of one kind; two Redis stores made in one test share their keys (two boxes)."""
    if request.param == "memory":
        yield lambda max_sessions=10, idle_timeout=60.0: MemorySessionStore(max_sessions, idle_timeout)
        return
    require_redis()
    prefix = f"test-{random.getrandbits(32):08x}:"
    stores: list[RedisSessionStore] = []

    def make(max_sessions: int = 10, idle_timeout: float = 60.0) -> SessionStore:
        stores.append(RedisSessionStore(REDIS_URL, max_sessions, idle_timeout, prefix=prefix))
        return stores[-1]

    yield make
    for store in stores:
        store.close()
    delete_prefix(prefix)


def text(rng: random.Random, n: int = 12) -> str:
    """Random text with the characters that could break a key or JSON: ':', '"', '\\', non-ASCII."""
    return "".join(rng.choice(string.ascii_letters + ':"\\/ é中\n') for _ in range(n))


def session(rng: random.Random, turns: int = 3) -> Session:
    return Session(text(rng), [(text(rng), text(rng)) for _ in range(turns)])


# ---- the interface, on both stores ----

def test_put_get_round_trip_and_copies(make_store: MakeStore) -> None:
    rng = random.Random()
    store = make_store()
    key, other = (text(rng, 6), text(rng)), (text(rng, 6), text(rng))
    original = session(rng)
    store.put(key, original)
    got = store.get(key)
    assert got == original and got is not original
    got.turns.append(("x", "y"))
    assert store.get(key) == original  # changed by put only
    assert store.get(other) is None
    assert store.get((key[0] + "x", key[1])) is None  # sessions are per project


def test_idle_sessions_expire_and_a_use_renews(make_store: MakeStore) -> None:
    store = make_store(idle_timeout=0.6)
    store.put(("p", "a"), Session("A"))
    store.put(("p", "b"), Session("B"))
    time.sleep(0.35)
    assert store.get(("p", "a")) is not None  # renews a's idle time
    time.sleep(0.35)  # b idle 0.7 s, a 0.35 s
    assert store.get(("p", "b")) is None
    assert store.keys() == [("p", "a")]
    time.sleep(0.7)
    assert store.keys() == [] and len(store) == 0  # type: ignore[arg-type]


def test_least_recently_used_go_beyond_the_cap(make_store: MakeStore) -> None:
    store = make_store(max_sessions=2)
    store.put(("p", "a"), Session("A"))
    store.put(("p", "b"), Session("B"))
    store.get(("p", "a"))
    store.put(("p", "c"), Session("C"))
    assert store.get(("p", "b")) is None
    assert sorted(s for _, s in store.keys("p")) == ["a", "c"]


def test_delete_and_keys_per_project(make_store: MakeStore) -> None:
    store = make_store()
    store.put(("p", "a"), Session("A"))
    store.put(("q", "b"), Session("B"))
    assert store.keys("q") == [("q", "b")]
    assert sorted(store.keys()) == [("p", "a"), ("q", "b")]
    assert store.delete(("p", "a")) and not store.delete(("p", "a"))
    assert store.get(("p", "a")) is None and store.keys("p") == []


def test_concurrent_puts_respect_the_cap(make_store: MakeStore) -> None:
    store = make_store(max_sessions=5)
    rng = random.Random()
    sessions = {("p", f"s{i}"): session(rng, 1) for i in range(40)}

    def put(keys: list) -> None:
        for key in keys:
            store.put(key, sessions[key])

    keys = list(sessions)
    threads = [threading.Thread(target=put, args=(keys[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = store.keys()
    assert len(kept) == 5
    assert all(store.get(k) == sessions[k] for k in kept)


# ---- only the shared store ----

def test_two_boxes_share_sessions(redis_prefix: str) -> None:
    rng = random.Random()
    box_a = RedisSessionStore(REDIS_URL, 10, 60, prefix=redis_prefix)
    box_b = RedisSessionStore(REDIS_URL, 10, 60, prefix=redis_prefix)
    elsewhere = RedisSessionStore(REDIS_URL, 10, 60, prefix=redis_prefix + "other:")
    first = session(rng, 1)
    box_a.put(("p", "s"), first)
    second = box_b.get(("p", "s"))
    assert second == first
    second.turns.append((text(rng), text(rng)))
    box_b.put(("p", "s"), second)
    assert box_a.get(("p", "s")) == second
    assert elsewhere.get(("p", "s")) is None and elsewhere.keys() == []


def test_the_idle_timeout_is_the_keys_ttl(redis_prefix: str) -> None:
    store = RedisSessionStore(REDIS_URL, 10, 30, prefix=redis_prefix)
    store.put(("p", "s"), Session("S"))
    [key] = [k for k in store._redis.scan_iter(match=f"{redis_prefix}s:*")]
    assert 29_000 < store._redis.pttl(key) <= 30_000


def test_open_store_reads_the_flag(redis_prefix: str) -> None:
    topic_prefix = redis_prefix.rstrip(":")
    assert isinstance(open_store(AgentConfig()), MemorySessionStore)
    store = open_store(AgentConfig(session_store=REDIS_URL, topic_prefix=topic_prefix,
                                   max_concurrent_sessions=3, session_timeout=7))
    assert isinstance(store, RedisSessionStore)
    assert (store.max_sessions, store.idle_ms) == (3, 7000)
    store.put(("p", "s"), Session("S"))
    assert any(store._redis.scan_iter(match=f"vllm_deploy:{topic_prefix}/s:*"))
    delete_prefix(f"vllm_deploy:{topic_prefix}/")


@pytest.mark.parametrize("url, says", [
    ("redis:/127.0.0.1:6379", "cannot use Redis"),
    ("http://127.0.0.1:6379/0", "expected 'memory' or redis://HOST:PORT/DB"),
    ("redis://127.0.0.1:notaport/0", "cannot use Redis"),
    ("redis://user:s3cret-pw@127.0.0.1:1/0", "cannot use Redis"),  # nobody listens on port 1
])
def test_a_bad_url_or_no_redis_is_a_clear_error(url: str, says: str) -> None:
    pytest.importorskip("redis")
    with pytest.raises(SessionStoreError, match=says) as info:
        open_store(AgentConfig(session_store=url))
    assert "--session_store" in str(info.value) and "s3cret-pw" not in str(info.value)


def test_a_failed_put_costs_the_history_not_the_reply(
    redis_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    import redis

    store = RedisSessionStore(REDIS_URL, 10, 60, prefix=redis_prefix)

    def down(**kwargs: object) -> None:
        raise redis.ConnectionError("Redis went away")

    store._put = down  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        store.put(("p", "s"), Session("S"))  # no exception: the router still replies
    assert "saving session p/s in Redis failed" in caplog.text
