import pytest

from agent.core.reasoning import split_reasoning, strip_reasoning


@pytest.mark.parametrize("text, answer", [
    ("Hello there.", "Hello there."),
    ("<think>hmm, 2+2</think>\n\nIt is 4.", "It is 4."),
    ("<think>a</think>First. <think>b</think>Second.", "First. Second."),
    ("the user asks...\n</think>\n\nIt is 4.", "It is 4."),  # QwQ: <think> was in the prompt
    ("<think>never finished", ""),
    ("Answer first. <think>then cut off", "Answer first."),
    ("<think>\nmulti\nline\n</think>ok", "ok"),
    ("<think>a</think>x</think>y", "xy"),
    ("", ""),
])
def test_strip(text: str, answer: str) -> None:
    assert strip_reasoning(text) == answer


def test_reasoning_kept_for_later_use() -> None:
    answer, reasoning = split_reasoning("pre</think>A<think>mid</think>B<think>tail")
    assert answer == "AB"
    assert reasoning == "pre\n\nmid\n\ntail"


def test_text_after_think_is_not_cut() -> None:
    text = "<think>plan</think>" + "long answer " * 50
    assert strip_reasoning(text) == ("long answer " * 50).strip()
