"""Control topics of every project (PROTOCOL.md part B): ``P/template``, ``P/clear_history``,
``P/delete_session``, each also with a ``/<sessionId>`` suffix.

They change sessions directly (no generation), on the MQTT thread, through
``SessionAccess.changing`` so that a turn in flight does not write its older
copy of the session back. A project's plug-in (``projects.plugins``) hears of
each change, and of each failure (maze acknowledges on its hint topic).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from agent.core.session_access import SessionAccess
from agent.core.sessions import Session, SessionKey
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.protocol import session_id_problem
from agent.mqtt.topics import Topics
from projects.plugins import Plugin

log = logging.getLogger(__name__)

TEMPLATE_FIELDS = ("template", "system_prompt", "systemPrompt", "prompt_template")
ALL = "all"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ControlError(ValueError):
    """A control message that cannot be carried out; ``str()`` says why."""


class Control:
    def __init__(self, sessions: SessionAccess, topics: Topics, max_payload_bytes: int,
                 plugins: dict[str, Plugin] | None = None,
                 template_problem: Callable[[str, str], str | None] = lambda p, t: None,
                 reply: Callable[[str, str], None] | None = None) -> None:
        """``template_problem(project, text)``: why a template cannot be used, or None.
        ``reply(topic, text)``: publishes a refused template's error to its session."""
        self.sessions = sessions
        self._template_problem = template_problem
        self._reply = reply
        self.topics = topics
        self.max_payload_bytes = max_payload_bytes
        self.plugins = plugins or {}  # project -> its plug-in

    def handle(self, topic: str, payload: bytes, ack: Ack = NO_ACK) -> bool:
        """True if ``topic`` is a control topic (then it is handled). Carried out before this
        returns, so ``ack`` is left to the receiving thread."""
        parsed = self.topics.parse_control(topic)
        if parsed is None:
            return False
        project, action, suffix = parsed
        sid = suffix
        try:
            data = self._payload(payload)
            fields = ("sessionId", "session_id") + (("target",) if action != "template" else ())
            sid = _session(data, fields) or suffix
            if sid is not None and session_id_problem(sid):
                raise ControlError(session_id_problem(sid))
            if action == "template":
                self._template(project, sid, data)
            elif action == "clear_history":
                self._clear(project, sid)
            else:
                self._delete(project, sid)
        except ControlError as exc:
            log.warning("%s of project %s not carried out: %s", action, project, exc)
            plugin = self.plugins.get(project)
            if not sid or sid.lower() == ALL or session_id_problem(sid):
                return True  # no session to tell: the log line is all
            if plugin:
                plugin.control_failed(sid, str(exc))
            elif action == "template" and self._reply is not None:
                self._reply(self.topics.default_reply(project, sid), f"Error: {exc}")
        return True

    def _payload(self, payload: bytes) -> dict:
        if len(payload) > self.max_payload_bytes:
            raise ControlError(f"the message is too large ({len(payload)} bytes)")
        if not payload.strip():
            return {}
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ControlError("the message is not JSON") from None
        if not isinstance(data, dict):
            raise ControlError("the message must be a JSON object")
        return data

    def _template(self, project: str, sid: str | None, data: dict) -> None:
        prompt = _template_text(data)
        plugin = self.plugins.get(project)
        try:
            own_fields = plugin is not None and plugin.check_template(data)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        if prompt is None and not own_fields:
            raise ControlError(f"no template: give one of {', '.join(TEMPLATE_FIELDS)}")
        problem = None if prompt is None else self._template_problem(project, prompt)
        if problem:
            raise ControlError(problem)
        if sid is None:
            if prompt is not None:
                self.sessions.set_default_prompt(project, prompt)
            if plugin is not None:
                plugin.template_set(None, data, False)
            log.info("project %s: new default template for new sessions", project)
            return
        reset = _flag(data.get("reset", True))
        key = (project, sid)
        with self.sessions.changing(project, sid) as store:
            session = store.get(key)
            if prompt is None:
                prompt = session.system_prompt if session else self.sessions.default_prompt(project)
            turns = session.turns if session is not None and not reset else []
            store.put(key, Session(prompt, turns))
        log.info("session %s/%s: template replaced (history %s)", project, sid,
                 "cleared" if reset else "kept")
        if plugin is not None:
            plugin.template_set(sid, data, reset)

    def _targets(self, project: str, sid: str | None) -> list[SessionKey]:
        if sid is None or sid.lower() == ALL:
            return self.sessions.keys(project)
        return [(project, sid)]

    def _clear(self, project: str, sid: str | None) -> None:
        every = sid is None or sid.lower() == ALL
        with self.sessions.changing(project, None if every else sid) as store:
            keys = self._targets(project, sid)
            for key in keys:
                session = store.get(key)
                if session is not None:
                    store.put(key, Session(session.system_prompt, []))
        log.info("project %s: history cleared for %s", project, "every session" if every else sid)
        if project in self.plugins:
            self.plugins[project].history_cleared(None if every else sid)

    def _delete(self, project: str, sid: str | None) -> None:
        every = sid is None or sid.lower() == ALL
        with self.sessions.changing(project, None if every else sid) as store:
            for key in self._targets(project, sid):
                store.delete(key)
        log.info("project %s: deleted %s", project, "every session" if every else f"session {sid}")
        if project in self.plugins:
            self.plugins[project].sessions_deleted(None if every else sid)


def _session(data: dict, fields: tuple[str, ...]) -> str | None:
    for name in fields:
        value = data.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None and not isinstance(value, str):
            raise ControlError(f"{name} must be a string or a number")
    return None


def _template_text(data: dict) -> str | None:
    """The first of TEMPLATE_FIELDS that is given: a string, or an object's content/template."""
    for name in TEMPLATE_FIELDS:
        value = data.get(name)
        if isinstance(value, dict):
            value = value.get("content", value.get("template"))
        if value is None:
            continue
        if not isinstance(value, str):
            raise ControlError(f"{name} must be a string or an object with 'content' or 'template'")
        if value.strip():
            return value.strip()
    return None


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ControlError("reset must be true or false")
