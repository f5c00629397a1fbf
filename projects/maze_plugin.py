"""The maze game's own topics (PROTOCOL.md part B): ``maze/state`` -> one JSON hint on
``maze/hint/<sessionId>``, and its wall breaks per session.

A plug-in (``projects.plugins``): the state goes to the host as a turn of the maze
project's conversation (the states' own rate limit, only the newest state waiting behind
the one being answered, timeouts, history);
the game's rules (state message, path, effects) are ``projects.maze_rules``. This module
keeps each session's wall-break count and turns every answer, error included, into the
one JSON object the game parses. Templates may set ``max_breaks``; a template, clear or
delete restores or forgets the breaks, and is acknowledged on the hint topic.
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
from typing import Any

from projects.maze_rules import (
    DEFAULT_MAX_BREAKS,
    MAX_BREAKS,
    MazeState,
    build_hint,
    error_reply,
    parse_state,
)
from projects.plugins import Answer, PluginHost

log = logging.getLogger(__name__)

REQUESTS, REPLIES = ("state",), ("hint",)
DEFAULT_SESSION = "default"  # what the old maze server used for a state without sessionId
_SCAN = 64 * 1024
_SESSION_RE = re.compile(rb'"sessionId"\s*:\s*("(?:[^"\\]|\\.){1,256}"|-?\d{1,64})')


@dataclass
class _Breaks:
    maximum: int
    remaining: int
    used_at: float


class BreaksBook:
    """Wall breaks per maze session: bounded like the sessions (LRU, idle expiry). Its lock
    guards the counts only: no path search runs under it, so one session's hint never waits
    for another's."""

    def __init__(self, max_sessions: int, idle_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default_max = DEFAULT_MAX_BREAKS
        self._max_sessions, self._idle, self._clock = max_sessions, idle_timeout, clock
        self._lock = threading.Lock()
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
        with self._lock:
            return self._entry(sid).remaining

    def spend(self, sid: str, used: int) -> int:
        with self._lock:
            entry = self._entry(sid)
            entry.remaining = max(0, entry.remaining - used)
            return entry.remaining

    def reset(self, sid: str, maximum: int | None = None) -> None:
        """Back to the session's maximum (or a new one)."""
        with self._lock:
            entry = self._entry(sid)
            if maximum is not None:
                entry.maximum = maximum
            entry.remaining = entry.maximum

    def reset_all(self) -> None:
        with self._lock:
            for entry in self._items.values():
                entry.remaining = entry.maximum

    def forget(self, sid: str | None = None) -> None:
        """One session's count, or every one for None."""
        with self._lock:
            if sid is None:
                self._items.clear()
            else:
                self._items.pop(sid, None)


class MazePlugin:
    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.hint_root = host.topic(REPLIES[0]) + "/"
        self.breaks = BreaksBook(host.max_sessions, host.session_timeout)

    # ---- MQTT thread ----

    def handle(self, name: str, payload: bytes, ack: Any) -> None:
        """A state on ``maze/state``; its hint request takes ``ack`` with it."""
        host = self.host
        if len(payload) > host.max_payload_bytes:
            sid = self._scan_session(payload)
            self._error(sid, self.hint_root + sid, f"the state is too large ({len(payload)} "
                        f"bytes; the limit is {host.max_payload_bytes} bytes)")
            return
        data = _json_object(payload)
        if data is None:
            self._error(DEFAULT_SESSION, self.hint_root + DEFAULT_SESSION,
                        "the state must be a JSON object")
            return
        sid = data.get("sessionId")
        sid = str(sid) if isinstance(sid, (int, float)) and not isinstance(sid, bool) else sid
        if not isinstance(sid, str) or not sid.strip():
            sid = DEFAULT_SESSION
        problem = host.session_problem(sid)
        if problem:
            log.warning("maze state with an unusable sessionId: %s", problem)
            return
        reply_topic = host.confine(self.hint_root, data.get("replyTopic"), self.hint_root + sid)
        try:
            state = parse_state(data)
            prompt = _system_prompt(data)
        except ValueError as exc:
            self._error(sid, reply_topic, str(exc))
            return
        host.ask_state(session_id=sid, message=state.message(), reply_topic=reply_topic,
                       shape=partial(self._shape, sid, state), system_prompt=prompt,
                       client_id=_text(data.get("clientId")),
                       request_id=_text(data.get("requestId")), ack=ack)

    def _error(self, sid: str, topic: str, message: str) -> None:
        log.warning("bad maze state for session %.80s: %s", sid, message)
        self.host.rejected()
        self._publish(topic, error_reply(message, self.breaks.remaining(sid)))

    # ---- worker threads ----

    def _shape(self, sid: str, state: MazeState, answer: Answer) -> str:
        """The hint for the model's answer, or the error JSON for an error.

        A model that said nothing still gets the game its path: an empty hint, not an error.
        """
        text, ok = ("", True) if answer.empty else (answer.text, answer.ok)
        remaining = self.breaks.remaining(sid)
        if not ok:
            return json.dumps(error_reply(text.removeprefix("Error: "), remaining))
        # The search runs outside the book's lock. Only this session's own turns spend its
        # breaks, one at a time (one turn in flight per session), so none is spent twice.
        hint, used = build_hint(text, state, remaining)
        hint["breaks_remaining"] = self.breaks.spend(sid, used)
        return json.dumps(hint, allow_nan=False)

    # ---- the control topics' hooks ----

    def check_template(self, data: dict) -> bool:
        max_breaks = data.get("max_breaks")
        if max_breaks is not None and (isinstance(max_breaks, bool) or not isinstance(max_breaks, int)
                                       or not 0 <= max_breaks <= MAX_BREAKS):
            raise ValueError(f"max_breaks must be an integer from 0 to {MAX_BREAKS} (no path on "
                             f"the largest map accepted, {MAX_BREAKS} cells, crosses more walls)")
        return max_breaks is not None

    def template_set(self, session_id: str | None, data: dict, reset: bool) -> None:
        max_breaks = data.get("max_breaks")
        if session_id is None:
            if max_breaks is not None:
                self.breaks.default_max = max_breaks
            return
        if reset or max_breaks is not None:
            self.breaks.reset(session_id, max_breaks)
        self._acknowledge(session_id, "Template updated")

    def history_cleared(self, session_id: str | None) -> None:
        if session_id is None:
            self.breaks.reset_all()
        else:
            self.breaks.reset(session_id)
            self._acknowledge(session_id, "History cleared")

    def sessions_deleted(self, session_id: str | None) -> None:
        self.breaks.forget(session_id)

    def control_failed(self, session_id: str, message: str) -> None:
        self._error(session_id, self.hint_root + session_id, message)

    def _acknowledge(self, sid: str, hint: str) -> None:
        self._publish(self.hint_root + sid, {"hint": hint, "breaks_remaining": self.breaks.remaining(sid)})

    def _publish(self, topic: str, obj: dict) -> None:
        self.host.publish(topic, json.dumps(obj, allow_nan=False))

    def _scan_session(self, payload: bytes) -> str:
        """The sessionId of a payload too large to parse, found near either end, or the default."""
        ends = payload if len(payload) <= 2 * _SCAN else payload[:_SCAN] + b"\n" + payload[-_SCAN:]
        match = _SESSION_RE.search(ends)
        if match:
            try:
                value = json.loads(match.group(1))
            except ValueError:
                value = None
            sid = str(value) if value is not None else ""
            if sid.strip() and self.host.session_problem(sid) is None:
                return sid
        return DEFAULT_SESSION


def make_plugin(host: PluginHost) -> MazePlugin:
    return MazePlugin(host)


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


def _json_object(payload: bytes) -> dict | None:
    """The payload as a JSON object; None when it is not UTF-8 JSON holding an object."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
