"""GGUF files of tiny random checkpoints, written by the ``gguf`` package, one per tensor type.

Q4_0, Q4_1, Q8_0, F16, BF16 and F32 tensors come from ``gguf.quants.quantize`` (ggml's own
quantizers, in Python). The package cannot quantize K-quants, so their blocks are built here
from random fields (scales, mins, values, fp16 super-block scales of a sensible size); the
tests check them with ``gguf.quants.dequantize``, never with our own reading.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import gguf
import numpy as np

from engine.gguf.writer import write_gguf
from tests.checkpoints import tiny_checkpoint

Q = gguf.GGMLQuantizationType
# the K-quant checkpoint needs rows of whole 256-value super-blocks
K_SHAPE = {"hidden_size": 256, "intermediate_size": 512}
# a file's layout: name -> (architecture, checkpoint options, type of each linear weight,
# type of the token embedding and output head); "mix" are llama.cpp's _M mixes
FILES: dict[str, tuple[str, dict, str, Q]] = {
    "F32": ("llama", {}, "F32", Q.F32),
    "F16": ("llama", {}, "F16", Q.F16),
    "BF16": ("qwen2", {}, "BF16", Q.BF16),
    "Q8_0": ("llama", {}, "Q8_0", Q.Q8_0),
    "Q4_0": ("qwen2", {}, "Q4_0", Q.Q8_0),
    "Q4_1": ("llama", {}, "Q4_1", Q.Q4_1),
    "Q4_K_M": ("llama", K_SHAPE, "Q4_K_M", Q.Q6_K),
    "Q5_K_M": ("qwen2", K_SHAPE, "Q5_K_M", Q.Q6_K),
    "Q6_K": ("llama", K_SHAPE, "Q6_K", Q.Q4_K),
}
_K_MIX_HIGH = ("attn_v", "ffn_down")  # llama.cpp's _M mixes give these Q6_K


def random_k_blocks(qtype: Q, rows: int, k: int, rng: np.random.Generator, size: float) -> np.ndarray:
    """Random Q4_K/Q5_K/Q6_K blocks ``[rows, k / 256 * bytes]`` whose values are about ``size``."""
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * (k // 256), nbytes), dtype=np.uint8)

    def half(at: int, value: float) -> None:
        jitter = rng.uniform(0.5, 1.5, size=(blocks.shape[0], 1))
        blocks[:, at : at + 2] = (value * jitter).astype(np.float16).view(np.uint8)

    # odd sub-block scales, never 0: a 0 scale with a nonzero min is a constant sub-block,
    # which the GPU layout cannot hold (test_gguf covers it on its own)
    if qtype == Q.Q6_K:  # d sc (q - 32): |sc| < 128, |q - 32| <= 32
        blocks[:, 192:208] |= 1
        half(208, 2 * size / (128 * 32))
    else:  # d sc q - dmin m: sc, m < 64, q < 16 (Q4_K) or 32 (Q5_K)
        blocks[:, 4:8] |= 1  # low bits of sub-block scales 0-3
        blocks[:, 12:16] |= 1  # low bits of sub-block scales 4-7
        qmax = 15 if qtype == Q.Q4_K else 31
        half(0, 2 * size / (63 * qmax))
        half(2, size / 63)
    return blocks.reshape(rows, -1)


def _linear_type(layout: str, name: str) -> Q:
    if layout in ("Q4_K_M", "Q5_K_M"):
        if any(f".{part}." in name for part in _K_MIX_HIGH):
            return Q.Q6_K
        return Q.Q4_K if layout == "Q4_K_M" else Q.Q5_K
    return Q[layout]


def encoder(layout: str, head_type: Q):
    def encode(name: str, values: np.ndarray) -> tuple[np.ndarray, Q]:
        if values.ndim == 1:
            return values.astype(np.float32), Q.F32
        qtype = head_type if name in ("token_embd.weight", "output.weight") else _linear_type(layout, name)
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            size = float(np.abs(values).mean()) * 1.5
            return random_k_blocks(qtype, values.shape[0], values.shape[1], rng, size), qtype
        return gguf.quants.quantize(values, qtype), qtype

    return encode


def gguf_file(root: Path, layout: str) -> Path:
    """``root/<layout>.gguf`` (written once per ``root``)."""
    arch, options, linear, head = FILES[layout]
    path = root / f"{layout}.gguf"
    if not path.is_file():
        write_gguf(tiny_checkpoint(arch, **options), path, encode=encoder(linear, head))
    return path
