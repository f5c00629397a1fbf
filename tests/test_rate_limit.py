import pytest

from agent.core.rate_limit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window() -> None:
    clock = Clock()
    limiter = RateLimiter(3, window=10, clock=clock)
    for t in (0, 1, 2):
        clock.now = t
        assert limiter.allow("s")
    clock.now = 5
    assert not limiter.allow("s")
    assert limiter.allow("other")  # per key
    clock.now = 10  # the request at t=0 left the window
    assert limiter.allow("s")
    assert not limiter.allow("s")


def test_refused_requests_do_not_count() -> None:
    clock = Clock()
    limiter = RateLimiter(1, window=10, clock=clock)
    assert limiter.allow("s")
    for t in range(1, 10):
        clock.now = t
        assert not limiter.allow("s")
    clock.now = 10
    assert limiter.allow("s")


def test_memory_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(5, window=10, max_keys=100, clock=clock)
    for i in range(1000):
        limiter.allow(i)
    assert len(limiter) == 100
    clock.now = 11
    limiter.allow("x")
    assert len(limiter) == 1  # idle keys are forgotten


def test_bad_args() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0, 10)
