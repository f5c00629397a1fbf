"""Prompts filled into a rendered skeleton (agent.core.chat_skeleton) and their cached tail ids
(agent.core.prompt_builder.HeadCache): always the text and ids of a full render."""

from __future__ import annotations

import copy
import random
import string

from agent.core.chat_skeleton import ChatSkeletons, plain
from agent.core.prompt_builder import PromptBuilder, to_messages
from engine.tokenizer import Tokenizer
from tests.fake_engine import CHAT_TEMPLATE, MarkingTokenizer, tiny_tokenizer

PLAIN = string.ascii_letters + string.digits + " \n\t.,!?&'\"{}%éü日本🙂"


def plain_text(rng: random.Random, n: int) -> str:
    return "x" + "".join(rng.choice(PLAIN) for _ in range(n)) + "y"


def conversation(rng: random.Random) -> tuple[str, list[tuple[str, str]], str]:
    turns = [(plain_text(rng, rng.randint(0, 40)), plain_text(rng, rng.randint(0, 40)))
             for _ in range(rng.randint(0, 4))]
    return plain_text(rng, rng.randint(1, 60)), turns, plain_text(rng, rng.randint(0, 60))


class CountingRender:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.calls = tok, 0

    def __call__(self, messages: list[dict[str, str]]) -> str:
        self.calls += 1
        return self.tok.render_chat(messages)


def with_template(template: str) -> Tokenizer:
    tok = tiny_tokenizer()
    hf = copy.deepcopy(tok.hf)
    hf.chat_template = template
    return Tokenizer(hf)


def test_prompts_from_a_skeleton_are_the_full_render_and_skip_it() -> None:
    rng = random.Random()
    tok = tiny_tokenizer()
    render = CountingRender(tok)
    skeletons = ChatSkeletons(render)
    for _ in range(20):
        system, turns, message = conversation(rng)
        text, skeleton = skeletons.render(system, turns, message)
        assert skeleton is not None
        assert text == tok.render_chat(to_messages(system, turns, message))
        calls = render.calls
        again, _ = skeletons.render(system, turns, plain_text(rng, 30))
        assert render.calls == calls and again.startswith(text[:text.rindex(message)])


def test_a_template_that_changes_a_text_gets_no_skeleton() -> None:
    """The probe at work: this template upper-cases user texts; a skeleton filled with the
    texts as given would differ from the render."""
    tok = with_template(CHAT_TEMPLATE.replace("message['content']", "message['content'] | upper"))
    skeletons = ChatSkeletons(tok.render_chat)
    rng = random.Random()
    for _ in range(5):
        system, turns, message = conversation(rng)
        text, skeleton = skeletons.render(system, turns, message)
        assert skeleton is None
        assert text == tok.render_chat(to_messages(system, turns, message))


def test_texts_a_template_may_treat_apart_are_rendered_whole() -> None:
    """Trimmed (Llama 3) and tag-branching (Qwen3 history) templates pass the probe; texts with
    outer whitespace or a '<' still get the full render."""
    template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{%- if '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] }}"
        "{%- else %}{{ m['content'] | trim }}{%- endif %}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    tok = with_template(template)
    skeletons = ChatSkeletons(tok.render_chat)
    rng = random.Random()
    for message in ("  padded\t", "<think>a</think>b", "ok"):
        system, turns, _ = conversation(rng)
        text, skeleton = skeletons.render(system, turns, message)
        assert (skeleton is not None) == plain(message)
        assert text == tok.render_chat(to_messages(system, turns, message))


def test_a_dropped_or_repeated_text_gets_no_skeleton() -> None:
    repeat = CHAT_TEMPLATE.replace("message['content'] +", "message['content'] + message['content'] +")
    drop = CHAT_TEMPLATE.replace("message['content']", "(message['content'] if message['role'] "
                                 "!= 'assistant' else '')")
    for template in (repeat, drop):
        tok = with_template(template)
        assert ChatSkeletons(tok.render_chat).get("system", 2) is None


def test_cached_head_and_tail_give_the_ids_of_tokenizing_whole() -> None:
    rng = random.Random()
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok)
    assert builder.heads is not None
    for _ in range(20):
        system, turns, message = conversation(rng)
        whole = tok.apply_chat_template(to_messages(system, turns, message))
        assert builder._ids(system, turns, message) == whole
    assert builder.heads._tails == {"<|im_end|>\n<|im_start|>assistant\n": tok.encode(
        "<|im_end|>\n<|im_start|>assistant\n")}


def test_no_tail_where_the_split_would_change_the_ids() -> None:
    """The tail's probe at work: with this tokenizer a split tail would add a token."""
    tok = MarkingTokenizer(copy.deepcopy(tiny_tokenizer().hf))
    builder = PromptBuilder(tok)
    rng = random.Random()
    system, turns, message = conversation(rng)
    assert builder._ids(system, turns, message) == tok.encode(
        tok.render_chat(to_messages(system, turns, message)))
    assert list(builder.heads._tails.values()) == [None]


def test_a_first_turn_tokenizes_only_its_message_and_gives_the_whole_ids() -> None:
    rng = random.Random()
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok)
    starts = "aZ7'\"(-._#ü日🙂/*{&!?,"
    for start in starts:
        system, _, message = conversation(rng)
        message = start + message
        whole = tok.apply_chat_template(to_messages(system, [], message))
        assert builder._ids(system, [], message) == whole
    leads = list(builder.heads._leads.values())
    assert leads and all(lead is not None for lead in leads)


class ParenthesisTokenizer(Tokenizer):
    """Encodes a text that begins with '(' with an extra token first, as a tokenizer that
    marks the start of its input does: splitting before the message would change the ids."""

    def encode(self, text: str) -> list[int]:
        return [5, *super().encode(text)] if text.startswith("(") else super().encode(text)


def test_no_lead_where_one_kind_of_first_character_would_change_the_ids() -> None:
    tok = ParenthesisTokenizer(copy.deepcopy(tiny_tokenizer().hf))
    builder = PromptBuilder(tok)
    for message in ("plain words", "(aside)"):
        assert builder._ids("system", [], message) == tok.encode(
            tok.render_chat(to_messages("system", [], message)))
    assert list(builder.heads._leads.values()) == [None]
