import pytest

from agent.core.sessions import MemorySessionStore, Session, resolve_system_prompt


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_put_get_copies() -> None:
    store = MemorySessionStore(10, 60)
    store.put(("p", "s"), Session("sys", [("u", "a")]))
    got = store.get(("p", "s"))
    assert got == Session("sys", [("u", "a")])
    got.turns.append(("x", "y"))
    assert store.get(("p", "s")).turns == [("u", "a")]  # the store is changed by put only
    assert store.get(("p", "other")) is None
    assert store.get(("q", "s")) is None  # sessions are per project


def test_idle_expiry() -> None:
    clock = Clock()
    store = MemorySessionStore(10, idle_timeout=60, clock=clock)
    store.put(("p", "a"), Session("sys"))
    store.put(("p", "b"), Session("sys"))
    clock.now += 50
    assert store.get(("p", "a")) is not None  # a use resets the idle time
    clock.now += 20
    assert store.get(("p", "b")) is None
    assert store.get(("p", "a")) is not None
    clock.now += 61
    assert len(store) == 0


def test_lru_eviction() -> None:
    clock = Clock()
    store = MemorySessionStore(max_sessions=2, idle_timeout=3600, clock=clock)
    store.put(("p", "a"), Session("A"))
    store.put(("p", "b"), Session("B"))
    store.get(("p", "a"))
    store.put(("p", "c"), Session("C"))
    assert store.get(("p", "b")) is None
    assert sorted(key[1] for key in store.keys(project="p")) == ["a", "c"]


def test_delete_and_keys() -> None:
    store = MemorySessionStore(10, 60)
    store.put(("p", "a"), Session("A"))
    store.put(("q", "b"), Session("B"))
    assert store.keys("q") == [("q", "b")]
    assert store.delete(("p", "a")) and not store.delete(("p", "a"))


def test_system_prompt_rule() -> None:
    session = Session("kept")
    assert resolve_system_prompt(None, None, "default") == "default"
    assert resolve_system_prompt(None, session, "default") == "kept"
    assert resolve_system_prompt("new", session, "default") == "new"


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        MemorySessionStore(0, 60)
