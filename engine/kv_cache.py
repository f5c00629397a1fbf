"""Paged KV cache: per layer, K and V tensors of fixed-size blocks, allocated once.

Layer ``l`` holds ``k, v [num_blocks, block_size, Hkv, D]``; the block manager hands out block
ids, the attention metadata maps tokens to slots (``block * block_size + offset``), and the
attention layer writes and reads through those. ``bind(model)`` gives each ``Attention`` module
its layer's tensors and scales.

FP8 (``kv_cache_dtype`` "fp8" = "fp8_e4m3", or "fp8_e5m2"): the cache stores ``x / scale`` with
one scale per layer for K and one for V, read back as ``fp8 * scale``. Storage and dequantize
on read work wherever torch has the dtype (CPU included; the Triton kernels convert the bits by
hand, so any CUDA GPU works too, not only sm_89+). Scales come from the checkpoint's
``k_scale``/``v_scale`` when present; otherwise each layer calibrates once, on the first batch
it writes that is not all zeros: ``scale = CALIBRATION_HEADROOM * amax / fp8_max``, fixed
afterwards (a later larger value is clamped). Call :meth:`PagedKVCache.reset_calibration` after
a warm-up or profiling run on dummy data so that real text sets the scales.
"""

from __future__ import annotations

import logging
import math

import torch

from deploy_kernels.paged_attention_ref import is_fp8
from engine.layers.attention import CALIBRATION_HEADROOM, Attention, LayerKVCache

log = logging.getLogger(__name__)

KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # the model's dtype
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype for a ``kv_cache_dtype`` option."""
    if name not in KV_CACHE_DTYPES:
        choices = ", ".join(repr(k) for k in KV_CACHE_DTYPES)
        raise ValueError(f"unknown kv_cache_dtype {name!r}: expected one of {choices}")
    return KV_CACHE_DTYPES[name] or model_dtype


class PagedKVCache:
    """K/V blocks of every layer. ``layers[l].k`` / ``.v`` are ``[num_blocks, block_size, Hkv, D]``."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_cache_dtype: str = "auto",
        k_scales: list[float] | None = None,
        v_scales: list[float] | None = None,
    ) -> None:
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("PagedKVCache sizes must be positive")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        fp8 = is_fp8(self.cache_dtype)
        self.scales_from_checkpoint = k_scales is not None
        if (k_scales is None) != (v_scales is None):
            raise ValueError("give both k_scales and v_scales, or neither")
        if k_scales is not None and v_scales is not None:
            for what, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
                if len(scales) != num_layers or not all(s > 0 and math.isfinite(s) for s in scales):
                    raise ValueError(f"{what} must hold {num_layers} positive finite floats")
            if not fp8:
                log.info("kv_cache_dtype %s is not fp8: the checkpoint's KV scales are unused",
                         kv_cache_dtype)
        elif fp8:
            log.warning(
                "fp8 KV cache without scales in the checkpoint: each layer calibrates its scales "
                "on its first batch (%.1f x amax / fp8 max) and keeps them", CALIBRATION_HEADROOM
            )
        # zeros, not empty: padded reads of never-written slots must be finite (0 * NaN = NaN)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers = [
            LayerKVCache(
                k=torch.zeros(shape, dtype=self.cache_dtype, device=device),
                v=torch.zeros(shape, dtype=self.cache_dtype, device=device),
                k_scale=k_scales[i] if fp8 and k_scales else 1.0,
                v_scale=v_scales[i] if fp8 and v_scales else 1.0,
                needs_calibration=fp8 and k_scales is None,
            )
            for i in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype
    ) -> int:
        """Bytes one block id costs across all layers, K and V (for the memory planner)."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * cache_dtype.itemsize

    @property
    def is_fp8(self) -> bool:
        return is_fp8(self.cache_dtype)

    @property
    def k_scales(self) -> list[float]:
        return [layer.k_scale for layer in self.layers]

    @property
    def v_scales(self) -> list[float]:
        return [layer.v_scale for layer in self.layers]

    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.cache_dtype
        )

    def reset_calibration(self) -> None:
        """Forget computed fp8 scales (e.g. after a profiling run on dummy tokens); checkpoint
        scales stay."""
        if not self.is_fp8 or self.scales_from_checkpoint:
            return
        for layer in self.layers:
            layer.needs_calibration = True
            layer.k_scale = layer.v_scale = 1.0

    def bind(self, model: torch.nn.Module) -> None:
        """Attach each layer's tensors and scales to the model's ``Attention`` modules."""
        modules = [m for m in model.modules() if isinstance(m, Attention)]
        found = sorted(m.layer_idx for m in modules)
        if found != list(range(self.num_layers)):
            raise ValueError(
                f"the model's attention layers {found} do not match a {self.num_layers}-layer cache"
            )
        for m in modules:
            if (m.num_kv_heads, m.head_dim) != (self.num_kv_heads, self.head_dim):
                raise ValueError(
                    f"layer {m.layer_idx} has {m.num_kv_heads} KV heads of {m.head_dim}, "
                    f"the cache {self.num_kv_heads} of {self.head_dim}"
                )
            m.kv_cache = self.layers[m.layer_idx]
