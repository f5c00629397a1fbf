import pytest

from agent.core.prompt_builder import PromptBuilder, PromptTooLong, prompt_limit, to_messages
from tests.fake_engine import tiny_tokenizer, user_turns


class CountingTokenizer:
    def __init__(self) -> None:
        self.inner = tiny_tokenizer()
        self.calls = 0

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        self.calls += 1
        return self.inner.apply_chat_template(messages)


def history(n: int) -> list[tuple[str, str]]:
    return [(f"question {i} " + "x" * 20, f"answer {i} " + "y" * 20) for i in range(n)]


def count(system: str, turns: list[tuple[str, str]], message: str) -> int:
    return len(tiny_tokenizer().apply_chat_template(to_messages(system, turns, message)))


def test_fits_whole() -> None:
    tok = CountingTokenizer()
    prompt = PromptBuilder(tok).build("sys", history(3), "new", limit=10_000)
    assert prompt.first_turn == 0 and tok.calls == 1
    text = tiny_tokenizer().decode(prompt.token_ids, skip_special_tokens=False)
    assert user_turns(text) == [t[0] for t in history(3)] + ["new"]
    assert text.startswith("<|im_start|>system\nsys<|im_end|>")


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_trims_oldest_whole_turns_exactly(n: int) -> None:
    turns = history(n)
    full = count("sys", turns, "new")
    for limit in (full - 1, full // 2, count("sys", [], "new")):
        prompt = PromptBuilder(tiny_tokenizer()).build("sys", turns, "new", limit)
        k = prompt.first_turn
        assert len(prompt.token_ids) <= limit
        assert prompt.token_ids == tiny_tokenizer().apply_chat_template(to_messages("sys", turns[k:], "new"))
        assert k >= 1 and count("sys", turns[k - 1:], "new") > limit  # kept as much as fits


def test_logarithmic_tokenizations() -> None:
    tok = CountingTokenizer()
    turns = history(1000)
    limit = count("sys", turns[-10:], "new")
    prompt = PromptBuilder(tok).build("sys", turns, "new", limit)
    assert prompt.first_turn == 990
    assert tok.calls <= 2 + 11


def test_newest_turn_too_long() -> None:
    with pytest.raises(PromptTooLong, match="^Error: ") as info:
        PromptBuilder(tiny_tokenizer()).build("sys", history(2), "z" * 500, limit=100)
    assert "too long" in str(info.value)
    with pytest.raises(PromptTooLong, match="^Error: "):
        PromptBuilder(tiny_tokenizer()).build("sys", [], "hi", limit=-5)


def test_system_prompt_always_stays() -> None:
    system = "You are a careful assistant. " * 5
    prompt = PromptBuilder(tiny_tokenizer()).build(system, history(5), "new", count(system, [], "new"))
    assert prompt.first_turn == 5
    assert system in tiny_tokenizer().decode(prompt.token_ids, skip_special_tokens=False)


def test_prompt_limit() -> None:
    assert prompt_limit(2000, 256, token_budget=10_000, max_model_len=4096) == 2000
    assert prompt_limit(2000, 256, token_budget=1000, max_model_len=4096) == 744
    assert prompt_limit(2000, 256, token_budget=10_000, max_model_len=1024) == 768
