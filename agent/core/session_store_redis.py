"""Session histories in Redis, shared by several agents (``--session_store redis://...``).

The same interface and semantics as ``MemorySessionStore``: one JSON value per
(project, session) whose Redis TTL is the idle timeout (every use renews it),
and a sorted set of last-use times that lists the sessions and evicts the least
recently used beyond ``max_sessions`` (best effort: boxes may overshoot by the
puts in flight). Each operation is one Lua script, so it is atomic on the
server; times come from the Redis server's clock, never the boxes'.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit, urlunsplit

from agent.core.sessions import Session, SessionKey

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")
KEY_PREFIX = "vllm_deploy:"

# Scores are the server's time in microseconds, as exact integer strings (Lua would print
# a number this large in a rounded exponent form).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function us(x) return string.format('%.0f', x) end
"""
# KEYS[1] session key, KEYS[2] index; ARGV[1] index member, ARGV[2] idle ms
_GET = _NOW + """
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], us(now), ARGV[1])
return value
"""
# KEYS[1] session key, KEYS[2] index; ARGV: member, idle ms, value, max sessions, key prefix
_PUT = _NOW + """
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], us(now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', us(now - tonumber(ARGV[2]) * 1000))
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], extra)
  for i = 1, #old, 2 do redis.call('DEL', ARGV[5] .. old[i]) end
end
return 0
"""
# KEYS[1] index; ARGV[1] idle ms: forgets expired entries, lists the rest
_LIST = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', us(now - tonumber(ARGV[1]) * 1000))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class SessionStoreError(ValueError):
    """``--session_store`` cannot be used: a bad URL, or Redis cannot be reached."""


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisSessionStore:
    """Sessions under ``<prefix>s:<JSON [project, session]>``, their index under ``<prefix>index``."""

    def __init__(self, url: str, max_sessions: int, idle_timeout: float,
                 prefix: str = KEY_PREFIX, timeout: float = 5.0) -> None:
        if max_sessions < 1 or idle_timeout <= 0:
            raise ValueError("max_sessions must be >= 1 and idle_timeout > 0")
        if urlsplit(url).scheme not in SCHEMES:
            raise SessionStoreError(
                f"--session_store {redacted(url)!r}: expected 'memory' or redis://HOST:PORT/DB "
                "(rediss:// for TLS, unix:///path/to/socket)")
        try:
            import redis
        except ImportError:
            raise SessionStoreError("--session_store redis://... needs the redis package: "
                                    "pip install 'redis>=5'") from None
        self.max_sessions = max_sessions
        self.idle_ms = max(1, round(idle_timeout * 1000))
        self.prefix = prefix
        self._index = prefix + "index"
        self._errors = redis.RedisError
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True)
            self._redis.ping()
        except (ValueError, redis.RedisError) as exc:
            raise SessionStoreError(f"--session_store {redacted(url)}: cannot use Redis: {exc}") from None
        self._get = self._redis.register_script(_GET)
        self._put = self._redis.register_script(_PUT)
        self._list = self._redis.register_script(_LIST)
        log.info("session histories in Redis at %s (keys %s*)", redacted(url), prefix)

    @staticmethod
    def _member(key: SessionKey) -> str:
        return json.dumps(list(key), ensure_ascii=False)

    def _key(self, member: str) -> str:
        return f"{self.prefix}s:{member}"

    def get(self, key: SessionKey) -> Session | None:
        member = self._member(key)
        value = self._get(keys=[self._key(member), self._index], args=[member, self.idle_ms])
        if value is None:
            return None
        data = json.loads(value)
        return Session(data["system_prompt"], [(u, a) for u, a in data["turns"]])

    def put(self, key: SessionKey, session: Session) -> None:
        """Never raises: a Redis failure here costs this turn its place in the history (logged),
        not its reply."""
        member = self._member(key)
        value = json.dumps({"system_prompt": session.system_prompt, "turns": session.turns},
                           ensure_ascii=False)
        try:
            self._put(keys=[self._key(member), self._index],
                      args=[member, self.idle_ms, value, self.max_sessions, self.prefix + "s:"])
        except self._errors as exc:
            log.error("saving session %s/%s in Redis failed: %s", *key, exc)

    def delete(self, key: SessionKey) -> bool:
        member = self._member(key)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(member))
            pipe.zrem(self._index, member)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def keys(self, project: str | None = None) -> list[SessionKey]:
        members = self._list(keys=[self._index], args=[self.idle_ms])
        found = [tuple(json.loads(m)) for m in members]
        return [(p, s) for p, s in found if project is None or p == project]

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        self._redis.close()
