"""One GGUF file: its tensors (``gguf.GGUFReader``, memory-mapped), and the config and
tokenizer transformers builds from its metadata (``gguf_file=``).

transformers' GGUF config is used as it is, with three corrections from the file's own
keys (read through ``GGUFReader.fields``): ``architectures`` (it sets none), ``head_dim``
from ``<arch>.attention.key_length`` (its Qwen3 mapping skips that key and falls back to the
class default), and rope scaling: linear, or a ``rope_freqs`` tensor (llama.cpp's form of
Llama 3.1 scaling: one divisor per frequency pair, which the rotary applies as it is).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engine.config import ModelConfig
from engine.gguf.mapping import GGUFArchitectureError, check_architecture
from engine.gguf.types import GROUP_TYPES, PLAIN_TYPES, check_type

_DTYPE_NAMES = {gguf.GGMLQuantizationType.F32: "float32", gguf.GGMLQuantizationType.F16: "float16",
                gguf.GGMLQuantizationType.BF16: "bfloat16"}


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-pair rope divisors (Llama 3.1+)

class GGUFCheckpoint:
    """A GGUF model file, opened once (the tensor data stays on disk until read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.architecture = str(self.field("general.architecture"))
        self.model_class = check_architecture(self.architecture, str(self.path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.tensors.values():
            check_type(int(t.tensor_type), t.name)

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (``GGUFReader``'s own decoding), ``default`` when absent."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    def tensor_type(self, name: str) -> int:
        return int(self.tensors[name].tensor_type)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's data as stored: float values ``[rows, cols]`` for F32/F16/BF16
        (BF16 as uint16), uint8 blocks ``[rows, bytes per row]`` otherwise."""
        t = self.tensors[name]
        data = np.asarray(t.data)
        rows = int(np.prod([int(d) for d in t.shape[1:]])) if len(t.shape) > 1 else 1
        return data.reshape(rows, -1) if len(t.shape) > 1 else data.reshape(-1)

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order (GGUF lists the fastest axis first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        """transformers' config dict for this file (``AutoConfig.from_pretrained(gguf_file=)``)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{self.path}: transformers cannot read its config: {exc}") from exc
        return config.to_dict()

    def model_config(self) -> ModelConfig:
        raw = dict(self.hf_config)
        raw["architectures"] = [self.model_class]
        head_dim = self.arch_field("attention.key_length") or self.arch_field("rope.dimension_count")
        if head_dim:
            raw["head_dim"] = int(head_dim)
        raw["rope_parameters"] = self._rope(raw)
        raw["torch_dtype"] = self._dtype_name()
        eos = raw.get("eos_token_id")
        eot = self.field("tokenizer.ggml.eot_token_id")
        eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        raw["eos_token_id"] = eos_ids or None
        return ModelConfig.from_dict(raw, source=str(self.path))

    def _rope(self, raw: dict[str, Any]) -> dict[str, Any]:
        params = dict(raw.get("rope_parameters") or {})
        theta = self.arch_field("rope.freq_base", params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        if ROPE_FREQS in self.tensors:  # Llama 3.1+: per-pair divisors, applied by llama.cpp as they are
            factors = plain_values(self, ROPE_FREQS).reshape(-1)
            return {"rope_type": "freq_factors", "rope_theta": float(theta),
                    "freq_factors": [float(f) for f in factors]}
        kind = self.arch_field("rope.scaling.type", "none")
        if kind in ("none", None):
            return {"rope_type": "default", "rope_theta": float(theta)}
        if kind == "linear":
            return {"rope_type": "linear", "rope_theta": float(theta),
                    "factor": float(self.arch_field("rope.scaling.factor"))}
        raise GGUFArchitectureError(f"{self.path}: rope scaling {kind!r} is not supported (none and linear are)")

    def _dtype_name(self) -> str:
        """float16 for a quantized file (its block scales are fp16), else its weights' type."""
        types = {self.tensor_type(n) for n, t in self.tensors.items() if len(t.shape) > 1}
        if types & set(GROUP_TYPES) or not types:
            return "float16"
        for t in (gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F16):
            if t in types:
                return _DTYPE_NAMES[t]
        return "float32"

    def hf_tokenizer(self):
        """transformers' tokenizer (with the file's chat template) built from the metadata."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                 local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{self.path}: transformers cannot build its tokenizer: {exc}") from exc

    def describe_types(self) -> str:
        """``Q4_K x 96, Q6_K x 17, F32 x 61`` for the log."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return ", ".join(f"{k} x {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def plain_values(ck: GGUFCheckpoint, name: str) -> np.ndarray:
    """An F32/F16/BF16 tensor's values as float32, in torch order."""
    ggml_type = ck.tensor_type(name)
    assert ggml_type in PLAIN_TYPES, name
    data = ck.raw(name)
    if ggml_type == gguf.GGMLQuantizationType.BF16:  # numpy has no bfloat16: widen the bits
        data = np.ascontiguousarray(data).view(np.uint16)  # the reader hands out its bytes
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32).reshape(ck.shape(name))
