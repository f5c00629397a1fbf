"""Tiny AWQ / GPTQ / SqueezeLLM checkpoints built at test time from random integers.

``build_quant_checkpoint(dest, spec)`` takes a cached tiny fp checkpoint
(``tests.checkpoints.tiny_checkpoint``: its config.json and tokenizer), replaces every
decoder linear ``weight [N, K]`` by the format's tensors packed from random integers
(``engine.quantization.packing``), and writes the quantization config where the tools
put it. Building one takes milliseconds; ``QuantCheckpoints`` keeps each under a tmp dir
once per test module.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.quantization.packing import pack_awq, pack_gptq_cols, pack_gptq_rows, pack_squeezellm
from tests.checkpoints import tiny_checkpoint

CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class QuantSpec:
    method: str  # awq | gptq | squeezellm
    bits: int = 4
    group_size: int = 32
    zero_point: bool = True  # awq: False writes no qzeros
    sym: bool | None = False  # gptq; None leaves 'sym' out of the config
    g_idx: str = "natural"  # gptq: natural | act-order (a random permutation) | scattered
    checkpoint_format: str = "gptq"  # gptq v1 (stores z - 1) or gptq_v2
    where: str = "config.json"  # config.json (quantization_config) or side (the tool's own file)
    arch: str = "llama"
    model_kw: tuple[tuple[str, int], ...] = ()  # tiny_checkpoint overrides
    extra: tuple[tuple[str, object], ...] = field(default=())  # extra / overriding config keys
    seed: int = 0

    @property
    def desc_act(self) -> bool:
        return self.g_idx != "natural"


def decoder_linears(fp_tensors: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of the quantized layers (``model.layers.0.self_attn.q_proj``, ...)."""
    return sorted(n[: -len(".weight")] for n in fp_tensors if n.endswith("_proj.weight"))


def build_quant_checkpoint(dest: Path, spec: QuantSpec) -> Path:
    src = tiny_checkpoint(spec.arch, **dict(spec.model_kw))
    dest.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    tensors = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(spec.seed)
    for prefix in decoder_linears(tensors):
        n, k = tensors.pop(f"{prefix}.weight").shape
        tensors.update({f"{prefix}.{name}": t for name, t in _layer(spec, k, n, gen).items()})
    save_file(
        {n: t.contiguous() for n, t in tensors.items()},
        dest / "model.safetensors",
        metadata={"format": "pt"},
    )
    _write_config(dest, spec)
    return dest


def _scales(groups: int, n: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """fp16 scales that keep W ~ 1/sqrt(K), so the tiny model's logits stay spread out."""
    return ((0.5 + torch.rand(groups, n, generator=gen)) * 4 / (2**bits * k**0.5)).half()


def _layer(spec: QuantSpec, k: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    b = spec.bits
    if spec.method == "squeezellm":
        q = torch.randint(0, 2**b, (k, n), generator=gen)
        lut = torch.randn(n, 2**b, generator=gen) / k**0.5
        return {"qweight": pack_squeezellm(q, b), "lookup_table": lut}
    group = k if spec.group_size == -1 else spec.group_size
    groups = -(-k // group)
    q = torch.randint(0, 2**b, (k, n), generator=gen)
    scales = _scales(groups, n, k, b, gen)
    if spec.method == "awq":
        out = {"qweight": pack_awq(q), "scales": scales}
        if spec.zero_point:
            out["qzeros"] = pack_awq(torch.randint(0, 16, (groups, n), generator=gen))
        return out
    # gptq
    if spec.sym in (True, None):
        z = torch.full((groups, n), 2 ** (b - 1))
    else:
        z = torch.randint(0, 2**b, (groups, n), generator=gen)
    stored = z - 1 if spec.checkpoint_format == "gptq" else z  # v1 stores z - 1 (maybe -1)
    natural = torch.arange(k) // group
    if spec.g_idx == "natural":
        g_idx = natural
    elif spec.g_idx == "act-order":  # GPTQ's: channel perm[i] is the i-th quantized
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = natural
    else:  # groups of unequal sizes: no packed layout fits
        g_idx = torch.randint(0, groups, (k,), generator=gen)
    return {
        "qweight": pack_gptq_rows(q, b),
        "qzeros": pack_gptq_cols(stored, b),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }


def quant_config(spec: QuantSpec) -> tuple[str, dict]:
    """(file name, config) as the tools write them; "config.json" means quantization_config."""
    if spec.method == "awq":
        if spec.where == "side":  # older AutoAWQ: quant_config.json
            raw = {
                "w_bit": spec.bits,
                "q_group_size": spec.group_size,
                "zero_point": spec.zero_point,
                "version": "GEMM",
            }
            return "quant_config.json", {**raw, **dict(spec.extra)}
        raw = {
            "quant_method": "awq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "zero_point": spec.zero_point,
            "version": "gemm",
        }
        return "config.json", {**raw, **dict(spec.extra)}
    if spec.method == "squeezellm":
        return "quant_config.json", {"wbits": spec.bits, **dict(spec.extra)}
    raw = {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.desc_act,
        "static_groups": False,
        "damp_percent": 0.01,
        "true_sequential": True,
        "checkpoint_format": spec.checkpoint_format,
    }
    if spec.sym is not None:
        raw["sym"] = spec.sym
    raw.update(dict(spec.extra))
    if spec.where == "side":
        return "quantize_config.json", raw
    return "config.json", {"quant_method": "gptq", **raw}


def _write_config(dest: Path, spec: QuantSpec) -> None:
    fname, raw = quant_config(spec)
    if fname == "config.json":
        config = json.loads((dest / "config.json").read_text())
        config["quantization_config"] = raw
        (dest / "config.json").write_text(json.dumps(config, indent=2))
    else:
        (dest / fname).write_text(json.dumps(raw, indent=2))


class QuantCheckpoints:
    """Each spec built once under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[QuantSpec, Path] = {}

    def __call__(self, spec: QuantSpec) -> Path:
        if spec not in self._built:
            self._built[spec] = build_quant_checkpoint(self.root / f"ckpt{len(self._built)}", spec)
        return self._built[spec]

    def copy(self, spec: QuantSpec, dest: Path) -> Path:
        """A private copy a test may edit."""
        return Path(shutil.copytree(self(spec), dest))
