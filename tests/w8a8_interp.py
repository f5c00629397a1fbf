"""W8A8 Triton kernels in the Triton interpreter (CPU), against their torch references.

Run by ``tests/test_w8a8_gemm.py`` in a child process with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when triton is imported). Small tiles, so that the odd shapes leave
tails in M, N and K.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules, (
    "run through tests/test_w8a8_gemm.py (needs TRITON_INTERPRET=1 before triton loads)"
)

import pytest  # noqa: E402
import torch  # noqa: E402

from deploy_kernels.act_quant import (  # noqa: E402
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
    quantize_int8_per_token,
    quantize_int8_static,
)
from deploy_kernels.act_quant_ref import (  # noqa: E402
    quantize_fp8_per_tensor_ref,
    quantize_fp8_per_token_ref,
    quantize_int8_per_token_ref,
    quantize_int8_static_ref,
)
from deploy_kernels.fp8_gemm import fp8_weight_only_gemm  # noqa: E402
from deploy_kernels.fp8_gemm_ref import fp8_linear_ref, fp8_weight_only_ref  # noqa: E402
from deploy_kernels.int8_gemm import w8a8_gemm  # noqa: E402
from deploy_kernels.int8_gemm_ref import int8_linear_ref  # noqa: E402
from tests.test_w8a8_gemm import (  # noqa: E402
    SHAPES,
    make_bias,
    make_fp8_weight,
    make_int8_weight,
    make_x,
    rel_err,
)

torch.set_num_threads(1)
TILES = (16, 32, 32, 4, 1)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


def _tricky_rows(k: int) -> torch.Tensor:
    """Rows that hit the edge cases: all zeros (the scale floor), exact int8 ties (amax 127
    gives scale 1, values k + 0.5), a tiny row (fp8 subnormals), and a large one."""
    ties = torch.arange(k, dtype=torch.float32) % 20 - 9.5
    ties[0] = 127.0
    tiny = make_x(1, k, seed=9)[0] * 1e-6
    return torch.stack([torch.zeros(k), ties, tiny, make_x(1, k, seed=8)[0] * 1e3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 64), (5, 200), (33, 96)])
def test_per_token_quant_bit_exact(m: int, k: int, dtype: torch.dtype) -> None:
    x = torch.cat([make_x(m, k, seed=m + k), _tricky_rows(k)]).to(dtype)
    for fast, ref in ((quantize_fp8_per_token, quantize_fp8_per_token_ref), (quantize_int8_per_token, quantize_int8_per_token_ref)):
        (q, s), (q_ref, s_ref) = fast(x), ref(x)
        assert q.dtype == q_ref.dtype and s.shape == (m + 4, 1) and s.dtype == torch.float32
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
    q, _ = quantize_int8_per_token(x)
    if dtype == torch.float32:  # exact ties (scale 1) round to even: -8.5 -> -8, -7.5 -> -8, -6.5 -> -6
        assert q[m + 1, 1].item() == -8 and q[m + 1, 2].item() == -8 and q[m + 1, 3].item() == -6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_quant_bit_exact_and_saturating(dtype: torch.dtype) -> None:
    x = torch.cat([make_x(5, 200, seed=10), _tricky_rows(200)]).to(dtype)
    scale = (x.float().abs().amax() / 448 / 50).reshape(1)  # most of the large row saturates
    q, s = quantize_fp8_per_tensor(x, scale)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x, scale)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
    assert q.float().abs().max() == 448 and not q.float().isnan().any()
    for zp in (None, torch.tensor([-9], dtype=torch.int8)):
        si = (x.float().abs().amax() / 127 / 50).reshape(1)
        q = quantize_int8_static(x, si, zp)
        assert torch.equal(q, quantize_int8_static_ref(x, si, zp))
        assert q.min() == -128 and q.max() == 127


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scales", ["token/channel", "token/tensor", "static/channel", "static_zp/tensor"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_gemm(shape, scales: str, bias: bool) -> None:
    m, k, n = shape
    act, wscale = scales.split("/")
    x = make_x(m, k, seed=3 * m + k)
    weight, ws, _ = make_int8_weight(n, k, seed=n + m, per_channel=wscale == "channel")
    b = make_bias(n, seed=m) if bias else None
    si = (x.abs().amax() / 127).reshape(1) if act != "token" else None
    zp = torch.tensor([-11], dtype=torch.int8) if act == "static_zp" else None
    if si is None:
        xq, sx = quantize_int8_per_token(x)  # the Triton quantizer feeds the Triton GEMM
    else:
        xq, sx = quantize_int8_static(x, si, zp), si
    out = w8a8_gemm(xq, weight, sx, ws, zp, b, torch.float32, tiles=TILES)
    assert rel_err(out, int8_linear_ref(x, weight, ws, si, zp, b)) < 1e-5  # same integers, fp32 epilogue


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_gemm_16bit_output(out_dtype: torch.dtype) -> None:
    x = make_x(33, 200, seed=4).to(out_dtype)
    weight, ws, _ = make_int8_weight(72, 200, seed=5, per_channel=True)
    xq, sx = quantize_int8_per_token(x)
    out = w8a8_gemm(xq, weight, sx, ws, None, make_bias(72, seed=6).to(out_dtype), out_dtype, tiles=TILES)
    assert out.dtype == out_dtype
    assert rel_err(out, int8_linear_ref(x, weight, ws, bias=make_bias(72, seed=6).to(out_dtype))) < 1e-2


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 tl.dot is not faithful
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_weight_only_gemm(shape, dtype: torch.dtype, per_channel: bool, bias: bool) -> None:
    m, k, n = shape
    x = make_x(m, k, seed=m + 2 * k, dtype=dtype)
    weight, ws, _ = make_fp8_weight(n, k, seed=n * 2, per_channel=per_channel)
    b = make_bias(n, seed=k).to(dtype) if bias else None
    out = fp8_weight_only_gemm(x, weight, ws, b, tiles=TILES)
    assert out.dtype == dtype
    assert rel_err(out, fp8_weight_only_ref(x, weight, ws, b)) < (1e-5 if dtype == torch.float32 else 1e-3)
    # against the W8A8 reference: off by the e4m3 activation rounding only (~2.5% rms)
    assert 0 < rel_err(out, fp8_linear_ref(x, weight, ws, None, b)) < 5e-2


def test_default_tiles() -> None:
    x = make_x(20, 200, seed=7)
    w8, ws8, _ = make_fp8_weight(72, 200, seed=8, per_channel=True)
    assert rel_err(fp8_weight_only_gemm(x, w8, ws8), fp8_weight_only_ref(x, w8, ws8)) < 1e-5
    wi, wsi, _ = make_int8_weight(72, 200, seed=9, per_channel=True)
    xq, sx = quantize_int8_per_token(x)
    assert rel_err(w8a8_gemm(xq, wi, sx, wsi, None, None, torch.float32), int8_linear_ref(x, wi, wsi)) < 1e-5
