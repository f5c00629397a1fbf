"""Chat requests (part A): parse and validate one payload of ``P/user_input``."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

from agent.mqtt.options import PLAIN, RESET, Options, parse_options
from agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 256
# requestId and clientId are kept past the request (the answered replies, the per-client
# rate limit, log lines): bounded like sessionId.
MAX_ID_CHARS = 256
MAX_TIMEOUT_S = 86_400.0  # timeoutS beyond a day is a mistake; --request_timeout caps it anyway
_KNOWN = {
    "message", "sessionId", "temperature", "topP", "maxTokens", "systemPrompt",
    "prompt_template", "replyTopic", "clientId", "requestId", "images", "timeoutS",
}
# The usual request holds no other key: no option, sampling field, system prompt, image or extra
# to read (parse skips them all; tests/test_protocol.py shows each skip changes nothing).
_USUAL = frozenset({"sessionId", "message", "replyTopic", "clientId", "requestId"})
_JSON_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()
# For a payload too large to parse: find the reply target (and the envelope's fields) cheaply.
_SCAN = 64 * 1024
_FIELD_RE = re.compile(rb'"(sessionId|replyTopic|requestId|clientId|responseFormat)"'
                       rb'\s*:\s*("(?:[^"\\]|\\.){0,1024}"|-?\d{1,64})')


@dataclass(frozen=True)
class ChatRequest:
    project: str
    session_id: str
    message: str
    reply_topic: str
    temperature: float | None = None  # None: the project's / agent's default
    top_p: float | None = None
    max_tokens: int | None = None  # already capped by --max_tokens_limit
    system_prompt: str | None = None
    client_id: str | None = None
    request_id: str | None = None
    generated_session: bool = False
    extras: dict[str, Any] = field(default_factory=dict)  # fields beyond part A
    options: Options = PLAIN  # part C
    correlation_data: bytes | None = None  # MQTT v5, echoed on the reply
    max_tokens_asked: int | None = None  # maxTokens as sent, before the cap (the envelope's)
    images_ignored: int = 0  # images the request held: not read, only counted (the envelope's)
    timeout_s: float | None = None  # the client's own wait (timeoutS); the core caps it

    @property
    def reset(self) -> bool:
        """``"command": "reset"``: forget the session instead of a turn (part C)."""
        return self.options.command == RESET

    @classmethod
    def of(cls, *values: Any) -> ChatRequest:
        """``cls(*values)`` with every field given, in half the time: the frozen __init__ sets
        each of the 16 fields through object.__setattr__ (a fifth of a usual parse)."""
        request = object.__new__(cls)
        request.__dict__.update(zip(_REQUEST_FIELDS, values, strict=True))
        return request


_REQUEST_FIELDS = tuple(f.name for f in dataclass_fields(ChatRequest))


class ProtocolError(Exception):
    """A request that gets ``reply`` (an ``Error: ...`` text) instead of an answer."""

    def __init__(
        self,
        reply: str,
        reply_topic: str | None,
        project: str,
        session_id: str | None = None,
        request_id: str | None = None,
        data: dict | None = None,
    ) -> None:
        super().__init__(reply)
        self.data = data  # the request object, if it was one (part C reads responseFormat)
        self.correlation_data: bytes | None = None
        self.reply = reply
        self.reply_topic = reply_topic
        self.project = project
        self.session_id = session_id
        self.request_id = request_id


def new_session_id() -> str:
    return f"default-{secrets.token_hex(4)}"


def session_id_problem(session_id: str) -> str | None:
    if len(session_id) > MAX_SESSION_ID_CHARS:
        return f"sessionId is longer than {MAX_SESSION_ID_CHARS} characters"
    if "+" in session_id or "#" in session_id or "\0" in session_id:
        return "sessionId must not contain '+', '#' or NUL"
    if not session_id.isascii():  # ASCII holds no lone surrogate
        try:
            session_id.encode("utf-8")
        except UnicodeEncodeError:
            return "sessionId is not valid UTF-8"
    return None


def _utf8(text: str) -> str:
    """Lone surrogates (JSON allows "\\ud800") cannot be encoded: replace them."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def _number(data: dict, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (low < value if low_open else low <= value) and value <= high:
        return float(value)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"{key} must be a number in {interval}, got {_show(value)}")


def _positive_int(data: dict, key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"{key} must be an integer >= 1, got {_show(value)}")


def _show(value: Any) -> str:
    return json.dumps(value)[:40]


def _optional_id(data: dict, key: str) -> str | None:
    """The id as a string; None if absent, or too long to echo (see ``_check_ids``)."""
    value = data.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)[:MAX_ID_CHARS]
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        return None
    return _utf8(value)


def _check_ids(data: dict) -> None:
    for key in ("requestId", "clientId"):
        value = data.get(key)
        if isinstance(value, str) and len(value) > MAX_ID_CHARS:
            raise ValueError(f"{key} is longer than {MAX_ID_CHARS} characters")


def _has_text(data: dict) -> bool:
    message = data.get("message")
    if message is None:
        return False
    return not isinstance(message, str) or bool(message.strip())  # a non-string: its own error


def _message(data: dict, options: Options) -> str:
    message = data.get("message")
    if message is not None and not isinstance(message, str):
        raise ValueError("message must be a string")
    if options.command is None and (not message or not message.strip()):
        raise ValueError("empty message")
    return _utf8((message or "").strip())


def _images(data: dict) -> int:
    """How many images the request holds (a list's length; any other non-empty value is one).
    A text model reads none: only the count is kept, never the data."""
    images = data.get("images")
    if not images:
        return 0
    return len(images) if isinstance(images, list) else 1


def _drop_images(data: dict) -> None:
    """A refused request's object travels with its error (the envelope reads a few fields):
    not its images, which may be megabytes."""
    if data.get("images"):
        del data["images"]


def _system_prompt(data: dict) -> str | None:
    value = data.get("systemPrompt")
    if value is not None and not isinstance(value, str):
        raise ValueError("systemPrompt must be a string")
    if value is None or not value.strip():
        template = data.get("prompt_template")
        if isinstance(template, dict):
            template = template.get("content")
        if template is not None and not isinstance(template, str):
            raise ValueError("prompt_template must be an object with a 'content' string")
        value = template
    return _utf8(value.strip()) if value and value.strip() else None


class RequestParser:
    """Turns one payload of ``P/user_input`` into a ChatRequest or raises ProtocolError.
    ``max_tokens``: the cap of a request's ``maxTokens`` (``--max_tokens_limit``); a larger
    one is lowered to it, not refused (old clients read errors badly; the envelope says so)."""

    def __init__(self, topics: Topics, max_payload_bytes: int, max_tokens: int) -> None:
        self.topics = topics
        self.max_payload_bytes = max_payload_bytes
        self.max_tokens = max_tokens

    def parse(self, project: str, payload: bytes) -> ChatRequest:
        if len(payload) > self.max_payload_bytes:
            self._too_large(project, payload)
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload.decode("utf-8", "replace")
            data = _load_object(text)
            if data is None:
                return self._raw(project, text)
            raise self._error(project, data, "Error: the payload is not valid UTF-8") from None
        data = _load_object(text)
        return self._raw(project, text) if data is None else self._from_object(project, data)

    def _raw(self, project: str, text: str) -> ChatRequest:
        """Not JSON, or JSON that is not an object: the whole text is the message."""
        session_id = new_session_id()
        reply_topic = self.topics.default_reply(project, session_id)
        message = _utf8(text).strip()
        if not message:
            raise ProtocolError("Error: empty message", reply_topic, project, session_id)
        return ChatRequest(project, session_id, message, reply_topic, generated_session=True)

    def _session(self, project: str, data: dict) -> tuple[str, bool]:
        value = data.get("sessionId")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            return new_session_id(), True
        if not isinstance(value, str):
            raise ValueError("sessionId must be a string or a number")
        problem = session_id_problem(value)
        if problem:
            raise ValueError(problem)
        # reply_problem less its two checks that hold here: the topic is under the project's
        # reply root and names a sub-topic (the id is not blank).
        problem = self.topics.publish_problem(self.topics.default_reply(project, value))
        if problem:  # e.g. "x/driving/user_input", or a control character
            raise ValueError(f"sessionId cannot name a reply topic: {problem}")
        return value, False

    def _error(self, project: str, data: dict, reply: str) -> ProtocolError:
        """An error for ``data``, sent where its answer would have gone, if that is known."""
        _drop_images(data)
        request_id = _optional_id(data, "requestId")
        try:
            session_id, _ = self._session(project, data)
        except ValueError:
            session_id = None
        if session_id is not None:
            topic: str | None = self.topics.confine_reply(project, data.get("replyTopic"), session_id)
        else:
            requested = data.get("replyTopic")
            requested = requested.rstrip("/") if isinstance(requested, str) else ""
            topic = None if self.topics.reply_problem(project, requested) else requested
        return ProtocolError(reply, topic, project, session_id, request_id, data)

    def _from_object(self, project: str, data: dict) -> ChatRequest:
        try:
            session_id, generated = self._session(project, data)
        except ValueError as exc:
            raise self._error(project, data, f"Error: {exc}") from None
        reply_topic = self.topics.confine_reply(project, data.get("replyTopic"), session_id)
        try:
            usual = _USUAL.issuperset(data)
            options = PLAIN if usual else parse_options(data)
            images = 0 if usual else _images(data)
            if images and options.command is None and not _has_text(data):
                raise ValueError("this model does not accept images, and the message has no text")
            message = _message(data, options)
            _check_ids(data)
            client_id, request_id = _optional_id(data, "clientId"), _optional_id(data, "requestId")
            if usual:  # what follows would find no field and give these defaults
                return ChatRequest.of(project, session_id, message, reply_topic, None, None, None, None,
                                      client_id, request_id, generated, {}, PLAIN, None, None, 0,
                                      None)
            if images:  # the old servers answered the text: so do we (the envelope says so)
                log.debug("request %.80r of project %s: %d image(s) ignored (text model)",
                          request_id, project, images)
            max_tokens = _positive_int(data, "maxTokens")
            return ChatRequest.of(
                project, session_id, message, reply_topic,
                _number(data, "temperature", 0.0, 2.0),
                _number(data, "topP", 0.0, 1.0, low_open=True),
                None if max_tokens is None else min(max_tokens, self.max_tokens),
                _system_prompt(data), client_id, request_id, generated,
                {k: v for k, v in data.items() if k not in _KNOWN},  # fields beyond part A
                options, None, max_tokens, images,
                _number(data, "timeoutS", 0.0, MAX_TIMEOUT_S, low_open=True),
            )
        except ValueError as exc:
            _drop_images(data)
            raise ProtocolError(
                f"Error: {exc}", reply_topic, project, session_id,
                _optional_id(data, "requestId"), data,
            ) from None

    def _too_large(self, project: str, payload: bytes) -> None:
        fields: dict[str, Any] = {}
        # The reply target sits before or after the bulk (clients put it first or last):
        # scanning the two ends keeps this cheap whatever the size.
        ends = payload if len(payload) <= 2 * _SCAN else payload[:_SCAN] + b"\n" + payload[-_SCAN:]
        for match in _FIELD_RE.finditer(ends):
            key = match.group(1).decode()
            if key not in fields:
                try:
                    fields[key] = json.loads(match.group(2))
                except ValueError:
                    continue
        reply = (
            f"Error: the request is too large ({len(payload)} bytes; "
            f"the limit is {self.max_payload_bytes} bytes)"
        )
        raise self._error(project, fields, reply)


def json_object(payload: bytes) -> dict | None:
    """The payload as a JSON object; None when it is not UTF-8 JSON holding an object."""
    try:
        return _load_object(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _load_object(text: str) -> dict | None:
    """``json.loads(text)`` if that is an object, else None. raw_decode of the text without the
    JSON whitespace around it gives the same verdicts in half the time (json.loads and decode
    add a microsecond of checks and whitespace matching to the usual request's one)."""
    body = text.strip(_JSON_WHITESPACE)
    try:
        data, end = _DECODER.raw_decode(body)
    except (ValueError, RecursionError):
        return None
    return data if end == len(body) and isinstance(data, dict) else None
