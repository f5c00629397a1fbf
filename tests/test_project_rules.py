"""Projects' output rules (driving's state tags, bloodcell's word limit) and how they load."""

from __future__ import annotations

from pathlib import Path

import pytest

from projects import load_project, load_rules
from projects.bloodcell_rules import MAX_WORDS
from projects.bloodcell_rules import finalize as cut
from projects.driving_rules import check, finalize

TAGS = "<Cont><PlayerOp:brake><AgentOP:keep>"


@pytest.mark.parametrize("text", [
    f"Car ahead is slowing down. {TAGS}",
    "We made it!<EOS><PlayerOp:keep><AgentOP:keep>\n",
    "<Cont><PlayerOp:turn left><AgentOP:accelerate>",
])
def test_driving_replies_with_tags_pass(text: str) -> None:
    assert check(text) is None
    assert finalize(text) == text.strip()


@pytest.mark.parametrize("text, expected", [
    ("Brake now, the light is red!", "Brake now, the light is red! <Cont><PlayerOp:brake><AgentOP:keep>"),
    ("Speed up a little.", "Speed up a little. <Cont><PlayerOp:accelerate><AgentOP:keep>"),
    ("Nice drive.", "Nice drive. <Cont><PlayerOp:keep><AgentOP:keep>"),
    (f"{TAGS} Have fun!", f"Have fun! {TAGS}"),  # tags not at the end
    ("Done! <eos> <playerop: left> <AgentOp:brake>", "Done! <EOS><PlayerOp:left><AgentOP:brake>"),
    ("Turn right here <Cont or EOS><PlayerOp:x><AgentOP:y>",
     "Turn right here <Cont><PlayerOp:right><AgentOP:keep>"),  # the prompt's placeholders
    ("<Cont>", "<Cont><PlayerOp:keep><AgentOP:keep>"),
])
def test_driving_replies_without_tags_get_inferred_ones(text: str, expected: str) -> None:
    assert check(text) is not None
    assert finalize(text) == expected
    assert check(finalize(text)) is None


@pytest.mark.parametrize("text, expected", [
    ("Oxygen is my jam!", "Oxygen is my jam!"),
    (" ".join(["word"] * MAX_WORDS), " ".join(["word"] * MAX_WORDS)),
    ("I carry oxygen. Hemoglobin helps me grab it in the lungs and drop it in your muscles. "
     "Cool, right? Tell me more!",  # 22 words: the last sentence goes
     "I carry oxygen. Hemoglobin helps me grab it in the lungs and drop it in your muscles. "
     "Cool, right?"),
    ("Short one! And another short one? " + "Then a very long sentence " * 5,
     "Short one! And another short one?"),
    ("word, " * 30, " ".join(["word,"] * (MAX_WORDS - 1) + ["word"]) + "..."),
])
def test_bloodcell_word_limit(text: str, expected: str) -> None:
    assert cut(text) == expected
    assert len(cut(text).split()) <= MAX_WORDS


def test_projects_name_their_rules() -> None:
    assert load_project("driving").output_rules.module == "driving_rules"  # type: ignore[union-attr]
    assert load_project("bloodcell").output_rules.finalize is cut  # type: ignore[union-attr]
    assert load_project("bloodcell").output_rules.check is None  # type: ignore[union-attr]
    assert load_project("general").output_rules is None
    assert load_project("maze").output_rules is None  # chat replies stay text; hints are JSON


@pytest.mark.parametrize("value, message", [
    ("no_such_rules", "no projects/no_such_rules.py"),
    ("maze_path", "neither check"),
    ("../etc", "no module name"),
    (["driving_rules"], "must be a module name"),
])
def test_bad_output_rules(tmp_path: Path, value: object, message: str) -> None:
    import yaml

    (tmp_path / "game.yaml").write_text(yaml.safe_dump({"system_prompt": "Hi.", "output_rules": value}))
    with pytest.raises(ValueError, match=message):
        load_project("game", tmp_path)


def test_unknown_keys_still_an_error(tmp_path: Path) -> None:
    (tmp_path / "game.yaml").write_text("system_prompt: Hi.\nrules: driving_rules\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_project("game", tmp_path)
    assert load_rules("driving_rules").check is check
