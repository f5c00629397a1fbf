"""FP8, INT8 W8A8 and bitsandbytes loaders on a tiny Llama (CPU, float32 activations).

Checkpoints are written by the tools themselves (compressed-tensors, bitsandbytes +
transformers' config; AutoFP8 per FORMATS.md): see tests/quant_checkpoints.py. Each method
must (1) dequantize to exactly what the tool's own dequantization gives, (2) multiply
like a float32 model holding those dequantized weights, up to its activation quantization,
and (3) stay within a stated bound of the float32 model's logits.

Logit bounds, relative L2 error vs the float32 model (this random tiny model roughly
doubles a per-matmul error; measured values in brackets, each bound about twice the
worst): fp8 0.2 [0.06 weight-only .. 0.12 static], int8 W8A8 0.08 [0.02 dynamic .. 0.04
static per-tensor], bitsandbytes nf4 0.35 [0.22], fp4 0.5 [0.31], LLM.int8 0.05 [0.023].
Against the float32 model holding the dequantized weights (activation rounding only):
fp8 0.12 [<= 0.081], int8 0.06 [<= 0.035], weight-only / bnb 4-bit 1e-5 [0].
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import tests.quant_checkpoints as qc
from engine.config import ModelConfig
from engine.kv_setup import load_kv_scales
from engine.loader import load_model
from engine.quantization import QuantFormatError, resolve
from engine.quantization.compressed_tensors import CTConfig, CTScheme, name_matches
from engine.quantization.fp8 import FP8Config
from engine.quantization.int8 import Int8Config

torch.set_num_threads(1)

LOGIT_BOUND = {"fp8": 0.2, "int8": 0.08, "nf4": 0.35, "fp4": 0.5, "bnb-int8": 0.05}
# Against the float32 model holding the same dequantized weights: only activation rounding
# is left (fp8: 3 mantissa bits per token; int8: 8 bits per token), or nothing (weight-only).
ACT_BOUND = {"fp8": 0.12, "int8": 0.06, "none": 1e-5}
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _load(path, flag=None, options=None):
    quant = resolve(flag, path, ModelConfig.from_pretrained(path).quantization_config, options or {})
    return load_model(path, torch.float32, "cpu", quant=quant)


@pytest.fixture(scope="module")
def ref_logits():
    return qc.logits(qc.fp32_model(), qc.prompt_ids())


def _check_logits(model, ref_logits, bound, fake_weights=None, act_bound=None):
    got = qc.logits(model, qc.prompt_ids())
    err = qc.rel_err(got, ref_logits)
    assert err < bound, f"logits relative error {err:.4f} >= {bound}"
    if fake_weights is not None:
        fake = qc.logits(qc.fake_quant_model(fake_weights), qc.prompt_ids())
        err = qc.rel_err(got, fake)
        assert err < act_bound, f"vs dequantized-weight model: {err:.2e} >= {act_bound}"


# -- compressed-tensors ---------------------------------------------------------------------

CT_CASES = [  # (kind, weight strategy, dynamic activations; None = weight-only)
    ("float", "channel", True), ("float", "tensor", False), ("float", "tensor", True),
    ("float", "channel", None), ("int", "channel", True), ("int", "tensor", False),
    ("int", "channel", False),
]


@pytest.mark.parametrize(("kind", "strategy", "dynamic"), CT_CASES)
def test_compressed_tensors_checkpoint(tmp_path, ref_logits, kind, strategy, dynamic) -> None:
    ignore = ("lm_head", "re:.*layers\\.1\\.mlp\\.down_proj")
    path = qc.ct_checkpoint(tmp_path / "ckpt", kind, strategy, dynamic, ignore=ignore)
    model = _load(path)
    stored = load_file(str(path / "model.safetensors"))
    weights = {}
    for prefix in qc.linear_prefixes():
        layer = model.get_submodule(prefix)
        if prefix == "model.layers.1.mlp.down_proj":  # ignored by the regex: plain fp32
            assert not layer.quantized
            assert torch.equal(layer.weight, qc.source_tensors()[f"{prefix}.weight"])
            continue
        assert layer.weight.dtype == (torch.float8_e4m3fn if kind == "float" else torch.int8)
        ref = qc.ct_reference_weight(path, prefix, kind, strategy)
        weights[prefix] = ref
        torch.testing.assert_close(layer.quant_method.dequantize(layer), ref, rtol=0, atol=0)
        if dynamic is False:
            assert torch.equal(layer.input_scale, stored[f"{prefix}.input_scale"].float().reshape(1))
        else:
            assert layer.input_scale is None
    assert not model.lm_head.quantized
    method = "fp8" if kind == "float" else "int8"
    act = "none" if dynamic is None else method
    _check_logits(model, ref_logits, LOGIT_BOUND[method], weights, ACT_BOUND[act])


def test_compressed_tensors_name_matching() -> None:
    scheme = CTScheme("channel", "token", True, True)
    ct = CTConfig(((("Linear",), scheme),), ("lm_head", "re:.*mlp.down_proj"))
    assert ct.scheme_for("model.layers.3.mlp.down_proj") is None
    assert ct.scheme_for("lm_head") is None
    assert ct.scheme_for("model.layers.3.mlp.up_proj") is scheme
    named = CTConfig(((("re:.*self_attn\\..*",), scheme),), ())
    assert named.scheme_for("model.layers.0.self_attn.q_proj") is scheme
    assert named.scheme_for("model.layers.0.mlp.up_proj") is None
    assert name_matches("lm_head", "lm_head") and not name_matches("model.lm_head", "lm_head")


# -- AutoFP8 ------------------------------------------------------------------------------


def test_autofp8_static_with_kv_output_scales(tmp_path, ref_logits) -> None:
    path = qc.autofp8_checkpoint(tmp_path / "ckpt", static=True)
    stored = load_file(str(path / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.output_scale" in stored
    model = _load(path)
    weights = {}
    for prefix in qc.linear_prefixes():
        layer = model.get_submodule(prefix)
        weights[prefix] = stored[f"{prefix}.weight"].float() * stored[f"{prefix}.weight_scale"]
        torch.testing.assert_close(layer.quant_method.dequantize(layer), weights[prefix], rtol=0, atol=0)
        assert layer.input_scale.item() == stored[f"{prefix}.input_scale"].item()
        assert not hasattr(layer, "output_scale")
    _check_logits(model, ref_logits, LOGIT_BOUND["fp8"], weights, ACT_BOUND["fp8"])


def test_kv_cache_scales_beside_quantized_layers(tmp_path) -> None:
    """compressed-tensors' kv_cache_scheme stores ``self_attn.k_scale`` / ``v_scale``: the
    loader passes them by and engine.kv_setup reads them; ``k_proj.k_scale`` under a
    quantized layer (the older spelling) is a K scale too: with both, the larger wins."""
    extra = {f"model.layers.{i}.self_attn.{n}": torch.tensor(0.1 * (i + 1) + (n == "v_scale"))
             for i in range(2) for n in ("k_scale", "v_scale")}
    extra["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.5)
    path = qc.ct_checkpoint(tmp_path / "ckpt", "float", "channel", True, extra=extra)
    model = _load(path)
    assert model.get_submodule("model.layers.0.self_attn.k_proj").quantized
    k, v = load_kv_scales(path, 2)
    torch.testing.assert_close(torch.tensor(k), torch.tensor([0.5, 0.2]))
    torch.testing.assert_close(torch.tensor(v), torch.tensor([1.1, 1.2]))


def test_autofp8_block_scales_requantized_per_channel(tmp_path, ref_logits) -> None:
    path = qc.autofp8_checkpoint(tmp_path / "ckpt", static=False, block=(32, 32))
    stored = load_file(str(path / "model.safetensors"))
    model = _load(path)
    for prefix in qc.linear_prefixes():
        layer = model.get_submodule(prefix)
        scale_inv = stored[f"{prefix}.weight_scale_inv"]
        ref = stored[f"{prefix}.weight"].float() * scale_inv.repeat_interleave(32, 0).repeat_interleave(32, 1)
        assert layer.weight_scale.shape == (ref.shape[0], 1)
        # one more e4m3 rounding: half an ulp (2^-4 relative), or half the smallest subnormal
        bound = ref.abs() * 2**-4 + layer.weight_scale * 2**-10
        assert bool(((layer.quant_method.dequantize(layer) - ref).abs() <= bound).all()), prefix
    _check_logits(model, ref_logits, LOGIT_BOUND["fp8"])


# -- bitsandbytes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("quant_type", "double_quant"),
                         [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)])
def test_bitsandbytes_checkpoint(tmp_path, ref_logits, quant_type, double_quant) -> None:
    path = qc.bnb_checkpoint(tmp_path / "ckpt", quant_type, double_quant)
    model = _load(path)
    weights = {}
    for prefix in qc.linear_prefixes():
        layer = model.get_submodule(prefix)
        weights[prefix] = qc.bnb_reference_weight(path, prefix)
        torch.testing.assert_close(layer.quant_method.dequantize(layer).float(), weights[prefix], rtol=0, atol=0)
        if quant_type != "int8":
            assert layer.quant_state.nested == double_quant
    # 4-bit: bnb's matmul is dequantize + matmul; LLM.int8 also quantizes activations
    act = "int8" if quant_type == "int8" else "none"
    key = "bnb-int8" if quant_type == "int8" else quant_type
    _check_logits(model, ref_logits, LOGIT_BOUND[key], weights, ACT_BOUND[act])


# -- quantized at load time -----------------------------------------------------------------


@pytest.mark.parametrize(("flag", "bnb_type"),
                         [("fp8", None), ("int8", None), ("bitsandbytes", "nf4"),
                          ("bitsandbytes", "fp4"), ("bitsandbytes", "int8")])
def test_load_time_quantization(tmp_path, ref_logits, flag, bnb_type) -> None:
    options = {"bnb_quant_type": bnb_type or "nf4"}
    model = _load(qc.source(), flag, options)
    assert not model.lm_head.quantized
    bnb_path = qc.bnb_checkpoint(tmp_path / "bnb", bnb_type) if bnb_type else None
    weights = {}
    for prefix in qc.linear_prefixes():
        layer = model.get_submodule(prefix)
        w = qc.source_tensors()[f"{prefix}.weight"]
        if flag == "fp8":  # per tensor, amax / 448
            scale = w.abs().amax() / 448.0
            assert torch.equal(layer.weight_scale, scale.reshape(1))
            assert torch.equal(layer.weight.float(), (w / scale).to(torch.float8_e4m3fn).float())
        elif flag == "int8":  # per channel, amax / 127, round half to even
            scale = w.abs().amax(dim=1, keepdim=True) / 127.0
            assert torch.equal(layer.weight_scale, scale)
            assert torch.equal(layer.weight, torch.round(w / scale).to(torch.int8))
        weights[prefix] = layer.quant_method.dequantize(layer).float()
        if bnb_path is not None:  # the same as bitsandbytes quantizing the weight itself
            torch.testing.assert_close(weights[prefix], qc.bnb_reference_weight(bnb_path, prefix), rtol=0, atol=0)
    key = {"fp8": "fp8", "int8": "int8", "nf4": "nf4", "fp4": "fp4", "int8-bnb": "bnb-int8"}
    name = flag if bnb_type is None else ("int8-bnb" if bnb_type == "int8" else bnb_type)
    act = {"fp8": "fp8", "int8": "int8", "nf4": "none", "fp4": "none", "int8-bnb": "int8"}[name]
    _check_logits(model, ref_logits, LOGIT_BOUND[key[name]], weights, ACT_BOUND[act])


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    path = qc.ct_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt", "float", "channel", False)
    import json

    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())["quantization_config"]


def _expect_error(path, *parts: str) -> None:
    with pytest.raises(QuantFormatError) as info:
        _load(path)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_missing_weight_scale(tmp_path, fp8_ckpt) -> None:
    tensors, config = fp8_ckpt
    tensors = {k: v for k, v in tensors.items() if k != f"{Q_PROJ}.weight_scale"}
    _expect_error(qc.write_checkpoint(tmp_path / "c", tensors, config), f"{Q_PROJ}.weight_scale")


def test_wrong_weight_dtype(tmp_path, fp8_ckpt) -> None:
    tensors, config = fp8_ckpt
    tensors = {**tensors, f"{Q_PROJ}.weight": tensors[f"{Q_PROJ}.weight"].to(torch.float16)}
    _expect_error(qc.write_checkpoint(tmp_path / "c", tensors, config), f"{Q_PROJ}.weight", "float8_e4m3fn")


def test_static_checkpoint_without_input_scale(tmp_path, fp8_ckpt) -> None:
    tensors, config = fp8_ckpt
    tensors = {k: v for k, v in tensors.items() if k != f"{Q_PROJ}.input_scale"}
    _expect_error(qc.write_checkpoint(tmp_path / "c", tensors, config), f"{Q_PROJ}.input_scale")


def _group_edit(config: dict, **weights) -> dict:
    import copy

    config = copy.deepcopy(config)
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


@pytest.mark.parametrize(("edit", "key"), [
    ({"num_bits": 4}, "config_groups.group_0.weights"),
    ({"strategy": "group", "group_size": 32}, "config_groups.group_0.weights.strategy"),
    ({"strategy": "block"}, "config_groups.group_0.weights.block_structure"),
    ({"strategy": "block", "block_structure": [128, 0]},
     "config_groups.group_0.weights.block_structure"),
    ({"symmetric": False}, "config_groups.group_0.weights.symmetric"),
])
def test_bad_compressed_tensors_config(fp8_ckpt, edit, key) -> None:
    config = _group_edit(fp8_ckpt[1], **edit)
    with pytest.raises(QuantFormatError, match=re.escape(key)):
        FP8Config.from_checkpoint(config, "config.json", {})
    if edit.get("num_bits") == 4:  # through the registry, too: 4-bit float is not fp8
        with pytest.raises(QuantFormatError, match="float"):
            resolve(None, qc.source(), config, {})


def test_bad_activation_scheme(fp8_ckpt) -> None:
    import copy

    config = copy.deepcopy(fp8_ckpt[1])
    config["config_groups"]["group_0"]["input_activations"].update(strategy="token", dynamic=False)
    with pytest.raises(QuantFormatError, match="input_activations"):
        FP8Config.from_checkpoint(config, "config.json", {})
    config["config_groups"]["group_0"]["input_activations"] = None
    int8 = {**_group_edit(config, type="int"), "format": "int-quantized"}
    with pytest.raises(QuantFormatError, match="weight-only"):
        Int8Config.from_checkpoint(int8, "config.json", {})


def test_compressed_tensors_blocks_are_fp8_only_and_group_activations_dynamic_only(fp8_ckpt) -> None:
    """The FP8_BLOCK preset: weights in blocks, activations dynamic per token-group (run per
    token). int8 blocks and static group activations are refused."""
    import copy

    config = _group_edit(fp8_ckpt[1], strategy="block", block_structure=[128, 128])
    acts = config["config_groups"]["group_0"]["input_activations"]
    acts.update(strategy="group", group_size=128, dynamic=True)
    method = FP8Config.from_checkpoint(config, "config.json", {})
    assert "[128, 128] blocks requantized per-channel" in method.describe()
    static = copy.deepcopy(config)
    static["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(QuantFormatError, match="input_activations"):
        FP8Config.from_checkpoint(static, "config.json", {})
    int8 = {**_group_edit(config, type="int"), "format": "int-quantized"}
    int8["config_groups"]["group_0"]["input_activations"].update(type="int", strategy="token")
    with pytest.raises(QuantFormatError, match="weights.strategy 'block'"):
        Int8Config.from_checkpoint(int8, "config.json", {})


def test_autofp8_block_needs_dynamic() -> None:
    raw = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}
    with pytest.raises(QuantFormatError, match="weight_block_size"):
        FP8Config.from_checkpoint(raw, "config.json", {})


def test_bnb_4bit_without_quant_state(tmp_path) -> None:
    path = qc.bnb_checkpoint(tmp_path / "src", "nf4")
    tensors = load_file(str(path / "model.safetensors"))
    key = f"{Q_PROJ}.weight.quant_state.bitsandbytes__nf4"
    del tensors[key]
    config = ModelConfig.from_pretrained(path).quantization_config
    _expect_error(qc.write_checkpoint(tmp_path / "c", tensors, config), key)


def test_bnb_quant_type_contradicts_config(tmp_path) -> None:
    path = qc.bnb_checkpoint(tmp_path / "src", "nf4")
    config = {**ModelConfig.from_pretrained(path).quantization_config, "bnb_4bit_quant_type": "fp4"}
    bad = qc.write_checkpoint(tmp_path / "c", load_file(str(path / "model.safetensors")), config)
    _expect_error(bad, "bitsandbytes__nf4", "'fp4'")


# -- CUDA: the GPU paths (fp8 tensor cores / Triton int8 / bitsandbytes CUDA) in fp16 -------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (checkpoint builder or None for the plain model, --quantization, bnb_quant_type, method key, act key)
GPU_CASES = {
    "fp8-static": (lambda p: qc.ct_checkpoint(p, "float", "tensor", False), None, None, "fp8", "fp8"),
    "fp8-dynamic": (lambda p: qc.ct_checkpoint(p, "float", "channel", True), None, None, "fp8", "fp8"),
    "fp8-weight-only": (lambda p: qc.ct_checkpoint(p, "float", "channel", None), None, None, "fp8", "none"),
    "autofp8-block": (lambda p: qc.autofp8_checkpoint(p, False, (32, 32)), None, None, "fp8", "fp8"),
    "int8-static": (lambda p: qc.ct_checkpoint(p, "int", "tensor", False), None, None, "int8", "int8"),
    "int8-dynamic": (lambda p: qc.ct_checkpoint(p, "int", "channel", True), None, None, "int8", "int8"),
    "nf4-dq": (lambda p: qc.bnb_checkpoint(p, "nf4", True), None, None, "nf4", "none"),
    "fp4": (lambda p: qc.bnb_checkpoint(p, "fp4"), None, None, "fp4", "none"),
    "llm-int8": (lambda p: qc.bnb_checkpoint(p, "int8"), None, None, "bnb-int8", "int8"),
    "fp8-load-time": (None, "fp8", None, "fp8", "fp8"),
    "int8-load-time": (None, "int8", None, "int8", "int8"),
    "nf4-load-time": (None, "bitsandbytes", "nf4", "nf4", "none"),
    "llm-int8-load-time": (None, "bitsandbytes", "int8", "bnb-int8", "int8"),
}
FP16_BOUND = 1e-2  # fp16 activations alone, against the same method in float32 on the CPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_cuda_matches_cpu(tmp_path, ref_logits, case) -> None:
    build, flag, bnb_type, method, act = GPU_CASES[case]
    path = build(tmp_path / "ckpt") if build else qc.source()
    options = {"bnb_quant_type": bnb_type or "nf4"}
    quant = resolve(flag, path, ModelConfig.from_pretrained(path).quantization_config, options)
    on_gpu = load_model(path, torch.float16, "cuda", quant=quant)
    got = qc.logits(on_gpu, qc.prompt_ids())
    cpu = qc.logits(_load(path, flag, options), qc.prompt_ids())
    err_ref, err_cpu = qc.rel_err(got, ref_logits), qc.rel_err(got, cpu)
    # activations rounded to fp16 first may round to other fp8/int8 codes than on the CPU
    bound = FP16_BOUND if act == "none" else ACT_BOUND[act]
    assert err_ref < LOGIT_BOUND[method], f"vs float32 model: {err_ref:.4f}"
    assert err_cpu < bound, f"vs the CPU path: {err_cpu:.2e} >= {bound}"
