"""Checkpoints as PyTorch state dicts (SqueezeLLM's released ``.pt`` files, older ``.bin``
folders) load like safetensors ones, each file unpickled once per start-up and not kept
after it; a file that is not a plain state dict is refused."""

from __future__ import annotations

import gc
import pickle
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import create_engine
from engine.api import EngineConfig, SamplingParams
from engine.config import ModelConfig
from engine.loader import load_model
from engine.quantization import resolve
from engine.tensor_files import open_tensor_file, reading_checkpoint
from tests.checkpoints import as_state_dict, tiny_checkpoint, with_tensors
from tests.quant_fixtures import QuantSpec, build_quant_checkpoint

SHARDS = tuple(f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3))


class _TrackedDict(dict):
    """What the counting ``torch.load`` returns: a dict a test can hold a weak reference to."""


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[str], list[weakref.ref]]:
    """Counts ``torch.load`` calls by file name; weak references to every dict it returned."""
    real_load = torch.load
    calls: Counter[str] = Counter()
    returned: list[weakref.ref] = []

    def counting_load(file, *args, **kwargs):
        calls[Path(file).name] += 1
        loaded = _TrackedDict(real_load(file, *args, **kwargs))
        returned.append(weakref.ref(loaded))
        return loaded

    monkeypatch.setattr(torch, "load", counting_load)
    return calls, returned


def load(path: Path) -> torch.nn.Module:
    quant = resolve(None, path, ModelConfig.from_pretrained(path).quantization_config, {})
    return load_model(path, torch.float32, "cpu", quant=quant)


def test_squeezellm_pt_state_dict_loads_like_safetensors(tmp_path: Path) -> None:
    src = build_quant_checkpoint(tmp_path / "st", QuantSpec(method="squeezellm", bits=4))
    pt = as_state_dict(src, tmp_path / "pt", "sq-tiny-w4.pt")
    a, b = load(src), load(pt)
    buffers = dict(a.named_buffers())
    # on the CPU a lookup-table layer is dequantized once at load (engine.quantization.cpu_bind)
    assert buffers and any(n.endswith(("lut", "dense_weight")) for n in buffers)
    for name, tensor in b.named_buffers():
        assert torch.equal(tensor, buffers[name]), name
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    src = build_quant_checkpoint(tmp_path / "st", QuantSpec(method="squeezellm", bits=4))
    bad = as_state_dict(src, tmp_path / "bad", "model.pt")
    (bad / "model.pt").write_bytes(pickle.dumps({"weights": object()}))
    with pytest.raises(ValueError, match="model.pt: not a PyTorch state dict"):
        load(bad)


def test_engine_start_up_unpickles_each_state_dict_once_and_keeps_none(
    tmp_path: Path, torch_loads: tuple[Counter[str], list[weakref.ref]]
) -> None:
    """Names, weights and fp8 KV scales all come from one unpickling per ``.bin`` shard; the
    engine generates what the same tensors give it from safetensors; no dict outlives start-up."""
    calls, returned = torch_loads
    scales = {
        f"model.layers.{i}.self_attn.{kind}": torch.tensor(0.25 * (i + 1) + (kind == "v_scale"))
        for i in range(2)
        for kind in ("k_scale", "v_scale")
    }
    st = with_tensors(tiny_checkpoint("qwen2"), tmp_path / "st", scales)
    bins = as_state_dict(st, tmp_path / "bin", *SHARDS)
    engines = {
        name: create_engine(
            EngineConfig(model_path=str(path), device="cpu", dtype="float32", kv_cache_dtype="fp8")
        )
        for name, path in (("st", st), ("bin", bins))
    }
    try:
        assert calls == {name: 1 for name in SHARDS}
        gc.collect()
        assert len(returned) == len(SHARDS)
        assert all(ref() is None for ref in returned), "a state dict outlived start-up"

        st_engine, bin_engine = engines["st"], engines["bin"]
        assert bin_engine.runner.kv_cache.k_scales == pytest.approx([0.25, 0.5])
        assert bin_engine.runner.kv_cache.v_scales == pytest.approx([1.25, 1.5])
        st_params = dict(st_engine.runner.model.named_parameters())
        for name, param in bin_engine.runner.model.named_parameters():
            assert torch.equal(param, st_params[name]), name
        greedy = SamplingParams(temperature=0, max_tokens=8)
        prompts = [[5, 6, 7], [11, 3, 9, 2, 30]]
        expected = [r.token_ids for r in st_engine.generate(prompts, greedy, 60.0)]
        assert [r.token_ids for r in bin_engine.generate(prompts, greedy, 60.0)] == expected
    finally:
        for engine in engines.values():
            engine.shutdown()


def test_state_dicts_are_shared_only_inside_a_checkpoint_read(
    tmp_path: Path, torch_loads: tuple[Counter[str], list[weakref.ref]]
) -> None:
    """Outside ``reading_checkpoint()`` every open unpickles; inside (nested too) one dict is
    shared, and dropped at the exit."""
    calls, returned = torch_loads
    path = as_state_dict(tiny_checkpoint("qwen2"), tmp_path / "bin", "model.bin")
    for _ in range(2):
        with open_tensor_file(path / "model.bin") as fh:
            assert "model.embed_tokens.weight" in fh.names()
    assert calls["model.bin"] == 2
    with reading_checkpoint():
        with reading_checkpoint(), open_tensor_file(path / "model.bin") as fh:  # nested: joins
            embed = fh.get("model.embed_tokens.weight")
        with open_tensor_file(path / "model.bin") as fh:
            assert fh.get("model.embed_tokens.weight") is embed
        assert calls["model.bin"] == 3
    del fh
    gc.collect()
    assert all(ref() is None for ref in returned)
    with open_tensor_file(path / "model.bin"):
        pass
    assert calls["model.bin"] == 4
