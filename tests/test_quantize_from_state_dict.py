"""The quantization tool on a source stored as PyTorch state dicts (``pytorch_model*.bin``):
it writes what it writes from the same model in safetensors, unpickles each file once, and
a file that is not a state dict is a clear error naming it."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.loader import load_model
from engine.quantization import resolve
from engine.quantize import quantize_checkpoint
from tests.checkpoints import as_state_dict, tiny_checkpoint
from tests.quant_checkpoints import logits, prompt_ids

torch.set_num_threads(1)

# two files and no index: a layout transformers' own loader does not find
BIN_FILES = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
CASES = {
    "int8": dict(method="int8"),  # weight by weight, no model run
    "gptq": dict(method="gptq", group_size=32, num_samples=4, seq_len=32),  # calibrated
}


def src() -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def bin_source(tmp_path_factory) -> Path:
    return as_state_dict(src(), tmp_path_factory.mktemp("bin") / "model", *BIN_FILES)


def _load(path: Path) -> torch.nn.Module:
    quant = resolve(None, path, ModelConfig.from_pretrained(path).quantization_config, {})
    return load_model(path, torch.float32, "cpu", quant=quant)


@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_bin_source_writes_what_safetensors_writes(
    bin_source: Path, tmp_path: Path, case: str
) -> None:
    assert not list(bin_source.glob("*.safetensors"))
    from_safetensors = quantize_checkpoint(src(), tmp_path / "st", **CASES[case])
    from_bin = quantize_checkpoint(bin_source, tmp_path / "bin", **CASES[case])

    expected, got = (load_file(str(p / "model.safetensors")) for p in (from_safetensors, from_bin))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    assert sorted(f.name for f in from_bin.iterdir()) == sorted(
        f.name for f in from_safetensors.iterdir()
    )
    config = json.loads((from_bin / "config.json").read_text())
    assert config == json.loads((from_safetensors / "config.json").read_text())

    ids = prompt_ids(16)
    got_logits = logits(_load(from_bin), ids)
    assert torch.isfinite(got_logits).all()
    assert torch.equal(got_logits, logits(_load(from_safetensors), ids))


@pytest.mark.parametrize("case", list(CASES))
def test_each_bin_file_unpickled_once_per_run(
    bin_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    real_load, loads = torch.load, Counter()

    def counting_load(file, *args, **kwargs):
        loads[Path(file).name] += 1
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    quantize_checkpoint(bin_source, tmp_path / "out", **CASES[case])
    assert loads == Counter(BIN_FILES)


def test_a_corrupt_bin_source_is_a_clear_error(bin_source: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for file in bin_source.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    corrupt = source / BIN_FILES[1]
    corrupt.write_bytes(b"\x00not a pickle" * 64)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(f"{corrupt}: not a PyTorch state dict")):
        quantize_checkpoint(source, out, "int8")
    assert not out.exists()
