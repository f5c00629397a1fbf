"""Triton group-quantized integer GEMM (AWQ and GPTQ after repacking): ``y = x W (+ bias)``.

Layout and formula: ``kernels.int_gemm_ref`` (the reference these kernels are tested against).

One kernel, two autotuned launch variants chosen by M:

- decode (M <= 16): one program per (N tile, K split). The K range is split so that even a
  single N tile row fills the GPU; partial sums go to an fp32 workspace and the last split of
  an N tile to arrive (a per-tile ticket counter, reset by that program) adds them up, adds the
  bias and writes the output: one launch, no zero-fill. M = 1 dequantizes and multiplies in
  fp32 registers; 2..16 rows use ``tl.dot`` on a 16-row tile.
- prefill (M > 16): one program per (M tile, N tile) over the whole K, ``tl.dot`` on the
  dequantized tile, fp32 accumulator.

The K order inside a tile is permuted so that no unpacking reshape is needed: the tile holds
``BLOCK_KW`` packed words per column, and field ``j`` of every word (logical rows
``word * pack + j``) is multiplied with the matching strided slice of ``x``. When a tile lies
in one quantization group (``GROUP_WORDS % BLOCK_KW == 0``), ``q - zero`` (small integers,
exact in fp16/bf16) goes into the product and the scale is applied once per column after it,
so 16-bit activations lose nothing to a rounded weight.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

SUPPORTED_BITS = (2, 4, 8)
DECODE_MAX_M = 16


# -- kernel -----------------------------------------------------------------------------------


@triton.jit
def _unpack(words, J: tl.constexpr, BITS: tl.constexpr):
    """Field ``J`` of every int32 word as float32 (bit trick instead of a slow int->float)."""
    q = (words >> (J * BITS)) & ((1 << BITS) - 1)
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


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


@triton.jit
def _int_gemm_kernel(
    out_ptr, x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, KP, stride_xm, M_BUCKET,
    BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, WAVES: tl.constexpr,
):
    """Program (M tile, N tile, K split); ``KP`` packed rows, ``GROUP_WORDS`` rows per group."""
    PACK: tl.constexpr = 32 // BITS
    ONE_GROUP: tl.constexpr = GROUP_WORDS % BLOCK_KW == 0  # a tile never straddles groups
    pid_m, pid_k, num_splits = tl.program_id(0), tl.program_id(2), tl.num_programs(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    rows = tl.arange(0, BLOCK_KW)
    per_split = tl.cdiv(tl.cdiv(KP, num_splits), BLOCK_KW) * BLOCK_KW
    lo = pid_k * per_split
    hi = tl.minimum(lo + per_split, KP)
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)  # M = 1: reduced at the end
    for r0 in range(lo, hi, BLOCK_KW):
        r = r0 + rows
        r_ok = r < hi
        w_mask = r_ok[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        if ONE_GROUP:  # one scale row per tile
            sz = (r0 // GROUP_WORDS) * N + offs_n
            s = tl.load(scales_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(zeros_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:  # a scale row per packed row (rows of one group hit the same cache line)
            sz = (r // GROUP_WORDS)[:, None] * N + offs_n[None, :]
            s = tl.load(scales_ptr + sz, mask=w_mask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + sz, mask=w_mask, other=0.0).to(tl.float32)
        if BLOCK_M == 1:  # GEMV in fp32 registers: sum_j x*q, then (. - z * sum_j x) * s
            xq = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
            xs = tl.zeros([BLOCK_KW], dtype=tl.float32)
            for j in tl.static_range(PACK):
                k = r * PACK + j
                xj = tl.load(x_ptr + offs_m * stride_xm + k, mask=k < K, other=0.0)
                xj = xj.to(tl.float32)
                xq += xj[:, None] * _unpack(words, j, BITS)
                xs += xj
            acc_rows += (xq - z * xs[:, None]) * s
        else:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(PACK):
                k = r * PACK + j
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
                qz = _unpack(words, j, BITS) - z
                if x_dtype == tl.float32:
                    if not ONE_GROUP:
                        qz = qz * s
                    part += tl.dot(xj, qz, input_precision="ieee")
                elif ONE_GROUP:  # exact integers in 16 bits
                    part += tl.dot(xj, qz.to(x_dtype))
                elif x_dtype == tl.float16:
                    part += tl.dot(xj, (qz * s).to(tl.float16))
                else:  # bf16 rounds the weight too coarsely: add a second dot on the rest
                    w = qz * s
                    w_hi = w.to(tl.bfloat16)
                    part += tl.dot(xj, w_hi)
                    part += tl.dot(xj, (w - w_hi.to(tl.float32)).to(tl.bfloat16))
            if ONE_GROUP:
                part = part * s
            acc += part
    if BLOCK_M == 1:
        acc += tl.sum(acc_rows, axis=0)[None, :]
    finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, HAS_BIAS)


# -- launch -----------------------------------------------------------------------------------


def _config(num_warps: int, num_stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# WAVES: programs per SM the K split aims for (decode); BLOCK_KW: packed rows per step
DECODE_CONFIGS = [
    _config(4, BLOCK_N=128, BLOCK_KW=16, WAVES=2),
    _config(4, BLOCK_N=128, BLOCK_KW=16, WAVES=4),
    _config(8, BLOCK_N=256, BLOCK_KW=16, WAVES=4),
    _config(4, BLOCK_N=64, BLOCK_KW=32, WAVES=4),
    _config(4, BLOCK_N=128, BLOCK_KW=8, WAVES=4),  # tiles inside a 64-wide int4 group
]
PREFILL_CONFIGS = [
    _config(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_KW=16, WAVES=1),
    _config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_KW=16, WAVES=1),
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_KW=16, WAVES=1),
    _config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_KW=16, WAVES=1),
]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles ``tl.dot`` cannot take (< 16 rows) or far taller than M; prefer tiles that
    stay inside one quantization group."""
    args = {**named_args, **kwargs}
    m_cap = max(32, triton.next_power_of_2(args["M"]))
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
    want = triton.cdiv(waves * sms, triton.cdiv(n, block_n))
    split = max(1, min(want, kp // (2 * block_kw)))
    per_split = triton.cdiv(triton.cdiv(kp, split), block_kw) * block_kw
    return triton.cdiv(kp, per_split)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def ticket_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """Per-N-tile int32 counters, zero between launches (the last split resets its own).
    Shared by all launches on a device: kernels of one stream never overlap."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < n_tiles:
        cnt = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = cnt
    return cnt


def launch(kernel, out: torch.Tensor, ptrs: tuple, scalars: tuple, m: int, n: int, kp: int,
           variant: str | None, config: dict | None, **constexprs) -> None:
    """Launch ``kernel(out, *ptrs, ws, cnt, M, N, *scalars, M_BUCKET, ...)`` as the decode or
    prefill variant: autotuned on a GPU, or with the fixed ``config`` (BLOCK_N, BLOCK_KW,
    num_warps, num_stages; BLOCK_M for a prefill, WAVES for a decode), which the interpreter
    needs (it cannot time configs)."""
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
            cnt = ticket_counters(device, triton.cdiv(n, min(c["BLOCK_N"] for c in metas)))
        bucket = triton.next_power_of_2(m)

        def grid(meta: dict) -> tuple[int, int, int]:
            return (1, triton.cdiv(n, meta["BLOCK_N"]),
                    num_splits(n, kp, meta["BLOCK_N"], meta["BLOCK_KW"], meta["WAVES"], sms))
    else:
        bucket = min(triton.next_power_of_2(m), 4096)

        def grid(meta: dict) -> tuple[int, int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), 1)

    args = (out, *ptrs, ws, cnt, m, n, *scalars)
    if config is None:
        tuned_for(kernel, decode)[grid](*args, M_BUCKET=bucket, **constexprs)
    else:
        kernel[grid](*args, M_BUCKET=bucket, **constexprs, **config)


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


# -- public wrapper ---------------------------------------------------------------------------


def int_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` in ``x.dtype``, W from ``qweight [ceil(K / pack), N]``,
    ``scales`` and ``zeros [ceil(K / G), N]`` as in ``kernels.int_gemm_ref``.

    ``variant`` ('decode' or 'prefill') forces a kernel variant (default: decode for
    M <= 16); ``config`` fixes the tile instead of autotuning (see ``launch``).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    m, k = check_activations(x)
    pack = 32 // bits
    kp = triton.cdiv(k, pack)
    n = check_packed(qweight, kp, x.device, f"ceil(K / {pack}) = {kp}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if group_size < k and group_size % pack:
        raise ValueError(f"group_size {group_size} must be a multiple of {pack} for {bits}-bit")
    groups = triton.cdiv(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_param(name, t, (groups, n), x)
    check_bias(bias, n, x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    # one group: a group "width" every tile divides, so each tile loads one scale row
    group_words = group_size // pack if groups > 1 else triton.cdiv(kp, 256) * 256
    ptrs = (x, qweight, scales, zeros, out if bias is None else bias)
    launch(_int_gemm_kernel, out, ptrs, (k, kp, x.stride(0)), m, n, kp, variant, config,
           BITS=bits, GROUP_WORDS=group_words, HAS_BIAS=bias is not None)
    return out


def check_activations(x: torch.Tensor) -> tuple[int, int]:
    """``x [M, K]`` fp16/bf16/fp32 with unit stride along K -> (M, K)."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x must be contiguous along K, got strides {x.stride()}")
    if x.shape[1] == 0:
        raise ValueError("x has K = 0")
    return x.shape[0], x.shape[1]


def check_packed(qweight: torch.Tensor, rows: int, device: torch.device, what: str) -> int:
    """``qweight`` int32 ``[rows, N]``, contiguous, on ``device`` -> N."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D int32, got {tuple(qweight.shape)} {qweight.dtype}")
    if qweight.shape[0] != rows:
        raise ValueError(f"qweight has {qweight.shape[0]} rows, expected {what}")
    if not qweight.is_contiguous() or qweight.device != device:
        raise ValueError(f"qweight must be contiguous and on {device}")
    return qweight.shape[1]


def check_param(name: str, t: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """A per-column parameter: exact shape, ``x.dtype``, contiguous, on x's device."""
    if tuple(t.shape) != shape or t.dtype != x.dtype:
        raise ValueError(f"{name} must be {x.dtype} of shape {shape}, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if not t.is_contiguous() or t.device != x.device:
        raise ValueError(f"{name} must be contiguous and on {x.device}")


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (n,) or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor of shape ({n},), got "
                         f"{bias.dtype} of shape {tuple(bias.shape)}")
    if not bias.is_contiguous() or bias.device != device:
        raise ValueError(f"bias must be contiguous and on {device}")
