"""The engine end to end on the tiny qwen2 checkpoint (fp32, CPU)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine import create_engine
from engine.api import (
    EngineConfig,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    UnsupportedError,
)
from engine.config import ModelConfig
from engine.layers.attention import AttentionMetadata
from engine.llm_engine import LLMEngine
from engine.loader import load_model
from engine.tokenizer import Tokenizer
from tests.checkpoints import tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12)
TIMEOUT = 60.0
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Probe(torch.nn.Module):
    """Wraps the model: counts forward passes, records batch layouts, injects failures."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.calls: list[list[int]] = []  # query_lens of every forward
        self.fail_on: set[int] = set()  # 1-based call numbers that raise
        self.hook: Callable[[int], None] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionMetadata):
        self.calls.append(list(ctx.query_lens))
        if self.hook is not None:
            self.hook(len(self.calls))
        if len(self.calls) in self.fail_on:
            raise RuntimeError("injected failure")
        return self.model.forward(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def path() -> Path:
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="module")
def parts(path: Path) -> tuple[Tokenizer, torch.nn.Module]:
    eos = ModelConfig.from_pretrained(path).eos_token_ids
    return Tokenizer.from_pretrained(path, eos), load_model(
        path, torch.float32, torch.device("cpu")
    )


@pytest.fixture
def make(parts, path: Path) -> Iterator[Callable[..., tuple[LLMEngine, Probe]]]:
    engines: list[LLMEngine] = []

    def build(
        tokenizer: Tokenizer | None = None, start: bool = True, **kw
    ) -> tuple[LLMEngine, Probe]:
        config = EngineConfig(model_path=str(path), device="cpu", dtype="float32", **kw)
        probe = Probe(parts[1])
        eng = LLMEngine(config, tokenizer or parts[0], probe, torch.device("cpu"), torch.float32)
        engines.append(eng)
        if start:
            eng.start()
        return eng, probe

    yield build
    for eng in engines:
        eng.shutdown()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 4, 7, 9, 17, 30, 44, 60]
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def alone(parts, path: Path, prompts: list[list[int]]) -> list[GenerationResult]:
    """Each prompt run by itself: the reference for every batching test."""
    config = EngineConfig(model_path=str(path), device="cpu", dtype="float32")
    eng = LLMEngine(config, parts[0], parts[1], torch.device("cpu"), torch.float32)
    try:
        return [eng.generate([p], GREEDY, timeout=TIMEOUT)[0] for p in prompts]
    finally:
        eng.shutdown()


class Collector:
    """Callbacks of many requests: results, deltas, and how often on_done came."""

    def __init__(self) -> None:
        self.results: dict[str, list[GenerationResult]] = {}
        self.deltas: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def request(
        self, rid: str, ids: list[int], sp: SamplingParams = GREEDY, **kw
    ) -> GenerationRequest:
        self.deltas[rid] = []
        return GenerationRequest(
            rid, ids, sp, on_done=self._done, on_delta=self.deltas[rid].append, **kw
        )

    def _done(self, result: GenerationResult) -> None:
        with self.changed:
            self.results.setdefault(result.request_id, []).append(result)
            self.changed.notify_all()

    def wait(self, n: int) -> dict[str, GenerationResult]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.results) >= n, TIMEOUT), self.results
        assert all(len(r) == 1 for r in self.results.values()), "on_done called twice"
        return {rid: r[0] for rid, r in self.results.items()}


def test_create_engine_and_defaults(path: Path) -> None:
    eng = create_engine(EngineConfig(model_path=str(path), device="cpu"))
    try:
        assert eng.max_model_len == ModelConfig.from_pretrained(path).max_position_embeddings
        assert eng.token_budget("maze") == eng.max_model_len
        (res,) = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), TIMEOUT)
        assert res.finish_reason in ("length", "stop") and res.prompt_tokens == 3
        assert 0 <= res.queue_s <= res.ttft_s <= res.total_s
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("quantization", "awq", "not AWQ-quantized"), ("quantization", "marlin-x", "choose one of")],
)
def test_unsupported_options(path: Path, field: str, value: str, words: str) -> None:
    with pytest.raises(UnsupportedError, match=words):
        create_engine(EngineConfig(model_path=str(path), device="cpu", **{field: value}))


def test_batched_greedy_equals_alone_and_is_one_forward_per_step(
    make, prompts, alone: list[GenerationResult]
) -> None:
    eng, probe = make(start=False)
    col = Collector()
    for i, p in enumerate(prompts):
        eng.submit(col.request(f"r{i}", p))
    eng.start()
    results = col.wait(len(prompts))
    for i, ref in enumerate(alone):
        got = results[f"r{i}"]
        assert (got.token_ids, got.text, got.finish_reason) == (
            ref.token_ids,
            ref.text,
            ref.finish_reason,
        ), f"prompt {i}"
        assert "".join(col.deltas[f"r{i}"]) == got.text
        assert len(got.token_ids) == GREEDY.max_tokens or got.finish_reason == "stop"
    assert len(probe.calls) == GREEDY.max_tokens  # 12 steps for 16 x 12 tokens
    assert probe.calls[0] == [len(p) for p in prompts]  # all prefills in one pass
    assert any(r.finish_reason == "length" for r in results.values())
    stats = eng.stats()
    assert stats["processed"] == 16 and stats["running"] == stats["waiting"] == 0
    assert stats["tokens_generated"] == sum(len(r.token_ids) for r in results.values())
    assert stats["prompt_tokens"] == sum(map(len, prompts)) and stats["tokens_per_s"] > 0


def test_matches_transformers_generate(path: Path, make, prompts) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng, _ = make()
    chosen = [prompts[0], prompts[5], prompts[8]]
    ours = eng.generate(chosen, SamplingParams(temperature=0, max_tokens=10), TIMEOUT)
    for p, res in zip(chosen, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10)
        theirs = out[0, len(p) :].tolist()
        eos = hf.generation_config.eos_token_id
        if res.finish_reason == "stop":  # transformers pads after EOS
            theirs = theirs[: len(res.token_ids)]
            assert theirs[-1] in eos
        assert res.token_ids == theirs


def test_requests_join_while_others_decode(make, prompts, alone) -> None:
    eng, probe = make()
    col = Collector()
    late = [3, 7, 12]

    def submit_late(call: int) -> None:
        if call == 4:  # the first request is decoding now
            for i in late:
                eng.submit(col.request(f"r{i}", prompts[i]))

    probe.hook = submit_late
    eng.submit(col.request("r8", prompts[8]))
    results = col.wait(1 + len(late))
    for i in [8, *late]:
        assert results[f"r{i}"].token_ids == alone[i].token_ids
    mixed = probe.calls[4]  # step 5: one decode plus three prefills
    assert mixed == [1, *(len(prompts[i]) for i in late)]
    assert len(probe.calls) <= 4 + GREEDY.max_tokens


def test_seeded_sampling_is_reproducible_whatever_the_batch(make, prompts) -> None:
    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.5, top_p=0.98, max_tokens=12, seed=seed)

    eng, _ = make()
    (a,) = eng.generate([prompts[1]], seeded(1), TIMEOUT)
    mates = [SamplingParams(temperature=1.0, max_tokens=12), GREEDY, seeded(2)]
    batch = eng.generate([*prompts[2:5], prompts[1]], [*mates, seeded(1)], TIMEOUT)
    assert batch[3].token_ids == a.token_ids and batch[3].text == a.text
    assert batch[2].token_ids == eng.generate([prompts[4]], seeded(2), TIMEOUT)[0].token_ids
    others = eng.generate([prompts[1]] * 3, [seeded(2), seeded(3), seeded(4)], TIMEOUT)
    assert any(r.token_ids != a.token_ids for r in others)  # the seed matters


def test_stop_string_ends_the_text(make, parts, prompts, alone) -> None:
    i = next(k for k, r in enumerate(alone) if "\ufffd" not in r.text and len(set(r.token_ids)) > 1)
    text = alone[i].text
    stop = parts[0].decode(alone[i].token_ids[-1:])  # the last new word
    eng, _ = make()
    col = Collector()
    sp = SamplingParams(temperature=0, max_tokens=12, stop=("never", stop))
    eng.submit(col.request("s", prompts[i], sp))
    res = col.wait(1)["s"]
    assert res.finish_reason == "stop" and res.text == text[: text.find(stop)] != ""
    assert "".join(col.deltas["s"]) == res.text
    assert len(res.token_ids) < len(alone[i].token_ids)


def test_eos_stops_and_is_not_in_the_text(make, parts, prompts, alone) -> None:
    i = next(k for k, r in enumerate(alone) if len(set(r.token_ids[:4])) > 1)
    ref = alone[i].token_ids
    eos_id = next(t for t in ref[1:] if t != ref[0])
    cut = ref.index(eos_id)
    tokenizer = Tokenizer(parts[0].hf, extra_eos_token_ids=(eos_id,))
    eng, _ = make(tokenizer=tokenizer)
    (res,) = eng.generate([prompts[i]], GREEDY, TIMEOUT)
    assert res.finish_reason == "stop" and res.token_ids == ref[: cut + 1]
    assert res.text == tokenizer.decode(ref[:cut])
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (bench,) = eng.generate([prompts[i]], sp, TIMEOUT)
    assert bench.finish_reason == "length" and bench.token_ids == ref


def test_cancel_running_and_waiting(make, prompts, alone) -> None:
    eng, probe = make(start=False)
    col = Collector()
    long = SamplingParams(temperature=0, max_tokens=200)
    eng.submit(col.request("waiting", prompts[1], long))
    eng.cancel("waiting")
    eng.submit(col.request("running", prompts[2], long))
    probe.hook = lambda call: eng.cancel("running") if call == 3 else None
    eng.start()
    results = col.wait(2)
    assert results["waiting"].finish_reason == "cancelled" and results["waiting"].token_ids == []
    assert results["running"].finish_reason == "cancelled"
    assert 3 <= len(results["running"].token_ids) <= 4
    eng.cancel("unknown-id")  # harmless
    assert eng.generate([prompts[0]], GREEDY, TIMEOUT)[0].token_ids == alone[0].token_ids
    assert eng.stats()["cancelled"] == 2


def test_shutdown_answers_every_request_once(make, prompts) -> None:
    eng, probe = make(max_num_seqs=2)
    col = Collector()
    started = threading.Event()
    probe.hook = lambda call: started.set() if call == 3 else None
    for i in range(6):
        eng.submit(col.request(f"r{i}", prompts[i], SamplingParams(temperature=0, max_tokens=500)))
    assert started.wait(TIMEOUT)
    eng.shutdown()
    results = col.wait(6)
    assert {r.finish_reason for r in results.values()} == {"cancelled"}
    assert sum(bool(r.token_ids) for r in results.values()) == 2  # two were running
    eng.submit(col.request("late", prompts[0]))
    assert col.wait(7)["late"].finish_reason == "cancelled"
    eng.shutdown()  # idempotent


def test_shutdown_before_start(make, prompts) -> None:
    eng, _ = make(start=False)
    col = Collector()
    eng.submit(col.request("a", prompts[0]))
    eng.shutdown()
    assert col.wait(1)["a"].finish_reason == "cancelled"


def test_forward_failure_fails_only_that_batch(make, prompts, alone) -> None:
    eng, probe = make()
    probe.fail_on = {2}
    first = eng.generate(prompts[:3], GREEDY, TIMEOUT)
    assert [r.finish_reason for r in first] == ["error"] * 3
    assert all("injected failure" in (r.error or "") for r in first)
    assert [len(r.token_ids) for r in first] == [1, 1, 1]  # failed at the first decode
    again = eng.generate(prompts[:3], GREEDY, TIMEOUT)
    assert [r.token_ids for r in again] == [r.token_ids for r in alone[:3]]
    assert eng.stats()["errors"] == 3


def test_raising_callbacks_are_not_fatal(make, prompts, alone) -> None:
    eng, _ = make()

    def boom(_: object) -> None:
        raise ValueError("callback bug")

    eng.submit(GenerationRequest("bad", prompts[0], GREEDY, on_done=boom, on_delta=boom))
    assert eng.generate([prompts[1]], GREEDY, TIMEOUT)[0].token_ids == alone[1].token_ids


def test_invalid_requests_get_an_error_result(make) -> None:
    eng, probe = make(max_model_len=64)
    col = Collector()
    eng.submit(col.request("empty", []))
    eng.submit(col.request("long", [5] * 60, SamplingParams(temperature=0, max_tokens=8)))
    eng.submit(col.request("vocab", [5, 10**6]))
    results = col.wait(3)
    assert {r.finish_reason for r in results.values()} == {"error"}
    assert "empty" in results["empty"].error
    assert "68 exceeds max_model_len 64" in results["long"].error
    assert "outside the vocabulary" in results["vocab"].error
    assert probe.calls == []


def test_shutdown_from_a_callback(make, prompts) -> None:
    eng, _ = make()
    col = Collector()
    eng.submit(GenerationRequest("first", prompts[0], GREEDY, on_done=lambda r: eng.shutdown()))
    eng.submit(col.request("second", prompts[1], SamplingParams(temperature=0, max_tokens=200)))
    assert col.wait(1)["second"].finish_reason == "cancelled"


def test_max_model_len_limit_is_capped_by_the_model(path: Path) -> None:
    model_max = ModelConfig.from_pretrained(path).max_position_embeddings
    eng = create_engine(EngineConfig(model_path=str(path), device="cpu", max_model_len_limit=10**6))
    small = create_engine(EngineConfig(model_path=str(path), device="cpu", max_model_len_limit=64))
    try:
        assert eng.max_model_len == model_max and small.max_model_len == 64
    finally:
        eng.shutdown()
        small.shutdown()
