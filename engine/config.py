"""The model's configuration, read once from a checkpoint's config.json.

Only what the engine's model code needs, validated up front: a checkpoint this
engine cannot run exactly fails here with a clear message, not later with
wrong text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.api import UnsupportedError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")  # the last: GGUF rope_freqs
_MISSING = object()


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base ``theta`` and an optional scaling of the frequencies."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | freq_factors
    factor: float = 1.0
    freq_factors: tuple[float, ...] = ()  # freq_factors only: each pair's divisor (GGUF rope_freqs)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()  # layers that use the window
    torch_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization_config: dict | None = field(default=None, compare=False)

    def layer_sliding_window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_window_layers else None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        raw = _read_json(path / "config.json", required=True)
        gen = _read_json(path / "generation_config.json", required=False) or {}
        return cls.from_dict(raw, generation_config=gen, source=str(path / "config.json"))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation_config: dict | None = None, source: str = "config.json"
    ) -> ModelConfig:
        r = _Reader(raw, source)
        archs = r.get("architectures", list)
        if not archs or not isinstance(archs[0], str):
            raise ValueError(f"{source}: 'architectures' must be a non-empty list of names")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = r.get("hidden_act", str, "silu")
        if act != "silu":
            raise UnsupportedError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")

        hidden, heads = r.get("hidden_size", int), r.get("num_attention_heads", int)
        kv_heads = r.get("num_key_value_heads", int, None) or heads
        head_dim = r.get("head_dim", int, None) or hidden // heads
        num_layers = r.get("num_hidden_layers", int)
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads {heads} is not a multiple of {kv_heads} KV heads"
            )

        window, window_layers = _sliding_window(r, arch, num_layers)
        eos = _eos_ids(r.get("eos_token_id", (int, list), None), source)
        eos += [
            i
            for i in _eos_ids((generation_config or {}).get("eos_token_id"), source)
            if i not in eos
        ]
        quant = r.get("quantization_config", dict, None)
        return cls(
            architecture=arch,
            vocab_size=r.get("vocab_size", int),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=r.get("intermediate_size", int),
            rms_norm_eps=float(r.get("rms_norm_eps", (int, float), 1e-6)),
            rope=_rope(r),
            max_position_embeddings=r.get("max_position_embeddings", int),
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
            # Qwen2 always has q/k/v biases; its config has no key for them.
            attention_bias=arch == "Qwen2ForCausalLM" or r.get("attention_bias", bool, False),
            mlp_bias=r.get("mlp_bias", bool, False),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
            sliding_window_layers=window_layers,
            torch_dtype=r.get("torch_dtype", str, None) or r.get("dtype", str, None),
            eos_token_ids=tuple(eos),
            quantization_config=dict(quant) if quant else None,
        )


class _Reader:
    """Typed access to a config dict with messages naming the file and the key."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def get(self, key: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        if key not in self.raw or (self.raw[key] is None and default is not _MISSING):
            if default is _MISSING:
                raise ValueError(f"{self.source}: required key {key!r} is missing")
            return default
        value = self.raw[key]
        types = types if isinstance(types, tuple) else (types,)
        # bool is an int in Python; a flag where a number belongs is a mistake.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{self.source}: key {key!r} must be {names}, got {value!r}")
        return value


def _read_json(file: Path, required: bool) -> dict | None:
    if not file.is_file():
        if required:
            raise ValueError(f"{file} not found: is {file.parent} a model checkpoint folder?")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def _eos_ids(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
    return list(dict.fromkeys(ids))


def _rope(r: _Reader) -> RopeConfig:
    """Accept transformers 5 ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling``."""
    params = r.get("rope_parameters", dict, None)
    if params is None:
        params = dict(r.get("rope_scaling", dict, None) or {})
        params.setdefault("rope_theta", r.get("rope_theta", (int, float), 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedError(
            f"{r.source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    p = _Reader(params, f"{r.source} (rope parameters)")
    theta = float(p.get("rope_theta", (int, float), r.get("rope_theta", (int, float), 10000.0)))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "freq_factors":
        factors = p.get("freq_factors", list)
        if not factors or not all(isinstance(f, (int, float)) and f > 0 for f in factors):
            raise ValueError(f"{r.source}: freq_factors must be a list of positive numbers")
        return RopeConfig(theta=theta, rope_type="freq_factors", freq_factors=tuple(map(float, factors)))
    factor = float(p.get("factor", (int, float)))
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(p.get("low_freq_factor", (int, float))),
        high_freq_factor=float(p.get("high_freq_factor", (int, float))),
        original_max_position_embeddings=p.get("original_max_position_embeddings", int),
    )


def _sliding_window(r: _Reader, arch: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Mistral: every layer when set. Qwen2/3: only with use_sliding_window, per layer_types
    (or from max_window_layers on). Llama: never."""
    if arch == "LlamaForCausalLM":
        return None, ()
    window = r.get("sliding_window", int, None)
    if arch != "MistralForCausalLM" and not r.get("use_sliding_window", bool, False):
        window = None
    if window is None:
        return None, ()
    if arch == "MistralForCausalLM":
        return window, tuple(range(num_layers))
    types = r.get("layer_types", list, None)
    if types is not None:
        if len(types) != num_layers:
            raise ValueError(
                f"{r.source}: layer_types has {len(types)} entries for {num_layers} layers"
            )
        return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    first = r.get("max_window_layers", int, num_layers)
    return window, tuple(range(first, num_layers))
