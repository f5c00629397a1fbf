"""A random AWQ or GPTQ checkpoint beside a plain one, for benchmarks of real layer shapes.

Every linear layer of the plain checkpoint becomes random 4-bit codes, zero points and
scales (group 128, or the largest of 64, 32, 16 that divides every layer's input size: tiny
test models) packed in the format's own layout; everything else is copied. The
values are random (the text is noise) but the bytes, shapes and kernels are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from agent.demo.tiny_checkpoint import build_once
from engine.loader import checkpoint_tensor_files
from engine.quantization.packing import pack_awq, pack_gptq_cols, pack_gptq_rows
from engine.tensor_files import open_tensor_file, reading_checkpoint

GROUP_SIZES = (128, 64, 32, 16)  # the first that divides every linear layer's input size
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
    linears: list[tuple[str, int, int]] = []  # (layer, in features, out features)
    for name, file in checkpoint_tensor_files(plain).items():
        with open_tensor_file(file) as fh:
            tensor = fh.get(name)
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer.rsplit(".", 1)[-1] in _LINEARS:
            linears.append((layer, tensor.shape[1], tensor.shape[0]))
        else:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    group = group_size([k for _, k, _ in linears])
    for layer, k, n in linears:
        tensors.update(_quantized_layer(layer, k, n, group, method, gen))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for extra in plain.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name != "model.safetensors.index.json":
            shutil.copy(extra, out / extra.name)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
        if method == "awq"
        else {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
              "sym": False, "checkpoint_format": "gptq"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))


def group_size(in_features: list[int]) -> int:
    """The largest of GROUP_SIZES that divides every input size."""
    for group in GROUP_SIZES:
        if all(k % group == 0 for k in in_features):
            return group
    raise ValueError(f"no group size of {GROUP_SIZES} divides the layers' input sizes "
                     f"{sorted(set(in_features))}")


def _quantized_layer(prefix: str, k: int, n: int, group: int, method: str,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
    groups = k // group
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
        f"{prefix}.g_idx": (torch.arange(k) // group).to(torch.int32),
    }
