"""How far the GPU layout of GGUF layers (``zeros = -min / scale`` in the model dtype, for the
Triton int GEMM) is from ``gguf.quants.dequantize``: max |dW| / max |W| per block type and dtype.

    .venv/bin/python -m bench.gguf_layout_error

Weights: gaussian, quantized by ``gguf.quants.quantize`` (Q4_0, Q8_0, Q4_1); random K-quant
fields (tests/gguf_files.py) for Q4_K, Q5_K, Q6_K. CPU only: the layout, not the kernel
(tests/gguf_interp.py runs the kernel).
"""
import gguf
import numpy as np
import torch

from engine.gguf.linear import GGUFLinearMethod
from engine.gguf.types import to_group_affine
from engine.layers.linear import Linear
from engine.quantization.base import TensorSet
from tests.gguf_files import random_k_blocks

Q = gguf.GGMLQuantizationType
rng = np.random.default_rng(0)
n, k = 256, 1024
for qt in (Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K):
    raw = random_k_blocks(qt, n, k, rng, 0.02) if qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, qt)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qt)).t()
    ga = to_group_affine(raw, qt, (n, k), "w")
    row = [qt.name]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        layer = Linear(k, n, quant_method=GGUFLinearMethod(int(qt), runtime="int_gemm"))
        layer.quant_method.load(layer, TensorSet("w", {"q": ga.q, "scales": ga.scales, "mins": ga.mins}), torch.device("cpu"), dt)
        w = layer.quant_method.dequantize(layer)
        row.append(f"{str(dt)[6:]} {((w - ref).abs().max() / ref.abs().max()).item():.1e}")
    print(" | ".join(row))
