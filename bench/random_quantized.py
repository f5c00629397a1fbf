"""A random AWQ or GPTQ checkpoint beside a plain one, for benchmarks of real layer shapes.

Every linear layer of the plain checkpoint becomes random 4-bit codes, zero points and
scales (group 128) packed in the format's own layout; everything else is copied. The
values are random (the text is noise) but the bytes, shapes and kernels are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.loader import checkpoint_tensor_files
from engine.quantization.packing import pack_awq, pack_gptq_cols, pack_gptq_rows
from engine.tensor_files import open_tensor_file, reading_checkpoint
from engine.tiny_checkpoint import build_once

GROUP = 128
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_quantized_checkpoint(plain: Path, method: str, seed: int = 0) -> Path:
    """The ``method`` (awq | gptq) twin of the checkpoint at ``plain``, built once."""
    assert method in ("awq", "gptq"), method
    return build_once(plain.parent / f"{plain.name}-{method}-random",
                      lambda out: _build(plain, out, method, seed))


@reading_checkpoint()  # one open per tensor below: a state dict is still unpickled once
def _build(plain: Path, out: Path, method: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, file in checkpoint_tensor_files(plain).items():
        with open_tensor_file(file) as fh:
            tensor = fh.get(name)
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer.rsplit(".", 1)[-1] in _LINEARS:
            tensors.update(_quantized_layer(layer, tensor.shape[1], tensor.shape[0], method, gen))
        else:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for extra in plain.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name != "model.safetensors.index.json":
            shutil.copy(extra, out / extra.name)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
        if method == "awq"
        else {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
              "sym": False, "checkpoint_format": "gptq"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _quantized_layer(prefix: str, k: int, n: int, method: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    groups = k // GROUP
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 15, (groups, n), generator=gen, dtype=torch.int32)
    # scales so that W has roughly unit-variance rows after the 1/sqrt(K) of a trained layer
    scales = ((torch.rand(groups, n, generator=gen) + 0.5) / (4 * k**0.5)).to(torch.float16)
    if method == "awq":
        return {f"{prefix}.qweight": pack_awq(q), f"{prefix}.qzeros": pack_awq(zeros),
                f"{prefix}.scales": scales}
    return {
        f"{prefix}.qweight": pack_gptq_rows(q, 4),
        f"{prefix}.qzeros": pack_gptq_cols(zeros - 1, 4),  # v1 stores z - 1
        f"{prefix}.scales": scales,
        f"{prefix}.g_idx": (torch.arange(k) // GROUP).to(torch.int32),
    }
