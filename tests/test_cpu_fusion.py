"""Sibling projections fused once at load on the CPU (``engine.layers.cpu_fusion``) and the
CPU decode shortcuts that came with them: the rolled rotary on fused q/k, bf16 RMSNorm
through ``F.rms_norm``, and half-precision KV caches attended in float32.

A fused model is checked against the same checkpoint loaded a second time and left unfused:
float32 within rounding, the int4 CPU kernel (GGUF Q4_0/Q4_1, AWQ, GPTQ in bfloat16) bit for
bit, since each output column of the kernel is the same sum whether its rows are packed
alone or beside their siblings'."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from deploy_kernels.paged_attention_ref import paged_attention_ref, write_kv_ref
from engine.api import EngineConfig, SamplingParams
from engine.config import ModelConfig, RopeConfig
from engine.gguf.writer import write_gguf
from engine.kv_cache import PagedKVCache
from engine.layers import cpu_fusion
from engine.layers.attention import AttentionMetadata, LayerKVCache, _attend_torch_decode
from engine.layers.cpu_fusion import (
    CpuInt4LinearMethod,
    DenseOperands,
    FusedAwayMethod,
    Int4Operands,
    _concat,
    fuse_cpu_projections,
)
from engine.layers.cpu_linear import PackedCpuLinearMethod, pack_cpu_linears
from engine.layers.linear import Linear, UnquantizedLinearMethod
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_rolled, signed_sin
from engine.loader import load_model
from engine.models.llama import LlamaAttention, LlamaMLP
from engine.quantization import resolve
from engine.quantization.cpu_kernels import INT4_PACK_ROWS, int4_mm_cpu, pack_int4_cpu
from engine.quantization.int_linear import PackedLinearMethod
from tests.checkpoints import tiny_checkpoint
from tests.gguf_files import encoder, gguf_file
from tests.quant_fixtures import QuantCheckpoints, QuantSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Q = gguf.GGMLQuantizationType
BLOCK = 4
KV4 = (("num_key_value_heads", 4),)  # k/v of 64 rows: whole int4 blocks, so q/k/v fuse too


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gguf")
    return lambda layout: gguf_file(root, layout)


@pytest.fixture(scope="module")
def kv4_gguf(tmp_path_factory: pytest.TempPathFactory):
    """GGUF files of tiny checkpoints with 4 KV heads (k, v: 64 rows each)."""
    root = tmp_path_factory.mktemp("gguf-kv4")

    def make(arch: str, layout: str) -> Path:
        path = root / f"{arch}-{layout}.gguf"
        if not path.is_file():
            write_gguf(tiny_checkpoint(arch, num_key_value_heads=4), path, encode=encoder(layout, Q.Q8_0))
        return path

    return make


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> QuantCheckpoints:
    return QuantCheckpoints(tmp_path_factory.mktemp("quant"))


# -- helpers ------------------------------------------------------------------------------------


def _groups(model: torch.nn.Module):
    """(module name, module, fused name, member names) of every sibling group."""
    for name, module in model.named_modules():
        for fused_name, members in getattr(type(module), "FUSED_PROJECTIONS", {}).items():
            yield name, module, fused_name, members


@torch.inference_mode()
def _run(model: torch.nn.Module) -> torch.Tensor:
    """Float32 logits of a two-sequence prefill and then two decode-only steps (the CPU decode
    path), stacked ``[6 + 3 + 2 + 2, vocab]``; the model's own dtype for activations and cache."""
    c = model.config
    dtype = model.model.norm.weight.dtype
    model.kv = PagedKVCache(c.num_layers, 6, BLOCK, c.num_kv_heads, c.head_dim, dtype, "cpu")
    model.kv.bind(model)
    tables = [[0, 1, 4], [2, 3]]
    out = []
    meta = AttentionMetadata.build([6, 3], [6, 3], tables, BLOCK, "cpu")
    ids = torch.tensor([3, 17, 5, 250, 9, 41, 7, 300, 12])
    out.append(model.compute_logits(model(ids, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2]), meta)))
    for step, tokens in enumerate(([99, 8], [401, 61])):
        meta = AttentionMetadata.build([1, 1], [7 + step, 4 + step], tables, BLOCK, "cpu")
        pos = torch.tensor([6 + step, 3 + step])
        out.append(model.compute_logits(model(torch.tensor(tokens), pos, meta)))
    return torch.cat(out)


def _load_quantized(path: Path, dtype: torch.dtype, flag: str | None = None) -> torch.nn.Module:
    quant = resolve(flag, path, ModelConfig.from_pretrained(path).quantization_config, {})
    return load_model(path, dtype, "cpu", quant=quant)


def _assert_members_fused_away(module: torch.nn.Module, fused_name: str, members: tuple[str, ...]) -> None:
    for member_name in members:
        member = getattr(module, member_name)
        assert isinstance(member.quant_method, FusedAwayMethod), member_name
        assert member.quant_method.fused_name == fused_name
        assert member._parameters.get("weight") is None and member.bias is None  # weights dropped
        assert not any(t is not None for t in member._buffers.values())
        with pytest.raises(RuntimeError, match=fused_name):
            member(torch.zeros(1, member.in_features, dtype=torch.float32))


def _same_sibling_outputs(plain: torch.nn.Module, fused: torch.nn.Module, dtype: torch.dtype,
                          exact: bool) -> int:
    """Every fused layer of ``fused`` against the members of the same group in ``plain`` on a
    random input; how many fused layers there were."""
    gen = torch.Generator().manual_seed(1)
    count = 0
    for name, _, fused_name, members in _groups(plain):
        layer = getattr(fused.get_submodule(name), fused_name)
        if layer is None:
            continue
        count += 1
        for rows in (1, 5):
            x = torch.randn(rows, layer.in_features, generator=gen).to(dtype)
            ref = torch.cat([getattr(plain.get_submodule(name), m)(x) for m in members], dim=-1)
            got = layer(x)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            if exact:
                assert torch.equal(got, ref), (name, fused_name)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    return count


# -- float32: fused into a plain Linear, then packed -------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])  # plain; q/k/v biases; q/k norm
def test_float32_siblings_fuse_and_give_the_unfused_logits(architecture: str) -> None:
    path = tiny_checkpoint(architecture)
    plain, fused = (load_model(path, torch.float32, "cpu") for _ in range(2))
    num_layers = plain.config.num_layers
    assert fuse_cpu_projections(fused, torch.float32) == 2 * num_layers

    attn = [m for m in fused.modules() if isinstance(m, LlamaAttention)]
    mlps = [m for m in fused.modules() if isinstance(m, LlamaMLP)]
    assert len(attn) == len(mlps) == num_layers
    for i in range(num_layers):
        ref_attn, ref_mlp = plain.model.layers[i].self_attn, plain.model.layers[i].mlp
        qkv, gate_up = attn[i].qkv_proj, mlps[i].gate_up_proj
        assert isinstance(qkv, Linear) and isinstance(gate_up, Linear)
        assert type(qkv.quant_method) is UnquantizedLinearMethod
        assert (qkv.in_features, qkv.out_features) == (plain.config.hidden_size, sum(attn[i].qkv_sizes))
        assert torch.equal(qkv.weight, torch.cat([ref_attn.q_proj.weight, ref_attn.k_proj.weight,
                                                  ref_attn.v_proj.weight]))
        if plain.config.attention_bias:
            assert torch.equal(qkv.bias, torch.cat([ref_attn.q_proj.bias, ref_attn.k_proj.bias,
                                                    ref_attn.v_proj.bias]))
        else:
            assert qkv.bias is None
        assert torch.equal(gate_up.weight, torch.cat([ref_mlp.gate_proj.weight, ref_mlp.up_proj.weight]))
        assert gate_up.out_features == 2 * plain.config.intermediate_size
        _assert_members_fused_away(attn[i], "qkv_proj", ("q_proj", "k_proj", "v_proj"))
        _assert_members_fused_away(mlps[i], "gate_up_proj", ("gate_proj", "up_proj"))
        assert mlps[i].down_proj.weight is not None and attn[i].o_proj.weight is not None  # no group

    ref = _run(plain)
    got = _run(fused)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

    # fusing again finds nothing left to fuse and changes nothing
    first = [m.qkv_proj for m in attn] + [m.gate_up_proj for m in mlps]
    assert fuse_cpu_projections(fused, torch.float32) == 0
    assert [m.qkv_proj for m in attn] + [m.gate_up_proj for m in mlps] == first

    # then packing packs the fused layers (and leaves the fused-away members alone)
    plain_layers = [m for m in fused.modules() if isinstance(m, Linear)
                    and type(m.quant_method) is UnquantizedLinearMethod]
    assert pack_cpu_linears(fused) == len(plain_layers)
    for m in attn:
        assert isinstance(m.qkv_proj.quant_method, PackedCpuLinearMethod)
        assert isinstance(m.q_proj.quant_method, FusedAwayMethod)
    for m in mlps:
        assert isinstance(m.gate_up_proj.quant_method, PackedCpuLinearMethod)
    packed = _run(fused)
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.argmax(-1), ref.argmax(-1))


def test_fused_weights_work_outside_inference_mode() -> None:
    """Fusion runs under inference_mode; the fused model must still run under no_grad."""
    model = load_model(tiny_checkpoint("llama"), torch.float32, "cpu")
    fuse_cpu_projections(model, torch.float32)
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        y = model.model.layers[0].self_attn.qkv_proj(x)
    assert y.shape == (3, sum(model.model.layers[0].self_attn.qkv_sizes))


def test_bfloat16_dense_siblings_fuse_within_rounding() -> None:
    path = tiny_checkpoint("qwen2")
    plain, fused = (load_model(path, torch.bfloat16, "cpu") for _ in range(2))
    assert fuse_cpu_projections(fused, torch.bfloat16) == 2 * plain.config.num_layers
    assert fused.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    for name, _, fused_name, members in _groups(plain):
        layer = getattr(fused.get_submodule(name), fused_name)
        x = torch.randn(4, layer.in_features, generator=gen).bfloat16()
        ref = torch.cat([getattr(plain.get_submodule(name), m)(x) for m in members], dim=-1)
        torch.testing.assert_close(layer(x).float(), ref.float(), rtol=2e-2, atol=2e-2)
    ref, got = _run(plain), _run(fused)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_bfloat16_gguf_q8_0_pair_layers_stay_apart(files) -> None:
    """8-bit GGUF fields in bf16 run as two int4 products each (engine.gguf.cpu): they hand
    no fusion operands, so they stay apart and the model's output is unchanged."""
    path = files("Q8_0")
    plain, fused = (load_model(path, torch.bfloat16, "cpu") for _ in range(2))
    up = plain.model.layers[0].mlp.up_proj
    assert up.quant_method.cpu_kernel.pair is not None and up.quant_method.cpu_operands(up) is None
    assert fuse_cpu_projections(fused, torch.bfloat16) == 0
    assert fused.model.layers[0].mlp.gate_up_proj is None
    assert torch.equal(_run(fused), _run(plain))


def test_float32_gguf_dequantized_weights_fuse(files) -> None:
    """GGUF Q4_1 in float32: each layer holds a weight dequantized once; those fuse dense."""
    path = files("Q4_1")
    plain, fused = (load_model(path, torch.float32, "cpu") for _ in range(2))
    assert fuse_cpu_projections(fused, torch.float32) == 2 * plain.config.num_layers
    layer = fused.model.layers[0].mlp.gate_up_proj
    assert type(layer.quant_method) is UnquantizedLinearMethod and layer.weight.dtype == torch.float32
    assert _same_sibling_outputs(plain, fused, torch.float32, exact=False) == 4
    torch.testing.assert_close(_run(fused), _run(plain), rtol=1e-5, atol=1e-5)


# -- int4 CPU kernel: fused packed, bit for bit -----------------------------------------------


def test_gguf_q4_0_bfloat16_fuses_int4_exactly(files) -> None:
    """The suite's Q4_0 file (qwen2: k/v of 32 rows): gate/up fuse packed; q/k/v cannot (k is
    half an int4 block) and stay apart; the logits are those of the unfused model exactly."""
    path = files("Q4_0")
    plain, fused = (load_model(path, torch.bfloat16, "cpu") for _ in range(2))
    assert fuse_cpu_projections(fused, torch.bfloat16) == plain.config.num_layers
    for layer in fused.model.layers:
        assert layer.self_attn.qkv_proj is None
        assert layer.self_attn.k_proj.quant_method.cpu_kernel is not None  # members untouched
        gate_up = layer.mlp.gate_up_proj
        assert isinstance(gate_up.quant_method, CpuInt4LinearMethod)
        assert gate_up.cpu_qweight.dtype == torch.uint8
        _assert_members_fused_away(layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"))
    assert _same_sibling_outputs(plain, fused, torch.bfloat16, exact=True) == plain.config.num_layers
    assert torch.equal(_run(fused), _run(plain))


@pytest.mark.parametrize(("arch", "layout"), [("qwen2", "Q4_0"), ("llama", "Q4_1")])
def test_gguf_int4_qkv_fuses_exactly_with_whole_blocks(kv4_gguf, arch: str, layout: str) -> None:
    """With k/v of 64 rows q/k/v fuse too (qwen2: with their biases); the fused model, its
    rolled rotary on the strided q/k included, gives the unfused logits bit for bit."""
    path = kv4_gguf(arch, layout)
    plain, fused = (load_model(path, torch.bfloat16, "cpu") for _ in range(2))
    assert fuse_cpu_projections(fused, torch.bfloat16) == 2 * plain.config.num_layers
    for layer in fused.model.layers:
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv.quant_method, CpuInt4LinearMethod)
        assert qkv.out_features == sum(layer.self_attn.qkv_sizes)
        assert (qkv.bias is not None) == plain.config.attention_bias
        _assert_members_fused_away(layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
    assert _same_sibling_outputs(plain, fused, torch.bfloat16, exact=True) == 2 * plain.config.num_layers
    # leading dimensions are kept by the fused int4 layer
    qkv = fused.model.layers[0].self_attn.qkv_proj
    x = torch.randn(2, 3, qkv.in_features).bfloat16()
    assert torch.equal(qkv(x), qkv(x.reshape(6, -1)).view(2, 3, -1))
    assert torch.equal(_run(fused), _run(plain))


@pytest.mark.parametrize("spec", [
    QuantSpec("awq", model_kw=KV4),
    QuantSpec("gptq", model_kw=KV4),
    QuantSpec("gptq", sym=True, group_size=64, arch="qwen2", model_kw=KV4),
    QuantSpec("awq"),  # 2 KV heads: only gate/up fuse
], ids=["awq", "gptq", "gptq-sym-qwen2", "awq-kv2"])
def test_awq_gptq_bfloat16_fuse_int4_exactly(ckpts: QuantCheckpoints, spec: QuantSpec) -> None:
    path = ckpts(spec)
    plain, fused = (_load_quantized(path, torch.bfloat16) for _ in range(2))
    member = plain.model.layers[0].mlp.gate_proj
    assert isinstance(member.quant_method, PackedLinearMethod) and member.quant_method.cpu_kind == "int4"
    qkv_fuses = plain.config.num_kv_heads * plain.config.head_dim % INT4_PACK_ROWS == 0
    made = fuse_cpu_projections(fused, torch.bfloat16)
    assert made == plain.config.num_layers * (2 if qkv_fuses else 1)
    for layer in fused.model.layers:
        assert isinstance(layer.mlp.gate_up_proj.quant_method, CpuInt4LinearMethod)
        if qkv_fuses:
            assert isinstance(layer.self_attn.qkv_proj.quant_method, CpuInt4LinearMethod)
        else:
            assert layer.self_attn.qkv_proj is None
            assert layer.self_attn.q_proj.quant_method.cpu_kind == "int4"
    assert _same_sibling_outputs(plain, fused, torch.bfloat16, exact=True) == made
    assert torch.equal(_run(fused), _run(plain))


def test_squeezellm_bfloat16_dequantized_weights_fuse(ckpts: QuantCheckpoints) -> None:
    """A lookup-table layer is dequantized once on the CPU: its weights fuse dense."""
    path = ckpts(QuantSpec("squeezellm"))
    plain, fused = (_load_quantized(path, torch.bfloat16) for _ in range(2))
    assert fuse_cpu_projections(fused, torch.bfloat16) == 2 * plain.config.num_layers
    assert type(fused.model.layers[0].self_attn.qkv_proj.quant_method) is UnquantizedLinearMethod
    ref, got = _run(plain), _run(fused)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


# -- what does not fuse -------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "flag", "dtype", "kind"), [
    (QuantSpec("gptq", g_idx="act-order", model_kw=KV4), None, torch.bfloat16, "perm"),
    (QuantSpec("gptq", bits=8, group_size=-1, model_kw=KV4), None, torch.bfloat16, "int8"),
    (None, "int8", torch.float32, "w8a8"),
], ids=["gptq-act-order", "gptq-int8", "w8a8"])
def test_groups_without_a_shared_cpu_layout_stay_apart(ckpts: QuantCheckpoints, spec, flag,
                                                        dtype: torch.dtype, kind: str) -> None:
    path = ckpts(spec) if spec is not None else tiny_checkpoint("llama")
    plain, fused = (_load_quantized(path, dtype, flag) for _ in range(2))
    q_proj = fused.model.layers[0].self_attn.q_proj
    if kind == "perm":
        assert q_proj.perm is not None and q_proj.quant_method.cpu_kind == "int4"
    elif kind == "int8":
        assert q_proj.quant_method.cpu_kind == "int8"
    else:
        assert type(q_proj.quant_method).__name__ == "Int8LinearMethod"
    methods = {n: type(m.quant_method) for n, m in fused.named_modules() if isinstance(m, Linear)}
    assert fuse_cpu_projections(fused, dtype) == 0
    assert {n: type(m.quant_method) for n, m in fused.named_modules() if isinstance(m, Linear)} == methods
    for _, module, fused_name, _ in _groups(fused):
        assert getattr(module, fused_name) is None
    assert torch.equal(_run(fused), _run(plain))


class Pair(torch.nn.Module):
    FUSED_PROJECTIONS = {"ab": ("a", "b")}

    def __init__(self, a: Linear, b: Linear) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.ab: Linear | None = None


def _dense(n: int, k: int, bias: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> Linear:
    layer = Linear(k, n, bias)
    gen = torch.Generator().manual_seed(seed)
    layer.weight.data = torch.randn(n, k, generator=gen).to(dtype)
    if bias:
        layer.bias.data = torch.randn(n, generator=gen).to(dtype)
    return layer


def _int4_operands(n: int, k: int, group: int = 32, seed: int = 0, bias: bool = False) -> Int4Operands:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen) * 0.1 + 0.01
    offsets = torch.randn(k // group, n, generator=gen) * 0.1
    packed = pack_int4_cpu(q, scales, offsets, group)
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return Int4Operands(packed.qweight, packed.scales_and_zeros, packed.group, b)


def _int4(n: int, k: int, group: int = 32, seed: int = 0, bias: bool = False) -> Linear:
    return Linear(k, n, bias, CpuInt4LinearMethod(_int4_operands(n, k, group, seed, bias)))


class LyingMethod(UnquantizedLinearMethod):
    """Hands fusion operands that are not what it computes (a bug fusion must catch)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return super().apply(layer, x) + 1.0


@pytest.mark.parametrize("case", ["kinds", "bias", "in_features", "dtype", "int4-group",
                                  "int4-partial-block", "packed", "check-fails"])
def test_a_group_that_cannot_fuse_is_left_as_it_was(case: str) -> None:
    if case == "kinds":
        a, b = _dense(64, 64, dtype=torch.bfloat16), _int4(64, 64)
    elif case == "bias":
        a, b = _dense(32, 64, bias=True), _dense(32, 64)
    elif case == "in_features":
        a, b = _dense(32, 64), _dense(32, 32)
    elif case == "dtype":
        a, b = _dense(32, 64), _dense(32, 64, dtype=torch.bfloat16)
    elif case == "int4-group":
        a, b = _int4(64, 128, group=32), _int4(64, 128, group=64)
    elif case == "int4-partial-block":
        a, b = _int4(32, 64), _int4(64, 64, seed=1)
    elif case == "packed":
        a, b = _dense(32, 64), _dense(32, 64, seed=1)
        pack_cpu_linears(torch.nn.Sequential(a))
        assert isinstance(a.quant_method, PackedCpuLinearMethod)
    else:
        a, b = _dense(32, 64), _dense(32, 64, seed=1)
        a.quant_method = LyingMethod()
    pair = Pair(a, b)
    methods = (a.quant_method, b.quant_method)
    dtype = torch.bfloat16 if case in ("kinds", "int4-group", "int4-partial-block") else torch.float32
    x = torch.randn(3, b.in_features).to(torch.bfloat16 if case == "dtype" else dtype)  # b's dtype
    before = b(x)
    assert fuse_cpu_projections(pair, dtype) == 0
    assert pair.ab is None and (a.quant_method, b.quant_method) == methods
    assert torch.equal(b(x), before)  # the members keep their weights and still run


def test_synthetic_int4_group_with_a_partial_last_block_fuses_exactly() -> None:
    """Only members before the last need whole 64-row blocks; biases are concatenated."""
    a, b, c = (_int4(n, 128, seed=i, bias=True) for i, n in enumerate((128, 64, 48)))

    class Triple(torch.nn.Module):
        FUSED_PROJECTIONS = {"abc": ("a", "b", "c")}

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = a, b, c
            self.abc = None

    x = torch.randn(5, 128).bfloat16()
    ref = torch.cat([m(x) for m in (a, b, c)], dim=-1)
    holder = Triple()
    assert fuse_cpu_projections(holder, torch.bfloat16) == 1
    assert isinstance(holder.abc.quant_method, CpuInt4LinearMethod) and holder.abc.out_features == 240
    assert torch.equal(holder.abc(x), ref)
    y32 = holder.abc(x.float())  # other activation dtypes are cast to the kernel's and back
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, ref.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="abc"):
        a(x)


def test_concat_refuses_int4_members_that_are_not_whole_packed_blocks() -> None:
    """torch's int4 packing interleaves blocks of 64 rows: packed rows of a member with N not a
    multiple of 64 do not concatenate with the next member's (the rule ``_concat`` keeps)."""
    assert INT4_PACK_ROWS == 64
    k = 64
    for n_first in (16, 32, 48, 96):
        parts = [_int4_operands(n_first, k, seed=0), _int4_operands(64, k, seed=1)]
        assert _concat(parts) is None, n_first
        # and the refusal is needed: the naive concatenation computes something else
        x = torch.randn(3, k).bfloat16()
        ref = torch.cat([int4_mm_cpu(x, p.qweight, p.scales_and_zeros, p.group) for p in parts], -1)
        naive = int4_mm_cpu(x, torch.cat([p.qweight for p in parts]),
                            torch.cat([p.scales_and_zeros for p in parts], dim=1), parts[0].group)
        assert not torch.equal(naive, ref), n_first
    for sizes in ((64, 64), (64, 32), (128, 64, 16), (192, 48)):
        parts = [_int4_operands(n, k, seed=i, bias=True) for i, n in enumerate(sizes)]
        joined = _concat(parts)
        assert isinstance(joined, Int4Operands) and joined.qweight.shape[0] == sum(sizes)
        x = torch.randn(3, k).bfloat16()
        ref = torch.cat([int4_mm_cpu(x, p.qweight, p.scales_and_zeros, p.group, p.bias) for p in parts], -1)
        got = int4_mm_cpu(x, joined.qweight, joined.scales_and_zeros, joined.group, joined.bias)
        assert torch.equal(got, ref), sizes


def test_concat_dense_operands() -> None:
    w = [torch.randn(n, 8) for n in (3, 5)]
    joined = _concat([DenseOperands(w[0], None), DenseOperands(w[1], None)])
    assert isinstance(joined, DenseOperands) and joined.bias is None
    assert torch.equal(joined.weight, torch.cat(w))
    assert _concat([DenseOperands(w[0], torch.zeros(3)), DenseOperands(w[1], None)]) is None
    assert _concat([DenseOperands(w[0], None), _int4_operands(64, 64)]) is None


# -- through the engine ------------------------------------------------------------------------


def _greedy(path: Path, monkeypatch: pytest.MonkeyPatch, fuse: bool, **config) -> tuple[list, object]:
    from engine import create_engine

    with monkeypatch.context() as patch:
        if not fuse:
            patch.setattr("engine.engine_builder.fuse_cpu_projections", lambda model, dtype: 0)
        engine = create_engine(EngineConfig(model_path=str(path), device="cpu", num_kv_blocks=32,
                                            max_model_len=128, **config))
    try:
        prompts = [[5, 17, 99, 3, 250, 7], [300, 12, 44]]
        results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                  timeout=60)
        return [r.token_ids for r in results], engine.runner.model
    finally:
        engine.shutdown()


def test_the_engine_fuses_then_packs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_checkpoint("llama")
    tokens, model = _greedy(path, monkeypatch, fuse=True, dtype="float32")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj.quant_method, PackedCpuLinearMethod)  # fused, then packed
    assert isinstance(attn.q_proj.quant_method, FusedAwayMethod)
    ref_tokens, ref_model = _greedy(path, monkeypatch, fuse=False, dtype="float32")
    assert ref_model.model.layers[0].self_attn.qkv_proj is None
    assert tokens == ref_tokens


def test_the_engine_on_a_bfloat16_gguf_fuses_int4(kv4_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    path = kv4_gguf("qwen2", "Q4_0")
    tokens, model = _greedy(path, monkeypatch, fuse=True, dtype="bfloat16")
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, CpuInt4LinearMethod)
    assert isinstance(model.model.layers[1].mlp.gate_up_proj.quant_method, CpuInt4LinearMethod)
    ref_tokens, _ = _greedy(path, monkeypatch, fuse=False, dtype="bfloat16")
    assert tokens == ref_tokens


def test_fusion_logs_what_it_kept_apart(files, caplog: pytest.LogCaptureFixture) -> None:
    model = load_model(files("Q4_0"), torch.bfloat16, "cpu")
    with caplog.at_level("INFO", logger=cpu_fusion.__name__):
        fuse_cpu_projections(model, torch.bfloat16)
    assert "2 sibling groups fused" in caplog.text and "2 kept apart" in caplog.text


# -- rotary, RMSNorm, decode attention ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rolled_rotary_is_bit_identical(dtype: torch.dtype, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    t, hq, hkv = 7, 4, 2
    emb = RotaryEmbedding(head_dim, RopeConfig(theta=10000.0))
    pos = torch.tensor([0, 1, 5, 31, 200, 1000, 4095])
    table_cos, table_sin = emb(pos, dtype)
    rand_cos, rand_sin = (torch.randn(t, head_dim, generator=gen).to(dtype) for _ in range(2))
    for cos, sin in ((table_cos, table_sin), (rand_cos, rand_sin)):
        sin_signed = signed_sin(sin)
        half = head_dim // 2
        assert torch.equal(sin_signed[:, :half], -sin[:, :half])
        assert torch.equal(sin_signed[:, half:], sin[:, half:])
        x = (torch.randn(t, hq, head_dim, generator=gen) * 3).to(dtype)
        assert torch.equal(apply_rotary_rolled(x, cos, sin_signed), apply_rotary(x, cos, sin))
        # q and k as a strided view of a fused q/k/v output, as the fused attention reads them
        qkv = (torch.randn(t, (hq + 2 * hkv) * head_dim, generator=gen) * 3).to(dtype)
        view = qkv.view(t, -1, head_dim)[:, : hq + hkv]
        assert not view.is_contiguous()
        got = apply_rotary_rolled(view, cos, sin_signed)
        assert torch.equal(got, apply_rotary(view, cos, sin))
        assert torch.equal(got, apply_rotary(view.contiguous(), cos, sin))
        q, k = got.split((hq, hkv), dim=1)
        assert torch.equal(q, apply_rotary(view[:, :hq].contiguous(), cos, sin))
        assert torch.equal(k, apply_rotary(view[:, hq:].contiguous(), cos, sin))
        # a view with a strided last dimension too
        wide = (torch.randn(t, hq, 2 * head_dim, generator=gen)).to(dtype)[..., ::2]
        assert torch.equal(apply_rotary_rolled(wide, cos, sin_signed), apply_rotary(wide, cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [64, 576, 2048])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_half_precision_rms_norm_is_bit_identical_to_the_old_formula(dtype: torch.dtype, size: int,
                                                                      rows: int) -> None:
    for eps in (1e-5, 1e-6):
        norm = RMSNorm(size, eps)
        gen = torch.Generator().manual_seed(size + rows)
        norm.weight.data = (1 + 0.1 * torch.randn(size, generator=gen)).to(dtype)
        for scale in (1e-2, 1.0, 30.0):
            x = (torch.randn(rows, size, generator=gen) * scale).to(dtype)
            x32 = x.float()
            ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
            got = norm(x)
            assert got.dtype == dtype
            assert torch.equal(got, ref), (eps, scale)
        # a strided input (a slice of a wider tensor)
        wide = torch.randn(rows, 2 * size, generator=gen).to(dtype)[:, ::2]
        x32 = wide.float()
        ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        assert torch.equal(norm(wide), ref)


def test_bfloat16_rms_norm_keeps_leading_dimensions() -> None:
    norm = RMSNorm(32, 1e-6)
    norm.weight.data = torch.rand(32).bfloat16() + 0.5
    x = torch.randn(3, 4, 32).bfloat16()  # q/k norm: [T, H, D]
    assert torch.equal(norm(x), norm(x.reshape(12, 32)).view(3, 4, 32))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("seq_lens", "window"), [([1], None), ([5, 17, 2, 12], None), ([9, 30], 8)])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_half_precision_decode_attention_is_computed_in_float32(
        cache_dtype: torch.dtype, seq_lens: list[int], window: int | None, heads: tuple[int, int]) -> None:
    hq, hkv = heads
    d, num_blocks = 16, 32
    gen = torch.Generator().manual_seed(len(seq_lens))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in seq_lens]
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, BLOCK, "cpu")
    assert meta.decode_plan(BLOCK, window) is not None  # the shortcut is what runs
    cache = (torch.randn(2, num_blocks, BLOCK, hkv, d, generator=gen) * 2).to(cache_dtype)
    b = len(seq_lens)
    q, k, v = ((torch.randn(b, h, d, generator=gen) * 2).to(cache_dtype) for h in (hq, hkv, hkv))

    ours = LayerKVCache(k=cache[0].clone(), v=cache[1].clone())
    out = _attend_torch_decode(q, k, v, meta, ours, 0.25, window)
    assert out.dtype == cache_dtype and out.shape == (b, hq, d)

    ref_k, ref_v = cache[0].double(), cache[1].double()  # the same values, attended in float64
    write_kv_ref(k.double(), v.double(), ref_k, ref_v, meta.slot_mapping)
    assert torch.equal(ours.k.double(), ref_k) and torch.equal(ours.v.double(), ref_v)  # written as is
    ref = paged_attention_ref(q.double(), ref_k, ref_v, meta.block_tables, meta.query_start_loc,
                              meta.seq_lens, 0.25, window)
    # float32 compute, one rounding at the end: within one half-precision step of the reference
    step = torch.finfo(cache_dtype).eps
    err = (out.double() - ref).abs()
    assert bool((err <= step * ref.abs() + 1e-3).all()), float(err.max())
    # and no worse than rounding the float64 result itself, give or take one step
    assert float(err.max()) <= float((ref.to(cache_dtype).double() - ref).abs().max()) + step * float(ref.abs().max())


def test_float32_decode_attention_is_unchanged() -> None:
    """A float32 cache takes the same path without casts: float32 in, float32 out."""
    meta = AttentionMetadata.build([1, 1], [6, 3], [[0, 1], [2]], BLOCK, "cpu")
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 4, BLOCK, 2, 8, generator=gen)
    q, k, v = (torch.randn(2, h, 8, generator=gen) for h in (4, 2, 2))
    ours = LayerKVCache(k=cache[0].clone(), v=cache[1].clone())
    out = _attend_torch_decode(q, k, v, meta, ours, 0.3, None)
    ref_k, ref_v = cache[0].clone(), cache[1].clone()
    write_kv_ref(k, v, ref_k, ref_v, meta.slot_mapping)
    ref = paged_attention_ref(q, ref_k, ref_v, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                              0.3, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
