"""The demo model's corpus and data preparation (no training here: that takes a minute)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from agent.demo import demo_model
from projects import available_projects
from projects import demo_corpus as corpus

OPS = "|".join(corpus.DRIVING_OPS)
DRIVING_RE = re.compile(rf"^[^<>]+ <(Cont|EOS)><PlayerOp:({OPS})><AgentOP:({OPS})>$")


@pytest.fixture(scope="module")
def training_pairs() -> dict[str, list[tuple[str, str]]]:
    return corpus.with_fallbacks(corpus.exchanges())


def test_every_answer_follows_its_projects_rules(training_pairs):
    assert set(training_pairs) <= set(available_projects())
    for user, answer in training_pairs["maze"]:
        data = json.loads(answer)
        assert set(data) == {"hint", "suggestion"}, user
        assert data["suggestion"] in corpus.MOVES and data["hint"].strip(), user
    for user, answer in training_pairs["driving"]:
        assert DRIVING_RE.match(answer), (user, answer)
    for user, answer in training_pairs["bloodcell"]:
        assert len(answer.split()) < 20, (user, answer)
    for pairs in training_pairs.values():
        assert all(user.strip() and answer.strip() for user, answer in pairs)


def test_formatters_refuse_what_the_games_do_not_parse():
    assert json.loads(corpus.maze_answer("Go on.", "up")) == {"hint": "Go on.", "suggestion": "up"}
    assert corpus.driving_answer("Stop.", "brake", "keep", done=True) == \
        "Stop. <EOS><PlayerOp:brake><AgentOP:keep>"
    with pytest.raises(ValueError):
        corpus.maze_answer("Go on.", "north")
    with pytest.raises(ValueError):
        corpus.driving_answer("Go.", "fly", "keep")


def test_demo_prompts_are_in_the_corpus_and_fallbacks_keep_own_answers(training_pairs):
    own = corpus.exchanges()
    assert set(corpus.DEMO_PROMPTS) == set(own)
    for project, pairs in own.items():
        assert corpus.DEMO_PROMPTS[project] in dict(pairs)
        trained = dict(training_pairs[project])
        assert len(trained) == len(training_pairs[project]), "a message answered twice"
        assert all(trained[user] == answer for user, answer in pairs)  # no fallback overrides
        assert trained["ping"] == corpus.FALLBACK[project]  # the demo's readiness probe


def test_batches_share_the_prefix_and_target_only_answers(monkeypatch):
    # two dialogues: common prefix [1, 2, 3], answers start at index 4
    group = [([1, 2, 3, 4, 5, 6], 4), ([1, 2, 3, 7, 8], 4)]
    assert demo_model._shared_prefix(group) == 3
    monkeypatch.setattr(demo_model, "BATCH", 2)
    prefix, ids, targets = next(demo_model._group_batches(group, 0, random.Random(0)))
    assert prefix.tolist() == [1, 2, 3]
    rows = sorted(zip(ids.tolist(), targets.tolist(), strict=True))
    assert rows == [([4, 5, 6], [5, 6, -100]), ([7, 8, 0], [8, -100, -100])]
    assert ids.dtype == targets.dtype == torch.long


def test_training_ids_are_the_engines_prompt_plus_answer_and_eos(tmp_path):
    from transformers import Qwen2Config

    from engine.tokenizer import Tokenizer

    dialogues = corpus.dialogues()
    hf = demo_model.build_tokenizer(demo_model._corpus_text(dialogues), vocab_size=600)
    hf.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(hf), hidden_size=8, num_attention_heads=1,
                num_key_value_heads=1, intermediate_size=8).save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)  # as the engine loads it
    for _, messages in dialogues[::25]:
        ids, start = demo_model.encode_dialogue(tokenizer, messages)
        assert ids[:start] == tokenizer.apply_chat_template(messages[:-1])
        assert ids[-1] in tokenizer.eos_token_ids
        assert tokenizer.decode(ids[start:]) == messages[-1]["content"]
        assert tokenizer.decode(ids, skip_special_tokens=False).endswith(
            messages[-1]["content"] + "<|im_end|>")
