"""``maze/state`` -> one JSON hint on ``maze/hint/<sessionId>`` (PROTOCOL.md part B).

The MQTT side only: the state goes through the router like a chat turn (rate
limit, one turn in flight per session, timeouts, history); the game's rules
(state message, path, effects) are ``projects.maze_rules``. This module keeps
each session's wall-break count and turns every answer, error included, into
the one JSON object the game parses.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from agent.acks import NO_ACK, Ack
from agent.config import AgentConfig
from agent.metrics import BAD_REQUEST
from agent.protocol import ChatRequest, json_object, session_id_problem
from agent.reasoning import EMPTY_ANSWER
from agent.router import Router
from agent.topics import MAZE, STATE, Topics
from projects.maze_rules import DEFAULT_MAX_BREAKS, MazeState, build_hint, error_reply, parse_state

log = logging.getLogger(__name__)

DEFAULT_SESSION = "default"  # what the old maze server used for a state without sessionId
_SCAN = 64 * 1024
_SESSION_RE = re.compile(rb'"sessionId"\s*:\s*("(?:[^"\\]|\\.){1,256}"|-?\d{1,64})')


@dataclass
class _Breaks:
    maximum: int
    remaining: int
    used_at: float


class BreaksBook:
    """Wall breaks per maze session: bounded like the sessions (LRU, idle expiry)."""

    def __init__(self, max_sessions: int, idle_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default_max = DEFAULT_MAX_BREAKS
        self._max_sessions, self._idle, self._clock = max_sessions, idle_timeout, clock
        self.lock = threading.RLock()
        self._items: OrderedDict[str, _Breaks] = OrderedDict()

    def _entry(self, sid: str) -> _Breaks:
        now = self._clock()
        while self._items:
            oldest, item = next(iter(self._items.items()))
            if now - item.used_at < self._idle:
                break
            del self._items[oldest]
        entry = self._items.pop(sid, None) or _Breaks(self.default_max, self.default_max, now)
        entry.used_at = now
        self._items[sid] = entry
        while len(self._items) > self._max_sessions:
            self._items.popitem(last=False)
        return entry

    def remaining(self, sid: str) -> int:
        with self.lock:
            return self._entry(sid).remaining

    def spend(self, sid: str, used: int) -> int:
        with self.lock:
            entry = self._entry(sid)
            entry.remaining = max(0, entry.remaining - used)
            return entry.remaining

    def reset(self, sid: str, maximum: int | None = None) -> None:
        """Back to the session's maximum (or a new one)."""
        with self.lock:
            entry = self._entry(sid)
            if maximum is not None:
                entry.maximum = maximum
            entry.remaining = entry.maximum

    def reset_all(self) -> None:
        with self.lock:
            for entry in self._items.values():
                entry.remaining = entry.maximum

    def forget(self, sid: str | None = None) -> None:
        """One session's count, or every one for None."""
        with self.lock:
            if sid is None:
                self._items.clear()
            else:
                self._items.pop(sid, None)


class MazeHints:
    """Subscribed to ``maze/state`` when the maze project is served."""

    def __init__(self, config: AgentConfig, router: Router, topics: Topics) -> None:
        self.config = config
        self.router = router
        self.topics = topics
        self.state_topic = topics.base(MAZE) + STATE
        self.hint_root = topics.hint_root()
        self.breaks = BreaksBook(config.max_concurrent_sessions, config.session_timeout)

    # ---- MQTT thread ----

    def handle(self, topic: str, payload: bytes, ack: Ack = NO_ACK) -> bool:
        """True if ``topic`` is the maze state topic (then it is handled); a hint request takes
        ``ack`` with it (agent.acks)."""
        if topic != self.state_topic:
            return False
        if len(payload) > self.config.max_payload_bytes:
            sid = _scan_session(payload)
            self._error(sid, self.hint_root + sid, f"the state is too large ({len(payload)} "
                        f"bytes; the limit is {self.config.max_payload_bytes} bytes)")
            return True
        data = json_object(payload)
        if data is None:
            self._error(DEFAULT_SESSION, self.hint_root + DEFAULT_SESSION,
                        "the state must be a JSON object")
            return True
        sid = data.get("sessionId")
        sid = str(sid) if isinstance(sid, (int, float)) and not isinstance(sid, bool) else sid
        if not isinstance(sid, str) or not sid.strip():
            sid = DEFAULT_SESSION
        problem = session_id_problem(sid)
        if problem:
            log.warning("maze state with an unusable sessionId: %s", problem)
            return True
        reply_topic = self.topics.confine(self.hint_root, data.get("replyTopic"), self.hint_root + sid)
        try:
            state = parse_state(data)
            prompt = _system_prompt(data)
        except ValueError as exc:
            self._error(sid, reply_topic, str(exc))
            return True
        request = ChatRequest(
            project=MAZE, session_id=sid, message=state.message(), reply_topic=reply_topic,
            system_prompt=prompt, client_id=_text(data.get("clientId")),
            request_id=_text(data.get("requestId")),
        )
        self.router.submit(request, partial(self._shape, sid, state), ack)
        return True

    def _error(self, sid: str, topic: str, message: str) -> None:
        log.warning("bad maze state for session %.80s: %s", sid, message)
        self.router.metrics.rejected(MAZE, BAD_REQUEST)
        self.publish(topic, error_reply(message, self.breaks.remaining(sid)))

    # ---- worker threads ----

    def _shape(self, sid: str, state: MazeState, text: str, ok: bool) -> str:
        """The hint for the model's ``text``, or the error JSON for an error text.

        A model that said nothing still gets the game its path: an empty hint, not an error.
        """
        if text == EMPTY_ANSWER and not ok:
            text, ok = "", True
        with self.breaks.lock:
            if not ok:
                return json.dumps(error_reply(text.removeprefix("Error: "), self.breaks.remaining(sid)))
            hint, used = build_hint(text, state, self.breaks.remaining(sid))
            hint["breaks_remaining"] = self.breaks.spend(sid, used)
        return json.dumps(hint, allow_nan=False)

    # ---- for the control topics ----

    def acknowledge(self, sid: str, hint: str) -> None:
        self.publish(self.hint_root + sid, {"hint": hint, "breaks_remaining": self.breaks.remaining(sid)})

    def error(self, sid: str, message: str) -> None:
        self._error(sid, self.hint_root + sid, message)

    def publish(self, topic: str, obj: dict) -> None:
        self.router.publish(topic, json.dumps(obj, allow_nan=False))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _system_prompt(data: dict) -> str | None:
    """``systemPrompt``, else ``prompt_template`` (a string, or an object's ``content``)."""
    value = data.get("systemPrompt")
    if not isinstance(value, str) or not value.strip():
        value = data.get("prompt_template")
        if isinstance(value, dict):
            value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError("prompt_template must be a string or an object with a 'content' string")
    return value.strip() if value and value.strip() else None


def _scan_session(payload: bytes) -> str:
    """The sessionId of a payload too large to parse, found near either end, or the default."""
    ends = payload if len(payload) <= 2 * _SCAN else payload[:_SCAN] + b"\n" + payload[-_SCAN:]
    match = _SESSION_RE.search(ends)
    if match:
        try:
            value = json.loads(match.group(1))
        except ValueError:
            value = None
        sid = str(value) if value is not None else ""
        if sid.strip() and session_id_problem(sid) is None:
            return sid
    return DEFAULT_SESSION
