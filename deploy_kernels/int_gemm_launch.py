"""Launch machinery shared by the packed GEMMs (``deploy_kernels.int_gemm``, ``deploy_kernels.lut_gemm``).

Both kernels take the grid (M tiles, N tiles, K splits) and the argument order
``kernel(out, x, *weights, bias, ws, cnt, M, N, K, KP, stride_xm, M_BUCKET, ...)``; ``tile_and_split`` gives a
program its tile and K range, ``finish_tile`` writes it (summing the K splits through the fp32
workspace and the per-N-tile ticket counters that ``launch`` provides). ``launch`` picks the
decode (M <= 16, split K) or prefill variant and autotunes over the tile tables below.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from deploy_kernels.host_ints import cdiv, next_power_of_2
from deploy_kernels.packed_gemm_checks import check_bias

DECODE_MAX_M = 16


# -- in-kernel pieces -------------------------------------------------------------------------


@triton.jit
def tile_and_split(M, N, KP, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_KW: tl.constexpr):
    """This program's rows ``offs_m`` (int64) and columns ``offs_n`` with their in-bounds
    masks, and the packed rows ``[lo, hi)`` of its K split (``KP`` packed rows in all)."""
    pid_m, pid_k, num_splits = tl.program_id(0), tl.program_id(2), tl.num_programs(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    per_split = tl.cdiv(tl.cdiv(KP, num_splits), BLOCK_KW) * BLOCK_KW
    lo = pid_k * per_split
    return offs_m, offs_n, m_ok, n_ok, lo, tl.minimum(lo + per_split, KP)


@triton.jit
def _store_out(acc, out_ptr, bias_ptr, tile, mask, offs_n, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N,
                HAS_BIAS: tl.constexpr):
    """Write ``acc [BLOCK_M, BLOCK_N]`` (+ bias) to ``out``; with K splits (grid axis 2), via
    the fp32 workspace ``[splits, M, N]`` and the ticket counter of this N tile."""
    pid_n, pid_k, num_splits = tl.program_id(1), tl.program_id(2), tl.num_programs(2)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if num_splits > 1:
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == num_splits - 1:  # the last split of this N tile: sum them all up
            acc = tl.zeros_like(acc)
            for s in range(0, num_splits):
                acc += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next launch
            _store_out(acc, out_ptr, bias_ptr, tile, mask, offs_n, N, HAS_BIAS)
    else:
        _store_out(acc, out_ptr, bias_ptr, tile, mask, offs_n, N, HAS_BIAS)


# -- launch -----------------------------------------------------------------------------------


def _config(num_warps: int, num_stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# WAVES: programs per SM the K split aims for (decode); BLOCK_KW: packed rows per step.
# Register counts (sm_90, int4 at M = 1, from ptxas) decide how many programs an SM holds: the
# large tiles take ~184 registers a thread (8 warps per SM), the small ones at most 64 (32 or
# more warps per SM), which a latency-bound GEMV needs; the autotuner picks per shape.
DECODE_CONFIGS = [
    _config(4, BLOCK_N=128, BLOCK_KW=16, WAVES=2),
    _config(8, BLOCK_N=256, BLOCK_KW=16, WAVES=4),
    _config(4, BLOCK_N=32, BLOCK_KW=16, WAVES=8),  # <= 64 registers: 8 programs per SM
    _config(8, BLOCK_N=64, BLOCK_KW=16, WAVES=4),  # <= 64 registers (LUT: 102)
    _config(8, BLOCK_N=128, BLOCK_KW=8, WAVES=4),  # M = 1: tiles inside a 64-wide int4 group
    _config(8, BLOCK_N=32, BLOCK_KW=8, WAVES=8),  # M = 1: 32 registers, 64 warps per SM
]
# Prefill: tiles whose fp32 accumulators fit without spilling (ptxas, sm_90): 64 x 128 with 4
# warps, 128 x 128 and 128 x 256 spilled 1-6 KB a thread to local memory, 32 x 128 with 4 warps
# 36 bytes (LUT).
PREFILL_CONFIGS = [
    _config(8, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_KW=16, WAVES=1),
    _config(8, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_KW=16, WAVES=1),
    _config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_KW=16, WAVES=1),
    _config(8, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_KW=16, WAVES=1),
]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles ``tl.dot`` cannot take (< 16 rows) or far taller than M; prefer tiles that
    stay inside one quantization group."""
    args = {**named_args, **kwargs}
    m_cap = max(32, next_power_of_2(args["M"]))
    valid = [
        c for c in configs
        if (c.kwargs.get("BLOCK_M", args.get("BLOCK_M")) == 1 or c.kwargs["BLOCK_KW"] >= 16)
        and c.kwargs.get("BLOCK_M", 1) <= m_cap
    ]
    grouped = [c for c in valid if args.get("GROUP_WORDS", 0) % c.kwargs["BLOCK_KW"] == 0]
    return grouped or valid




@cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so tests cover the K split
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(n: int, kp: int, block_n: int, block_kw: int, waves: int, sms: int) -> int:
    """K splits for about ``waves`` programs per SM, each over at least two K steps."""
    want = cdiv(waves * sms, cdiv(n, block_n))
    split = max(1, min(want, kp // (2 * block_kw)))
    per_split = cdiv(cdiv(kp, split), block_kw) * block_kw
    return cdiv(kp, per_split)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def ticket_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """Per-N-tile int32 counters, zero between launches (the last split resets its own).
    Shared by all launches on a device: kernels of one stream never overlap."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < n_tiles:
        cnt = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = cnt
    return cnt


def launch(kernel, x: torch.Tensor, weights: tuple, bias: torch.Tensor | None, n: int,
           kp: int, variant: str | None, config: dict | None, **constexprs) -> torch.Tensor:
    """``out [M, N]`` in ``x.dtype`` from ``kernel(out, x, *weights, bias, ws, cnt, M, N, K,
    KP, stride_xm, M_BUCKET, HAS_BIAS, ...)`` (``bias`` checked here), launched as the decode
    or prefill variant: autotuned on a GPU, or with the fixed ``config`` (BLOCK_N, BLOCK_KW,
    num_warps, num_stages; BLOCK_M for a prefill, WAVES for a decode), which the interpreter
    needs (it cannot time configs)."""
    check_bias(bias, n, x.device)
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    variant = variant or ("decode" if m <= DECODE_MAX_M else "prefill")
    if variant not in ("decode", "prefill"):
        raise ValueError(f"variant must be 'decode' or 'prefill', got {variant!r}")
    decode = variant == "decode"
    if decode and m > DECODE_MAX_M:
        raise ValueError(f"the decode variant takes at most {DECODE_MAX_M} rows, x has {m}")
    device = out.device
    sms = num_sms(device)
    table = DECODE_CONFIGS if decode else PREFILL_CONFIGS
    if config is None and (device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        config = table[0].all_kwargs()
    if config is not None:
        config = {"WAVES": 1, **config}
        if decode:
            config.pop("BLOCK_M", None)
    metas = [c.kwargs for c in table] if config is None else [config]
    cnt = ticket_counters(device, 1)
    ws = cnt.view(torch.float32)[:1]  # placeholder when K is not split (never touched)
    if decode:
        constexprs["BLOCK_M"] = 1 if m == 1 else 16
        splits = max(num_splits(n, kp, c["BLOCK_N"], c["BLOCK_KW"], c["WAVES"], sms)
                     for c in metas)
        if splits > 1:
            ws = torch.empty(splits, m, n, dtype=torch.float32, device=device)
            cnt = ticket_counters(device, cdiv(n, min(c["BLOCK_N"] for c in metas)))
        bucket = next_power_of_2(m)

        def grid(meta: dict) -> tuple[int, int, int]:
            return (1, cdiv(n, meta["BLOCK_N"]),
                    num_splits(n, kp, meta["BLOCK_N"], meta["BLOCK_KW"], meta["WAVES"], sms))
    else:
        bucket = min(next_power_of_2(m), 4096)

        def grid(meta: dict) -> tuple[int, int, int]:
            return (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), 1)

    bias_ptr = out if bias is None else bias  # a placeholder without bias (never read)
    args = (out, x, *weights, bias_ptr, ws, cnt, m, n, k, kp, x.stride(0))
    constexprs["HAS_BIAS"] = bias is not None
    if config is None:
        tuned_for(kernel, decode)[grid](*args, M_BUCKET=bucket, **constexprs)
    else:
        kernel[grid](*args, M_BUCKET=bucket, **constexprs, **config)
    return out


_TUNED: dict[tuple[object, bool], object] = {}
_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_WORDS"]  # names a kernel lacks are left out


def tuned_for(kernel, decode: bool):
    """The autotuned decode or prefill variant of ``kernel`` (built once)."""
    if (kernel, decode) not in _TUNED:
        configs = DECODE_CONFIGS if decode else PREFILL_CONFIGS
        key = [name for name in _KEY if name in kernel.arg_names]
        prune = {"early_config_prune": prune_configs}
        _TUNED[kernel, decode] = triton.autotune(configs, key=key, prune_configs_by=prune)(kernel)
    return _TUNED[kernel, decode]
