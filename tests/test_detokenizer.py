"""Incremental detokenization: split characters, stop strings, EOS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from tests.checkpoints import tiny_checkpoint

EOS = 999


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255); anything else is a special token."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for t in ids:
        deltas.append(detok.add_token(t))
        if detok.stopped:
            break
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint("qwen2"))


def test_multibyte_characters_are_never_split() -> None:
    text = "héllo 日本 🙂!"
    detok = IncrementalDetokenizer(ByteTokenizer(), [], eos_token_ids=[EOS])
    deltas = stream(detok, ByteTokenizer.encode(text))
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert "🙂" in deltas  # the 4 bytes came out as one delta


def test_eos_stops_and_is_not_in_the_text() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [65], eos_token_ids=[EOS])
    assert detok.add_token(ord("h")) == "h"
    assert detok.add_token(EOS) == ""
    assert detok.stopped and detok.stop_reason == "eos" and detok.text == "h"
    assert detok.add_token(ord("x")) == ""  # nothing after a stop


def test_eos_flushes_a_held_back_tail() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], stop=["END"], eos_token_ids=[EOS])
    assert "".join(detok.add_token(t) for t in ByteTokenizer.encode("abcE")) == "ab"
    assert detok.add_token(EOS) == "cE"
    assert detok.text == "abcE"


def test_stop_string_cuts_the_text_and_is_never_streamed() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], stop=["STOP", "##"])
    deltas = stream(detok, ByteTokenizer.encode("one two STOP three"))
    assert detok.stopped and detok.stop_reason == "stop_string" and detok.matched_stop == "STOP"
    assert detok.text == "one two " == "".join(deltas)
    assert all("S" not in d for d in deltas)


def test_earliest_stop_string_wins_within_one_delta() -> None:
    class WordTokenizer:
        words = ["x", "a##bSTOPc"]

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(self.words[i] for i in ids)

    detok = IncrementalDetokenizer(WordTokenizer(), [], stop=["STOP", "##"])
    assert detok.add_token(0) == ""  # held back: could start a stop string
    assert detok.add_token(1) == "xa"
    assert detok.text == "xa" and detok.matched_stop == "##"


def test_flush_without_stop_returns_everything() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], stop=["zzz"])
    deltas = [detok.add_token(t) for t in ByteTokenizer.encode("abcz")]
    assert "".join(deltas) == "ab"
    assert detok.flush() == "cz" and detok.text == "abcz"


@settings(max_examples=80, deadline=None)
@given(
    text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    stop=st.lists(st.text(alphabet="ab€", min_size=1, max_size=3), max_size=2),
)
def test_stream_equals_text_up_to_first_stop(text: str, stop: list[str]) -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], stop=stop)
    streamed = "".join(stream(detok, ByteTokenizer.encode(text)))
    assert streamed == detok.text == cut_at_first_completed_stop(text, stop)


def cut_at_first_completed_stop(text: str, stop: list[str]) -> str:
    """Generation stops as soon as one stop string is complete (one character at a time);
    the text ends where the earliest of the stop strings seen by then begins."""
    for end in range(1, len(text) + 1):
        cuts = [i for s in stop if (i := text[:end].find(s)) >= 0]
        if cuts:
            return text[: min(cuts)]
    return text


def test_real_byte_level_tokenizer(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    text = "The robot drives 42 km — naïve café 日本語 🙂 done."
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt, eos_token_ids=tokenizer.eos_token_ids)
    deltas = stream(detok, [*ids, *tokenizer.eos_token_ids][: len(ids) + 1])
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)


def test_real_tokenizer_stop_string(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("answer: left, up <END> ignored")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["<END>"])
    assert "".join(stream(detok, ids)) == "answer: left, up " == detok.text


def test_invalid_bytes_are_released_after_a_few_tokens() -> None:
    """A run of tokens that never forms valid UTF-8 must not be held back forever
    (that made every later step re-decode a growing window)."""
    class BytesDecoder:
        def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(token_ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(BytesDecoder(), [65])
    streamed = "".join(detok.add_token(0x80) for _ in range(10))  # lone continuation bytes
    assert streamed and set(streamed) == {"\ufffd"}
    assert len(streamed) >= 10 - 4  # at most a few tokens held back
    # a real split character is still held until complete
    detok = IncrementalDetokenizer(BytesDecoder(), [65])
    euro = "€".encode()
    assert detok.add_token(euro[0]) == "" and detok.add_token(euro[1]) == ""
    assert detok.add_token(euro[2]) == "€"
