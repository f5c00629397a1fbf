import json
from dataclasses import FrozenInstanceError, replace
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.mqtt.options import Options
from agent.mqtt.protocol import (
    ChatRequest,
    ProtocolError,
    RequestParser,
    json_object,
    session_id_problem,
)
from agent.mqtt.topics import Topics

DEFAULT_PREFIX = "maze/assistant_response/"


@pytest.fixture
def parser() -> RequestParser:
    return RequestParser(Topics(["maze", "driving"]), max_payload_bytes=10_000, max_tokens=256)


def parse(parser: RequestParser, payload: object) -> ChatRequest:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parser.parse("maze", data)


def error(parser: RequestParser, payload: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(parser, payload)
    return info.value


def test_full_request(parser: RequestParser) -> None:
    req = parse(parser, {
        "sessionId": "s1", "message": " hi ", "temperature": 0, "topP": 0.5, "maxTokens": 64,
        "systemPrompt": "Be brief.", "replyTopic": "maze/assistant_response/s1/c1",
        "clientId": "c1", "requestId": "r1", "stream": True,
    })
    assert req.session_id == "s1" and req.message == "hi"
    assert req.temperature == 0.0 and req.top_p == 0.5 and req.max_tokens == 64
    assert req.system_prompt == "Be brief."
    assert req.reply_topic == "maze/assistant_response/s1/c1"
    assert (req.client_id, req.request_id) == ("c1", "r1")
    assert req.extras == {"stream": True} and not req.generated_session


def test_defaults(parser: RequestParser) -> None:
    req = parse(parser, {"sessionId": "s1", "message": "hi"})
    assert req.reply_topic == DEFAULT_PREFIX + "s1"
    assert req.temperature is req.top_p is req.max_tokens is req.system_prompt is None


def test_numeric_session_id(parser: RequestParser) -> None:
    req = parse(parser, {"sessionId": 12345, "message": "hi"})
    assert req.session_id == "12345" and req.reply_topic == DEFAULT_PREFIX + "12345"


@pytest.mark.parametrize("payload", [{"message": "hi"}, {"sessionId": "", "message": "hi"},
                                     {"sessionId": "  ", "message": "hi"}])
def test_generated_session(parser: RequestParser, payload: dict) -> None:
    req = parse(parser, payload)
    assert req.generated_session and req.session_id.startswith("default-")
    assert len(req.session_id) == len("default-") + 8
    assert req.reply_topic == DEFAULT_PREFIX + req.session_id


@pytest.mark.parametrize("payload, message", [
    (b"plain text question", "plain text question"),
    (b"42", "42"),
    (b'"a json string"', '"a json string"'),
    (b"[1, 2]", "[1, 2]"),
    (b"{not json", "{not json"),
    (b"\xff\xfehello", "\ufffd\ufffdhello"),
])
def test_raw_payload_is_the_message(parser: RequestParser, payload: bytes, message: str) -> None:
    req = parser.parse("maze", payload)
    assert req.message == message and req.generated_session
    assert req.reply_topic == DEFAULT_PREFIX + req.session_id


def test_invalid_utf8_object_gets_an_error(parser: RequestParser) -> None:
    err = error(parser, b'{"sessionId": "s1", "message": "caf\xe9"}')
    assert err.reply.startswith("Error: ") and "UTF-8" in err.reply
    assert err.reply_topic == DEFAULT_PREFIX + "s1"


@pytest.mark.parametrize("payload", [
    {"sessionId": "s1"}, {"sessionId": "s1", "message": ""}, {"sessionId": "s1", "message": "  \n"},
    {"sessionId": "s1", "message": None}, b"", b"   ",
])
def test_empty_message(parser: RequestParser, payload: object) -> None:
    err = error(parser, payload)
    assert err.reply == "Error: empty message"
    assert err.reply_topic is not None and err.reply_topic.startswith(DEFAULT_PREFIX)


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", -0.1), ("temperature", 2.5), ("temperature", True),
    ("topP", 0), ("topP", 1.5), ("topP", "x"),
    ("maxTokens", -3), ("maxTokens", 0), ("maxTokens", 1.5), ("maxTokens", "10"),
    ("message", 12), ("message", ["hi"]), ("systemPrompt", 7), ("prompt_template", 7),
])
def test_wrong_types_name_the_field(parser: RequestParser, field: str, value: object) -> None:
    payload = {"sessionId": "s1", "message": "hi", "replyTopic": "maze/assistant_response/s1/c"}
    payload[field] = value
    err = error(parser, payload)
    assert err.reply.startswith("Error: ") and field in err.reply
    assert err.reply_topic == "maze/assistant_response/s1/c"
    assert err.session_id == "s1"


def test_non_finite_numbers(parser: RequestParser) -> None:
    with pytest.raises(ProtocolError, match="temperature"):
        parser.parse("maze", b'{"sessionId": "s", "message": "hi", "temperature": NaN}')


def test_max_tokens_capped(parser: RequestParser) -> None:
    capped = parse(parser, {"message": "hi", "maxTokens": 100_000})
    assert (capped.max_tokens, capped.max_tokens_asked) == (256, 100_000)
    assert parse(parser, {"message": "hi", "maxTokens": 12.0}).max_tokens == 12
    assert parse(parser, {"message": "hi"}).max_tokens_asked is None


def test_prompt_template(parser: RequestParser) -> None:
    assert parse(parser, {"message": "hi", "prompt_template": {"content": "T"}}).system_prompt == "T"
    both = {"message": "hi", "prompt_template": {"content": "T"}, "systemPrompt": "S"}
    assert parse(parser, both).system_prompt == "S"
    assert parse(parser, {"message": "hi", "systemPrompt": " "}).system_prompt is None


def test_images_ignored_text_answered(parser: RequestParser) -> None:
    """Issue 15 item 15: text + images is the text's turn (the old servers answered it); only
    the images' count is kept."""
    req = parse(parser, {"sessionId": "s1", "message": "what is this?", "images": ["aGVsbG8=", "eA=="]})
    assert (req.message, req.images_ignored) == ("what is this?", 2)
    assert "images" not in req.extras and "aGVsbG8=" not in repr(req)
    assert parse(parser, {"message": "hi", "images": "aGVsbG8="}).images_ignored == 1
    assert parse(parser, {"message": "hi", "images": []}).images_ignored == 0


@pytest.mark.parametrize("message", [None, "", "  "])
def test_images_without_text(parser: RequestParser, message: object) -> None:
    payload = {"sessionId": "s1", "images": ["aGVsbG8="], "responseFormat": "json"}
    if message is not None:
        payload["message"] = message
    err = error(parser, payload)
    assert err.reply == "Error: this model does not accept images, and the message has no text"
    assert err.data is not None and "images" not in err.data  # the error keeps no image
    assert error(parser, {"message": " ", "images": []}).reply == "Error: empty message"


def test_images_of_a_refused_request_are_not_kept(parser: RequestParser) -> None:
    err = error(parser, {"sessionId": "a#b", "message": "hi", "images": ["aGVsbG8="]})
    assert err.data is not None and "images" not in err.data
    err = error(parser, {"sessionId": "s", "message": "hi", "topP": 5, "images": ["aGVsbG8="]})
    assert err.data is not None and "images" not in err.data


def test_bad_session_id(parser: RequestParser) -> None:
    err = error(parser, {"sessionId": "a#b", "message": "hi"})
    assert err.reply.startswith("Error: ") and err.reply_topic is None
    err = error(parser, {"sessionId": True, "message": "hi",
                         "replyTopic": "maze/assistant_response/x/y"})
    assert err.reply_topic == "maze/assistant_response/x/y"


def test_disallowed_reply_topic_falls_back(parser: RequestParser) -> None:
    for topic in ("maze/assistant_response/#", "driving/assistant_response/s1"):
        assert parse(parser, {"sessionId": "s1", "message": "hi", "replyTopic": topic}).reply_topic \
            == DEFAULT_PREFIX + "s1"


def test_lone_surrogates_are_replaced(parser: RequestParser) -> None:
    req = parser.parse("maze", b'{"sessionId": "s", "message": "a\\ud800b"}')
    req.message.encode("utf-8")


def test_too_large(parser: RequestParser) -> None:
    big = {"sessionId": "s1", "replyTopic": "maze/assistant_response/s1/c", "message": "x" * 20_000}
    err = error(parser, big)
    assert err.reply.startswith("Error: ") and "too large" in err.reply
    assert err.reply_topic == "maze/assistant_response/s1/c" and err.session_id == "s1"
    err = error(parser, {"message": "x" * 20_000, "sessionId": 77})
    assert err.reply_topic == DEFAULT_PREFIX + "77"
    err = error(parser, b"y" * 20_000)
    assert err.reply_topic is not None and err.reply_topic.startswith(DEFAULT_PREFIX + "default-")


def test_deep_nesting_is_raw(parser: RequestParser) -> None:
    req = parser.parse("maze", b"[" * 5000)
    assert req.generated_session


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_fields = st.sampled_from(["message", "sessionId", "temperature", "topP", "maxTokens", "systemPrompt",
                           "prompt_template", "replyTopic", "clientId", "requestId", "images"])


@given(payload=st.one_of(st.binary(max_size=200),
                         st.dictionaries(_fields, _json_values, max_size=6).map(
                             lambda d: json.dumps(d).encode())))
@settings(max_examples=300, deadline=None)
def test_any_payload_gives_a_request_or_a_protocol_error(payload: bytes) -> None:
    parser = RequestParser(Topics(["maze"]), max_payload_bytes=10_000, max_tokens=256)
    try:
        req = parser.parse("maze", payload)
    except ProtocolError as err:
        assert err.reply.startswith("Error: ")
        assert err.reply_topic is None or err.reply_topic.startswith(DEFAULT_PREFIX)
        return
    assert req.message.strip() and req.reply_topic.startswith(DEFAULT_PREFIX)
    req.message.encode("utf-8")
    assert req.temperature is None or 0 <= req.temperature <= 2
    assert req.max_tokens is None or 1 <= req.max_tokens <= 256


# ---- the usual request's shortcuts give what the general path gives ----

_usual_values = st.none() | st.integers(-3, 99) | st.sampled_from(
    ["s1", "", "  ", "a#b", "x/driving/user_input", "caf\u00e9", "a\ud800b", " hi ", "\u2603",
     DEFAULT_PREFIX + "s1/c", DEFAULT_PREFIX + "#", "driving/assistant_response/s1"])
_usual_payloads = st.dictionaries(
    st.sampled_from(["sessionId", "message", "replyTopic", "clientId", "requestId"]), _usual_values,
    max_size=5)
# Each field the usual request lacks, with a value that asks for nothing (as if it were absent).
_NEUTRAL = [("temperature", None), ("topP", None), ("maxTokens", None), ("systemPrompt", None),
            ("systemPrompt", " "), ("prompt_template", None), ("images", []), ("images", None),
            ("stream", None), ("stream", False), ("responseFormat", None), ("responseFormat", "text"),
            ("includeReasoning", False), ("command", None), ("someExtra", 1)]
_PART_A = {"temperature", "topP", "maxTokens", "systemPrompt", "prompt_template", "images"}


def _outcome(payload: dict) -> tuple:
    parser = RequestParser(Topics(["maze", "driving"]), max_payload_bytes=10_000, max_tokens=256)
    try:
        return ("request", parser.parse("maze", json.dumps(payload).encode()))
    except ProtocolError as err:
        return ("error", err.reply, err.reply_topic, err.session_id, err.request_id, err.data)


@pytest.mark.parametrize("key, value", _NEUTRAL)
@given(payload=_usual_payloads)
@settings(max_examples=60, deadline=None)
def test_usual_request_equals_the_general_path(key: str, value: object, payload: dict) -> None:
    with patch("agent.mqtt.protocol.new_session_id", return_value="default-0000abcd"):
        usual, general = _outcome(payload), _outcome({**payload, key: value})
    if usual[0] == "request" and key not in _PART_A:  # the general path keeps it as an extra
        usual = ("request", replace(usual[1], extras={key: value}))
    if usual[0] == "error":
        usual = (*usual[:-1], {**payload, key: value})  # the error carries the request it refused
    assert general == usual


def test_usual_request_fields(parser: RequestParser) -> None:
    req = parse(parser, {"sessionId": 7, "message": " caf\u00e9 \u2603 ", "clientId": 3,
                         "requestId": "r\ud800", "replyTopic": DEFAULT_PREFIX + "7/c/"})
    assert req == ChatRequest("maze", "7", "caf\u00e9 \u2603", DEFAULT_PREFIX + "7/c",
                              client_id="3", request_id="r?")
    assert req.extras == {} and req.extras is not parse(parser, {"message": "hi"}).extras


def test_request_of_is_the_constructor() -> None:
    values = ("p", "s", "m", "p/assistant_response/s", 0.5, 0.9, 12, "sys", "c", "r", True,
              {"x": 1}, Options(stream=True), b"cd", 20, 1, 30.0)
    made = ChatRequest.of(*values)
    assert made == ChatRequest(*values) and type(made) is ChatRequest
    assert replace(made, reply_topic="t") == ChatRequest(*values[:3], "t", *values[4:])
    with pytest.raises(FrozenInstanceError):
        made.message = "changed"  # type: ignore[misc]
    with pytest.raises(ValueError):
        ChatRequest.of(*values[:-1])  # every field must be given


@pytest.mark.parametrize("session_id, problem", [
    ("caf\u00e9-\u2603", None), ("a\ud800", "sessionId is not valid UTF-8"),
    ("\ud800#", "sessionId must not contain '+', '#' or NUL"),
    ("a+b", "sessionId must not contain '+', '#' or NUL"), ("a\0", "sessionId must not contain '+', '#' or NUL"),
    ("\u00e9" * 257, "sessionId is longer than 256 characters"),
])
def test_session_id_problem(session_id: str, problem: str | None) -> None:
    assert session_id_problem(session_id) == problem


# The parser reads JSON with raw_decode, not json.loads (half the time): the same verdicts.
def _json_loads_object(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


_json_fragments = st.sampled_from([
    "{", "}", "[", "]", '"a"', ":", ",", "1", "1.", "-", "e5", "null", "true", "NaN", " ", "\t",
    "\n", "\r", "\ufeff", "\x0b", "\x0c", "\u00a0", "\\", '"', '{"a": 1}', "[]", "{}"])


@given(text=st.one_of(
    st.lists(_json_fragments, max_size=10).map("".join),
    st.text(max_size=20),
    st.builds(lambda before, data, after: before + json.dumps(data) + after,
              st.text(" \t\n\r\ufeff\x0cx", max_size=3),
              st.dictionaries(st.text(max_size=3), _json_values, max_size=3),
              st.text(" \t\n\r\ufeff\x0cx", max_size=3)),
))
@settings(max_examples=500, deadline=None)
def test_json_object_reads_what_json_loads_reads(text: str) -> None:
    assert json_object(text.encode()) == _json_loads_object(text)
