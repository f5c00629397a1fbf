"""The Redis the store tests use (127.0.0.1:6379, db 15 unless REDIS_TEST_URL says otherwise),
with a key prefix of its own per test that is deleted afterwards."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")


def require_redis() -> None:
    """Fails under CI (where Redis runs) and skips elsewhere when Redis cannot be reached."""
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        message = f"Redis at {REDIS_URL} not reachable ({exc}); start redis-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix in the test Redis; its keys are gone after the test."""
    require_redis()
    prefix = f"test-{secrets.token_hex(4)}:"
    yield prefix
    delete_prefix(prefix)
