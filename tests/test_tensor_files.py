"""Checkpoints as PyTorch state dicts (SqueezeLLM's released ``.pt`` files, older ``.bin``
folders) load like safetensors ones; a file that is not a plain state dict is refused."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.loader import load_model
from engine.quantization import resolve
from tests.quant_fixtures import QuantSpec, build_quant_checkpoint


def as_state_dict(src: Path, dest: Path, name: str) -> Path:
    """``src``'s checkpoint with its safetensors replaced by one ``torch.save`` file."""
    shutil.copytree(src, dest)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(dest.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    torch.save(tensors, dest / name)
    return dest


def load(path: Path) -> torch.nn.Module:
    quant = resolve(None, path, ModelConfig.from_pretrained(path).quantization_config, {})
    return load_model(path, torch.float32, "cpu", quant=quant)


def test_squeezellm_pt_state_dict_loads_like_safetensors(tmp_path: Path) -> None:
    src = build_quant_checkpoint(tmp_path / "st", QuantSpec(method="squeezellm", bits=4))
    pt = as_state_dict(src, tmp_path / "pt", "sq-tiny-w4.pt")
    a, b = load(src), load(pt)
    buffers = dict(a.named_buffers())
    assert buffers and any(n.endswith("lut") for n in buffers)
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
