"""The compiled CPU decode step (engine.cpu_graphs): where it applies, that it is compiled at
start-up only (no request waits for a recompile), that it gives the eager step's results, and
that a compile failure leaves a working eager engine."""

from __future__ import annotations

import logging

import pytest
from torch._dynamo.utils import counters

import engine.cpu_graphs as cpu_graphs
from engine import create_engine
from engine.api import EngineConfig, SamplingParams
from engine.cpu_graphs import CpuDecodeGraph
from tests.checkpoints import tiny_checkpoint

PROMPTS = [[3, 17, 5, 250, 9], [41, 7], [8, 8, 12, 99, 100, 101, 4, 2, 66], [1, 2, 3]]


def _engine(architecture: str, dtype: str, **options) -> object:
    return create_engine(EngineConfig(model_path=str(tiny_checkpoint(architecture)), device="cpu",
                                      dtype=dtype, max_model_len=128, num_kv_blocks=64, **options))


def _greedy(engine, prompts: list[list[int]], tokens: int = 12) -> list[list[int]]:
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def compiled():
    engine = _engine("llama", "bfloat16")
    yield engine
    engine.shutdown()


def test_half_precision_decode_is_compiled_at_start_up(compiled) -> None:
    graphs = compiled.runner.graphs
    assert isinstance(graphs, CpuDecodeGraph) and graphs.ready


def test_no_batch_or_length_compiles_again_after_start_up(compiled) -> None:
    frames = counters["frames"]["total"]
    for n in (1, 2, 4, 1, 3):  # batch sizes 1..4, lengths 2..9 plus what they generate
        _greedy(compiled, PROMPTS[:n] if n <= len(PROMPTS) else PROMPTS)
    assert counters["frames"]["total"] == frames


def test_compiled_steps_give_the_eager_steps_tokens(compiled) -> None:
    eager = _engine("llama", "bfloat16", enforce_eager=True)
    try:
        assert eager.runner.graphs is None
        assert _greedy(compiled, PROMPTS) == _greedy(eager, PROMPTS)
        assert _greedy(compiled, PROMPTS[:1]) == _greedy(eager, PROMPTS[:1])
    finally:
        eager.shutdown()


def test_float32_the_exact_mode_stays_eager() -> None:
    engine = _engine("qwen2", "float32")
    try:
        assert engine.runner.graphs is None
    finally:
        engine.shutdown()


def test_a_failed_compile_leaves_a_working_eager_engine(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def no_compiler(fn, **_options):
        def run(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(cpu_graphs.torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="engine.cpu_graphs"):
        engine = _engine("qwen2", "bfloat16")
    try:
        assert engine.runner.graphs is None
        assert "InvalidCxxCompiler" in caplog.text and "eager" in caplog.text
        assert all(len(tokens) == 12 for tokens in _greedy(engine, PROMPTS))
    finally:
        engine.shutdown()


def test_a_step_that_fails_later_runs_eagerly_from_then_on(compiled, caplog: pytest.LogCaptureFixture) -> None:
    graphs = compiled.runner.graphs
    expected = _greedy(compiled, PROMPTS[:2])
    working = graphs._compiled

    def broken(*args, **kwargs):
        raise RuntimeError("recompile failed")

    graphs._compiled = broken
    try:
        with caplog.at_level(logging.WARNING, logger="engine.cpu_graphs"):
            assert _greedy(compiled, PROMPTS[:2]) == expected  # this step and the next: eager
        assert not graphs.ready and "recompile failed" in caplog.text
    finally:
        graphs._compiled, graphs.ready = working, True


def test_two_engines_in_one_process_run_their_own_graphs(tmp_path) -> None:
    """A model of another structure (a GGUF file's int4 layers, then plain layers) compiled
    in the same process gets its own graph, not the first engine's, whose guards on the
    weights are skipped."""
    from tests.gguf_files import gguf_file

    first = create_engine(EngineConfig(model_path=str(gguf_file(tmp_path, "Q4_1")), device="cpu",
                                       dtype="bfloat16", max_model_len=128, num_kv_blocks=64))
    try:
        assert first.runner.graphs is not None and first.runner.graphs.ready
        _greedy(first, PROMPTS[:1], 3)
        other = _engine("llama", "bfloat16")
        eager = _engine("llama", "bfloat16", enforce_eager=True)
        try:
            assert other.runner.graphs is not None and other.runner.graphs.ready
            assert _greedy(other, PROMPTS) == _greedy(eager, PROMPTS)
        finally:
            other.shutdown()
            eager.shutdown()
    finally:
        first.shutdown()
