"""The stream's reasoning filter: whatever the chunking, the deltas joined and stripped are the
reply's text (``split_completion``), except the one documented case."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from agent.core.reasoning import CLOSE, OPEN, AnswerFilter, split_completion
from agent.mqtt.options import Options
from agent.mqtt.protocol import ChatRequest
from agent.mqtt.streaming import Stream
from agent.mqtt.topics import Topics

PIECES = [OPEN, CLOSE, "a", "b", " ", "\n", "<", "<th", "k>", "/", "é"]
texts = st.lists(st.sampled_from(PIECES), max_size=14).map("".join)


def streamed(text: str, cuts: list[int], skip: bool = True, opened: bool = False) -> str:
    f = AnswerFilter(skip, opened)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    out = [f.feed(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return "".join(out) + f.flush()


def closes_before_opening(text: str) -> bool:
    """The documented exception: text before a "</think>" that was never opened."""
    close, open_ = text.find(CLOSE), text.find(OPEN)
    return close != -1 and (open_ == -1 or close < open_) and bool(text[:close].strip())


@given(texts, st.lists(st.integers(0, 60), max_size=8), st.booleans())
def test_chunking_never_matters(text: str, cuts: list[int], opened: bool) -> None:
    assert streamed(text, cuts, opened=opened) == streamed(text, [], opened=opened)


@given(texts, st.lists(st.integers(0, 60), max_size=8), st.booleans())
def test_stream_is_the_reply_text(text: str, cuts: list[int], opened: bool) -> None:
    if not opened and closes_before_opening(text):
        return
    assert streamed(text, cuts, opened=opened).strip() == split_completion(text, opened)[0]


@given(texts, st.lists(st.integers(0, 60), max_size=8))
def test_without_skip_thinking_the_raw_text(text: str, cuts: list[int]) -> None:
    assert streamed(text, cuts, skip=False) == text


def test_examples() -> None:
    assert streamed("<think>hmm</think>\n\nHello <b>you</b>", [3, 9, 17, 20]) == "Hello <b>you</b>"
    assert streamed("reasoning\n</think>\nAnswer", [2, 12], opened=True) == "Answer"
    assert streamed("still thinking, cut off", [5], opened=True) == ""
    assert streamed("a < b and <thin", [11]) == "a < b and <thin"  # a partial tag is text after all


def test_stream_messages() -> None:
    sent: list[tuple[str, dict, dict]] = []
    request = ChatRequest("p", "s", "hi", "p/assistant_response/s", request_id="r1",
                          options=Options(stream=True))
    stream = Stream("p/assistant_response/s/stream", request,
                    lambda t, p, **kw: sent.append((t, json.loads(p), kw)), True, False)
    for piece in ("<thi", "nk>x</think> He", "llo <", "b"):
        stream.feed(piece)
    stream.restart()
    stream.feed("Hi")
    stream.close()
    stream.feed("late")  # after close: dropped
    stream.close()
    messages = [m for _, m, _ in sent]
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["done"] for m in messages] == [False] * (len(messages) - 1) + [True]
    assert [m["delta"] for m in messages] == ["He", "llo ", "<b", "", "Hi", ""]
    assert messages[3].get("restart") is True and all(m["requestId"] == "r1" for m in messages)
    assert all(kw == {"qos": 0, "correlation": None} for _, _, kw in sent)


def test_stream_topic_is_confined_like_replies() -> None:
    topics = Topics(["maze"])
    assert topics.stream_of("maze/assistant_response/s/c") == "maze/assistant_response/s/c/stream"
    assert topics.stream_of("maze/assistant_response/" + "x" * 65510) is None  # too long
    assert Topics(["maze"], reserved_prefixes=["maze/assistant_response/s/"]).stream_of(
        "maze/assistant_response/s") is None  # never on a reserved topic
