"""GGUF layers through the Triton ``int_gemm`` in the interpreter (CPU), against the weights
``gguf.quants.dequantize`` gives.

Run by ``tests/test_gguf.py`` in a child process with ``TRITON_INTERPRET=1``. Each block type
is loaded as the GPU loads it (``runtime="int_gemm"``: 4-bit fields for Q4_0/Q4_1/Q4_K, 8-bit
for Q8_0/Q5_K/Q6_K; zeros = -min / scale in the model dtype).
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules, (
    "run through tests/test_gguf.py (needs TRITON_INTERPRET=1 before triton loads)"
)

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from deploy_kernels.int_gemm import int_gemm  # noqa: E402
from engine.gguf.linear import GGUFLinearMethod  # noqa: E402
from engine.gguf.types import GROUP_TYPES, to_group_affine  # noqa: E402
from engine.layers.linear import Linear  # noqa: E402
from engine.quantization.base import TensorSet  # noqa: E402
from tests.gguf_files import random_k_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType
CASES = [  # type, m, n, k, dtype, bias
    (Q.Q4_0, 1, 24, 256, torch.float32, False),
    (Q.Q8_0, 3, 40, 256, torch.float32, True),
    (Q.Q4_1, 1, 24, 256, torch.float32, True),
    (Q.Q4_K, 5, 24, 512, torch.float32, False),
    (Q.Q5_K, 1, 40, 256, torch.float32, True),
    (Q.Q6_K, 20, 24, 256, torch.float32, False),  # prefill variant, group 16
    (Q.Q4_0, 3, 24, 256, torch.float16, False),
    (Q.Q4_K, 1, 24, 256, torch.float16, True),
    (Q.Q6_K, 2, 24, 256, torch.float16, False),
]


def _blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_k_blocks(qtype, n, k, rng, 0.05)
    return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype)


@pytest.mark.parametrize(("qtype", "m", "n", "k", "dtype", "bias"), CASES,
                         ids=[f"{c[0].name}-m{c[1]}-{str(c[4])[6:]}" for c in CASES])
def test_int_gemm_on_gguf_layers(qtype: Q, m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    rng = np.random.default_rng(int(qtype) * 100 + m)
    raw = _blocks(qtype, n, k, rng)
    ga = to_group_affine(raw, qtype, (n, k), "w")
    layer = Linear(k, n, bias=bias, quant_method=GGUFLinearMethod(int(qtype), runtime="int_gemm"))
    tensors = {"q": ga.q, "scales": ga.scales, "mins": ga.mins}
    if bias:
        tensors["bias"] = torch.randn(n) * 0.1
    layer.quant_method.load(layer, TensorSet("w", tensors), torch.device("cpu"), dtype)
    method = layer.quant_method
    assert method.runtime_bits == (4 if GROUP_TYPES[qtype][1] == 4 else 8)
    x = torch.randn(m, k, dtype=torch.float64) * 2
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()  # [N, K]
    ref = x @ w.t() + (layer.bias.double() if bias else 0)
    y = int_gemm(x.to(dtype), layer.qweight, layer.scales, layer.zeros, method.runtime_bits,
                 method.group, layer.bias)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel < tol, (qtype.name, rel)
