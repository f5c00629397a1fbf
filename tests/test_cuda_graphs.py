"""Decode steps through CUDA graphs: the padded static-buffer path on the CPU (run eagerly),
and captured graphs on a GPU, against plain eager steps."""

from __future__ import annotations

import pytest
import torch

from engine import create_engine
from engine.api import EngineConfig, SamplingParams
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from engine.layers.attention import AttentionMetadata
from tests.checkpoints import tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(3, 500, (int(torch.randint(2, 40, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n)]


def engine(device: str, dtype: str = "float32", eager: bool = True, max_num_seqs: int = 16):
    return create_engine(EngineConfig(
        model_path=str(tiny_checkpoint("llama")), device=device, dtype=dtype,
        max_model_len=128, max_num_seqs=max_num_seqs, num_kv_blocks=96, enforce_eager=eager,
    ))


def test_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def static_path(eng, max_num_seqs: int) -> DecodeGraphs:
    runner = eng.runner
    graphs = DecodeGraphs(runner.model, runner.model.config.hidden_size, torch.float32,
                          runner.device, max_num_seqs, eng.max_model_len, runner.block_size,
                          capture=False)
    runner.graphs = graphs
    return graphs


@pytest.mark.parametrize("n", [1, 3, 5, 9])
def test_padded_static_path_equals_eager(n: int) -> None:
    """Batches of 1, 3, 5, 9 decodes padded to 1, 4, 8, 16 give the eager engine's tokens."""
    eager = engine("cpu")
    want = [r.token_ids for r in eager.generate(prompts(n), GREEDY, timeout=60)]
    eager.shutdown()
    padded = engine("cpu")
    graphs = static_path(padded, 16)
    got = [r.token_ids for r in padded.generate(prompts(n), GREEDY, timeout=60)]
    padded.shutdown()
    assert got == want
    assert graphs.runs >= GREEDY.max_tokens - 1  # every decode step took the padded path


def test_padding_rows_write_no_kv() -> None:
    """A padded decode step changes the cache only at the batch's own slots."""
    eng = engine("cpu")
    graphs = static_path(eng, 8)
    runner = eng.runner
    caches = [t for layer in runner.kv_cache.layers for t in (layer.k, layer.v)]
    gen = torch.Generator().manual_seed(1)
    for c in caches:  # random contents: a stray write of anything must show
        c.copy_(torch.randn(c.shape, generator=gen).to(c.dtype))
    before = [c.clone() for c in caches]
    tables = [[5, 6], [9]]
    meta = AttentionMetadata.build([1, 1], [20, 3], tables, runner.block_size, "cpu")
    with torch.inference_mode():
        graphs.run(torch.tensor([7, 8]), torch.tensor([19, 2]), meta)  # size 2: no padding
        meta3 = AttentionMetadata.build([1, 1, 1], [20, 3, 4], tables + [[11]], runner.block_size, "cpu")
        graphs.run(torch.tensor([7, 8, 9]), torch.tensor([19, 2, 3]), meta3)  # padded to 4
    written = set(meta.slot_mapping.tolist()) | set(meta3.slot_mapping.tolist())
    for old, new in zip(before, caches, strict=True):
        flat_old, flat_new = old.flatten(0, 1), new.flatten(0, 1)  # [slots, Hkv, D]
        changed = {i for i in range(flat_old.shape[0]) if not torch.equal(flat_old[i], flat_new[i])}
        assert changed <= written and changed, (changed, written)
    eng.shutdown()


def test_a_failed_capture_falls_back_to_eager_steps(caplog: pytest.LogCaptureFixture) -> None:
    """Capture on a machine where it cannot work (here: no CUDA at all) logs one warning,
    answers that step eagerly, and leaves every later step eager: same tokens as eager."""
    eager = engine("cpu")
    want = [r.token_ids for r in eager.generate(prompts(3), GREEDY, timeout=60)]
    eager.shutdown()
    eng = engine("cpu")
    graphs = static_path(eng, 4)
    graphs.capture = True
    with caplog.at_level("WARNING", logger="engine.cuda_graphs"):
        got = [r.token_ids for r in eng.generate(prompts(3), GREEDY, timeout=60)]
    eng.shutdown()
    assert got == want
    assert graphs.failed and graphs.runs == 1 and graphs.replays == 0
    assert sum("capture failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_graphs_equal_eager_on_gpu(dtype: str) -> None:
    batch = prompts(8) + prompts(3)  # 11 sequences: padded to 16 while all decode
    eager = engine("cuda", dtype, eager=True)
    want = [r.token_ids for r in eager.generate(batch, GREEDY, timeout=120)]
    eager.shutdown()
    graphed = engine("cuda", dtype, eager=False)
    got = [r.token_ids for r in graphed.generate(batch, GREEDY, timeout=120)]
    assert graphed.runner.graphs is not None and graphed.runner.graphs.replays > 0
    assert sorted(graphed.runner.graphs.graphs) == graph_batch_sizes(16)
    # again, with the graphs captured: alone and in a batch of 3
    again = [r.token_ids for r in graphed.generate(batch[:3], GREEDY, timeout=120)]
    graphed.shutdown()
    if dtype == "float32":
        assert got == want and again == want[:3]
    else:  # fp16/bf16: padded batches may round differently; the first tokens must agree
        agree = sum(g[:4] == w[:4] for g, w in zip(got, want, strict=True))
        assert agree >= len(want) - 1, (got, want)


@pytest.mark.gpu
@gpu
def test_prefill_batches_stay_eager_on_gpu() -> None:
    eng = engine("cuda", "float16", eager=False)
    meta = AttentionMetadata.build([3, 1], [3, 5], [[0], [1]], eng.runner.block_size, "cuda")
    assert not eng.runner.graphs.can_run(meta)
    eng.shutdown()
