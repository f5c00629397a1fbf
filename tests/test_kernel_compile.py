"""The paged-attention kernels compile for real CUDA targets, without a GPU.

The interpreter tests check what the kernels compute; this checks what only the compiler sees
(constexpr typing, tl.dot shapes, fp8 handling on Ampere): Triton's NVIDIA backend and its
bundled ptxas build the cubins on the CPU. sm_80 matters because fp8 caches are read and
written as raw bits there (Triton's own e4m3 type needs sm_89+).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs triton in compiled mode",
    ),
]

ATTN = dict(GROUP=4, HEAD_DIM=128, PAGE=16, WINDOW=0, PREC="tf32", BLOCK_D=128)


def _compile(fn, pointers: dict[str, str], constexprs: dict, capability: int, num_warps: int):
    """Compile ``fn`` for ``sm_<capability>``: ``*_ptr`` args typed by ``pointers``, strides and
    counts i32, scales fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointers.get(name, "*i32")
        return "fp32" if name.endswith("scale") else "i32"

    signature = {name: arg_type(name) for name in fn.arg_names}
    src = ASTSource(fn, signature, constexprs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("cache", ["bf16", "fp8_e4m3"])
def test_kernels_compile(capability: int, cache: str) -> None:
    from deploy_kernels.paged_attention import _varlen_kernel
    from deploy_kernels.paged_attention_decode import _combine_kernel, _decode_kernel
    from deploy_kernels.write_kv import _write_kv_kernel

    fp8 = 1 if cache == "fp8_e4m3" else 0
    c = "*u8" if fp8 else "*bf16"
    act = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": c, "v_ptr": c}
    _compile(_varlen_kernel, act, {**ATTN, "FP8": fp8, "BLOCK_M": 64, "BLOCK_N": 64},
             capability, 8)
    split = {**act, "part_ptr": "*fp32", "lse_ptr": "*fp32"}
    _compile(_decode_kernel, split, {**ATTN, "NUM_HEADS": 32, "FP8": fp8, "SPLIT": True,
                                     "BLOCK_G": 16, "BLOCK_N": 32}, capability, 4)
    _compile(_combine_kernel, split, {"NUM_HEADS": 32, "HEAD_DIM": 128, "BLOCK_S": 8,
                                      "BLOCK_D": 128}, capability, 4)
    write = {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": c, "v_cache_ptr": c,
             "slot_ptr": "*i64"}
    _compile(_write_kv_kernel, write, {"NUM_HEADS": 8, "HEAD_DIM": 128, "PAGE": 16,
                                       "BLOCK_H": 8, "BLOCK_D": 128, "FP8": fp8}, capability, 4)


def test_host_integer_helpers_match_tritons() -> None:
    """deploy_kernels.host_ints replaces triton.cdiv / next_power_of_2 on the Python side of launches
    (each Triton call there costs microseconds): the same results."""
    import triton

    from deploy_kernels.host_ints import cdiv, next_power_of_2

    for a in range(0, 600):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 7, 16, 128, 255):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert next_power_of_2(2**40 + 1) == 2**41
