from agent.core.dedupe import Deduper


def test_seen_once_then_expires() -> None:
    now = [0.0]
    dedupe = Deduper(ttl=10, max_keys=3, clock=lambda: now[0])
    assert not dedupe.seen(("p", "s", "r1"))
    assert dedupe.seen(("p", "s", "r1"))
    assert not dedupe.seen(("p", "t", "r1"))
    now[0] = 11
    assert not dedupe.seen(("p", "s", "r1"))


def test_bounded() -> None:
    dedupe = Deduper(ttl=100, max_keys=3)
    for i in range(10):
        dedupe.seen(i)
    assert len(dedupe) == 3
    assert dedupe.seen(9) and not dedupe.seen(0)
