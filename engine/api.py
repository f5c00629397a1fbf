"""The engine's public interface: what the agent may use, and nothing else.

The agent imports only this module, ``engine.tokenizer`` and the engine factory;
a fake engine with the same surface makes agent tests fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine.tokenizer import Tokenizer


class EngineError(Exception):
    """Base class of every error the engine raises for a user to read."""


class UnsupportedError(EngineError):
    """A requested feature, value or architecture that this engine does not support."""


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class EngineConfig:
    """How to build the engine; built once from the command line / YAML."""

    model_path: str
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None  # None: the model's max_position_embeddings ...
    max_model_len_limit: int | None = None  # ... but at most this many (a default, not a demand)
    max_num_seqs: int = 32  # sequences in one batch
    max_num_batched_tokens: int = 4096  # tokens in one forward pass (prefill chunks)
    quantization: str | None = None  # None/"none"/"auto": what the checkpoint's config says
    bnb_quant_type: str = "nf4"  # --quantization bitsandbytes on a plain model: nf4 | fp4 | int8
    kv_cache_dtype: str = "auto"  # auto (model dtype) | fp8 | fp8_e4m3 | fp8_e5m2
    gpu_memory_utilization: float = 0.9
    cpu_memory_utilization: float = 0.5  # share of psutil's available memory on the CPU
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # overrides the memory plan (tests, boxes where it is wrong)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs / compiled CPU step for decode steps
    project_shares: tuple[tuple[str, float], ...] = ()  # (project, kv_share); empty: one pool
    seed: int = 0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len must be >= 16, got {self.max_model_len}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 16:
            raise ValueError("max_num_seqs must be >= 1 and max_num_batched_tokens >= 16")
        for name in ("gpu_memory_utilization", "cpu_memory_utilization"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.bnb_quant_type not in ("nf4", "fp4", "int8"):
            raise ValueError(f"bnb_quant_type must be nf4, fp4 or int8, got {self.bnb_quant_type!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be 8, 16, 32, 64 or 128, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        for project, share in self.project_shares:
            if share <= 0:
                raise ValueError(f"kv_share of project {project!r} must be > 0, got {share}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` means greedy."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length", "cancelled", "error"
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    error: str | None = None
    queue_s: float = 0.0  # submit -> first scheduled
    ttft_s: float = 0.0  # submit -> first token
    total_s: float = 0.0  # submit -> done


@dataclass
class GenerationRequest:
    """One prompt to complete. Callbacks run on the engine thread: keep them short."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    on_done: Callable[[GenerationResult], None]
    project: str = "general"
    on_delta: Callable[[str], None] | None = None  # streamed text deltas, never a split character
    metadata: dict = field(default_factory=dict)


class EngineProtocol(Protocol):
    """What the agent needs from an engine (the real one and test fakes)."""

    tokenizer: Tokenizer
    max_model_len: int

    def start(self) -> None: ...

    def submit(self, request: GenerationRequest) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    def token_budget(self, project: str) -> int:
        """Most tokens (prompt + completion) one request of ``project`` may hold."""
        ...

    def shutdown(self) -> None: ...
