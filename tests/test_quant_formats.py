"""AWQ, GPTQ and SqueezeLLM: packing layouts, loaders and their errors.

The references here read the checkpoint tensors as /work/shared/FORMATS.md words them
(bit by bit, AWQ's nibble order written out), independently of the packers under test.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deploy_kernels import log_once
from engine.config import ModelConfig
from engine.layers.linear import Linear
from engine.loader import load_model
from engine.quantization import QuantFormatError, resolve
from engine.quantization.awq import AWQConfig
from engine.quantization.gptq import GPTQConfig
from engine.quantization.packing import (
    pack_awq,
    pack_gptq_cols,
    pack_gptq_rows,
    pack_squeezellm,
    unpack_awq,
    unpack_gptq_cols,
    unpack_gptq_rows,
    unpack_squeezellm,
)
from engine.quantization.squeezellm import SqueezeLLMConfig
from tests.quant_fixtures import CONFIG_FILES, QuantCheckpoints, QuantSpec
from tests.test_model_parity import _Batch, _step

torch.set_num_threads(1)

REV = [0, 4, 1, 5, 2, 6, 3, 7]  # FORMATS.md: logical AWQ column 8c + j is nibble REV[j]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> QuantCheckpoints:
    return QuantCheckpoints(tmp_path_factory.mktemp("quant"))


# ----------------------------------------------------------------------------- references


def read_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Values ``[count, M]`` of int32 ``words [W, M]`` read as one little-endian bit
    stream along dim 0, value j at stream bits ``bits * j`` (FORMATS.md's GPTQ packing),
    assembled bit by bit."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(count, words.shape[1], dtype=torch.int64)
    for t in range(bits):
        pos = torch.arange(count) * bits + t
        out |= ((w[pos // 32] >> (pos % 32).unsqueeze(1)) & 1) << t
    return out


def read_awq(packed: torch.Tensor) -> torch.Tensor:
    """``q[r, n] = (packed[r, n // 8] >> 4 * REV[n % 8]) & 15``."""
    n = torch.arange(packed.shape[1] * 8)
    shifts = torch.tensor(REV)[n % 8] * 4
    return (packed.to(torch.int64)[:, n // 8] >> shifts) & 0xF


def reference_weight(spec: QuantSpec, t: dict[str, torch.Tensor], k: int, n: int) -> torch.Tensor:
    """``W [K, N]`` float32 by FORMATS.md's dequantization of one layer's tensors ``t``."""
    if spec.method == "squeezellm":
        q = read_stream(t["qweight"], spec.bits, k)
        return t["lookup_table"].float()[torch.arange(n), q]  # LUT[n, q[k, n]]
    group = k if spec.group_size == -1 else spec.group_size
    s = t["scales"].float()
    if spec.method == "awq":
        q = read_awq(t["qweight"])
        z = read_awq(t["qzeros"]) if "qzeros" in t else torch.full_like(s, 8, dtype=torch.int64)
        g = torch.arange(k) // group
        return (q - z[g]).float() * s[g]
    q = read_stream(t["qweight"], spec.bits, k)
    z = read_stream(t["qzeros"].t(), spec.bits, n).t()  # masked to b bits
    if spec.checkpoint_format == "gptq":
        z = z + 1
    g = t["g_idx"].long()
    return s[g] * (q - z[g]).float()


def layer_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {n[len(prefix) + 1 :]: t for n, t in _file(path).items() if n.startswith(prefix + ".")}


@cache
def _file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def load_quantized(path: Path, flag: str | None = None) -> torch.nn.Module:
    quant = resolve(flag, path, ModelConfig.from_pretrained(path).quantization_config, {})
    return load_model(path, torch.float32, "cpu", quant=quant)


def quant_layers(model: torch.nn.Module) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and m.quantized}


# ----------------------------------------------------------------------------- packing


def test_check_values_of_formats_md() -> None:
    columns = torch.arange(1, 9).view(1, 8)
    assert int(pack_awq(columns)) & 0xFFFFFFFF == 0x86427531
    rows = torch.arange(1, 9).view(8, 1)
    assert int(pack_gptq_rows(rows, 4)) & 0xFFFFFFFF == 0x87654321
    assert int(pack_gptq_cols(columns, 4)) & 0xFFFFFFFF == 0x87654321
    assert unpack_awq(torch.tensor([[0x86427531 - 2**32]], dtype=torch.int32)).tolist() == [
        list(range(1, 9))
    ]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_round_trips(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (96, 40), generator=gen)
    packed = pack_gptq_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_gptq_rows(packed, bits, 96), q.int())
    assert torch.equal(read_stream(packed, bits, 96), q)  # the bit-by-bit reading agrees
    z = torch.randint(0, 2**bits, (3, 64), generator=gen)
    packed_z = pack_gptq_cols(z, bits)
    assert packed_z.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_gptq_cols(packed_z, bits, 64), z.int())


@pytest.mark.parametrize("bits", [3, 4])
def test_squeezellm_round_trips_as_gptq(bits: int) -> None:
    q = torch.randint(0, 2**bits, (64, 24), generator=torch.Generator().manual_seed(7))
    packed = pack_squeezellm(q, bits)
    assert torch.equal(packed, pack_gptq_rows(q, bits))
    assert torch.equal(unpack_squeezellm(packed, bits, 64), q.int())


def test_awq_round_trip() -> None:
    q = torch.randint(0, 16, (20, 48), generator=torch.Generator().manual_seed(3))
    packed = pack_awq(q)
    assert packed.shape == (20, 6) and packed.dtype == torch.int32
    assert torch.equal(unpack_awq(packed), q.int())
    assert torch.equal(read_awq(packed), q)


def _fields(word: int, lo: int, count: int) -> int:
    return (word >> lo) & ((1 << count) - 1)


def test_three_bit_layout_word_and_bit_positions() -> None:
    """Every value's bits where FORMATS.md puts them (values drawn so that all 8 occur)."""
    v = torch.randperm(32, generator=torch.Generator().manual_seed(5)) % 8
    words = [w & 0xFFFFFFFF for w in pack_gptq_rows(v.view(32, 1), 3).view(-1).tolist()]
    assert len(words) == 3
    w0, w1, w2 = words
    vals = v.tolist()
    for j in range(10):
        assert _fields(w0, 3 * j, 3) == vals[j]
        assert _fields(w1, 3 * j + 1, 3) == vals[11 + j]
        assert _fields(w2, 3 * j + 2, 3) == vals[22 + j]
    assert _fields(w0, 30, 2) == vals[10] & 3 and _fields(w1, 0, 1) == vals[10] >> 2
    assert _fields(w1, 31, 1) == vals[21] & 1 and _fields(w2, 0, 2) == vals[21] >> 1
    # and the same words built by hand from that description unpack to the values
    hand = [0, 0, 0]
    for j in range(10):
        hand[0] |= vals[j] << 3 * j
        hand[1] |= vals[11 + j] << (3 * j + 1)
        hand[2] |= vals[22 + j] << (3 * j + 2)
    hand[0] |= (vals[10] & 3) << 30
    hand[1] |= (vals[10] >> 2) | ((vals[21] & 1) << 31)
    hand[2] |= vals[21] >> 1
    assert hand == words
    as_int32 = torch.tensor([[h - 2**32 if h >= 2**31 else h] for h in hand], dtype=torch.int32)
    assert unpack_gptq_rows(as_int32, 3, 32).view(-1).tolist() == vals


@pytest.mark.parametrize("bits", [3, 4])
def test_v1_minus_one_spills_like_autogptq(bits: int) -> None:
    """A stored -1 is OR-ed in as 32 ones shifted to its field (AutoGPTQ's uint32 pack)."""
    gen = torch.Generator().manual_seed(bits)
    stored = torch.randint(0, 2**bits, (2, 32), generator=gen)
    stored[0, 3] = stored[1, 10] = -1  # 10: the 3-bit value that straddles words 0 and 1
    expected = [[0] * bits for _ in range(2)]
    for r in range(2):
        for j, value in enumerate(stored[r].tolist()):
            u = value & 0xFFFFFFFF
            word, shift = divmod(bits * j, 32)
            expected[r][word] |= (u << shift) & 0xFFFFFFFF
            if shift + bits > 32:
                expected[r][word + 1] |= (u >> (32 - shift)) & ((1 << (shift + bits - 32)) - 1)
    got = (pack_gptq_cols(stored, bits).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert got == expected
    read = unpack_gptq_cols(pack_gptq_cols(stored, bits), bits, 32)
    assert int(read[0, 3]) == 2**bits - 1  # mask; the loader then adds 1


def test_packers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"4-bit values must lie in \[0, 16\)"):
        pack_awq(torch.full((1, 8), 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(torch.zeros(1, 12, dtype=torch.int64) + 1)
    with pytest.raises(ValueError, match="multiple of 32 values"):
        pack_gptq_rows(torch.ones(16, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_gptq_rows(torch.ones(16, 4, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_gptq_rows(torch.full((16, 4), -1), 2)


def _autoawq_packing():
    """AutoAWQ's own ``awq/utils/packing_utils.py`` (torch only), loaded from its file: the
    package's ``__init__`` pulls in accelerate and more, which we do not install."""
    try:
        file = importlib.metadata.distribution("autoawq").locate_file("awq/utils/packing_utils.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq==0.2.9)")
    spec = importlib.util.spec_from_file_location("autoawq_packing_utils", str(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_awq_packing_against_autoawq() -> None:
    oracle = _autoawq_packing()
    gen = torch.Generator().manual_seed(11)
    q, z = (
        torch.randint(0, 16, (64, 32), generator=gen),
        torch.randint(0, 16, (2, 32), generator=gen),
    )
    iw, iz = oracle.reverse_awq_order(*oracle.unpack_awq(pack_awq(q), pack_awq(z), 4), 4)
    assert torch.equal((iw & 15).long(), q) and torch.equal((iz & 15).long(), z)
    scales = torch.rand(2, 32, generator=gen).half() + 0.01
    theirs = oracle.dequantize_gemm(pack_awq(q), pack_awq(z), scales, 4, 32)
    ours = (q - z.repeat_interleave(32, 0)).float() * scales.float().repeat_interleave(32, 0)
    assert torch.equal(theirs, ours.half())


# ----------------------------------------------------------------------------- loaders

BIG = (("hidden_size", 128), ("intermediate_size", 256))  # K = 128 / 256 for group 128
EXACT = {
    "awq-g32": QuantSpec("awq", group_size=32),
    "awq-g64-quant_config": QuantSpec("awq", group_size=64, where="side", seed=1),
    "awq-g128": QuantSpec("awq", group_size=128, model_kw=BIG, seed=2),
    "awq-no-zero-point": QuantSpec("awq", group_size=32, zero_point=False, seed=3),
    "gptq-4bit-sym-v1": QuantSpec("gptq", sym=True, where="side", seed=4),
    "gptq-4bit-asym-v1": QuantSpec("gptq", group_size=-1, seed=5),  # -1 corner: zeros 0
    "gptq-2bit-asym-v2": QuantSpec("gptq", bits=2, checkpoint_format="gptq_v2", seed=6),
    "gptq-3bit-asym-v1-act-order": QuantSpec("gptq", bits=3, g_idx="act-order", seed=7),
    "gptq-3bit-sym-v2": QuantSpec("gptq", bits=3, sym=True, checkpoint_format="gptq_v2", seed=8),
    "gptq-8bit-sym-act-order": QuantSpec(
        "gptq", bits=8, group_size=64, sym=True, g_idx="act-order", seed=9
    ),
    "gptq-4bit-g48-v2": QuantSpec("gptq", group_size=48, checkpoint_format="gptq_v2", seed=10),
    "gptq-4bit-scattered-g_idx": QuantSpec("gptq", g_idx="scattered", seed=11),
    "gptq-4bit-qwen2-bias": QuantSpec("gptq", arch="qwen2", g_idx="act-order", seed=12),
    "squeezellm-4bit": QuantSpec("squeezellm", bits=4, seed=13),
    "squeezellm-3bit": QuantSpec("squeezellm", bits=3, seed=14),
}


@pytest.mark.parametrize("case", sorted(EXACT))
@torch.inference_mode()
def test_runtime_weights_equal_the_formula(ckpts: QuantCheckpoints, case: str, caplog) -> None:
    spec = EXACT[case]
    path = ckpts(spec)
    log_once._LOGGED.discard("gptq-g_idx")  # the fallback warns once per process
    with caplog.at_level(logging.WARNING):
        model = load_quantized(path)
    layers = quant_layers(model)
    packed = sorted(n.removesuffix(".qweight") for n in _file(path) if n.endswith(".qweight"))
    assert sorted(layers) == packed and len(packed) == 14
    zeros_seen, kinds = [], set()
    for prefix, layer in layers.items():
        t = layer_tensors(path, prefix)
        ref = reference_weight(spec, t, layer.in_features, layer.out_features)
        got = layer.quant_method.dequantize(layer)
        assert got.dtype == torch.float32 and torch.equal(got, ref), prefix
        kind = _g_idx_kind(t.get("g_idx"), layer.in_features, spec.group_size)
        kinds.add(kind)
        # float32 on the CPU: every layer dequantized once at load, in checkpoint order
        # (engine.quantization.cpu_bind); the packed layouts are checked on bf16 in
        # tests/test_cpu_quant_kernels.py
        assert layer.quant_method.cpu_kind == "dense", prefix
        assert getattr(layer, "perm", None) is None and layer.dense_weight.dtype == torch.float32, prefix
        if "bias" in t:
            assert torch.equal(layer.bias, t["bias"].float())
        x = torch.randn(5, layer.in_features)
        expected = x @ ref + (t["bias"].float() if "bias" in t else 0)
        y = layer(x)
        assert y.dtype == x.dtype
        assert float((y - expected).norm() / expected.norm()) < 1e-5, prefix
        if spec.method == "gptq":
            zeros_seen.append(read_stream(t["qzeros"].t(), spec.bits, layer.out_features))
    if case == "gptq-4bit-asym-v1":  # the corner happened, and read as "mask, then add 1"
        assert any(bool((z == 15).any()) for z in zeros_seen)
    assert spec.g_idx in kinds  # each case's layout occurred (group 64 on K = 64 is natural)
    assert ("does not sort into groups" in caplog.text) == (spec.g_idx == "scattered")


def _g_idx_kind(g_idx: torch.Tensor | None, k: int, group_size: int) -> str:
    natural = torch.arange(k) // (k if group_size == -1 else group_size)
    if g_idx is None or torch.equal(g_idx.long(), natural):
        return "natural"
    return "act-order" if torch.equal(g_idx.long().sort().values, natural) else "scattered"


def _dequantized_copy(spec: QuantSpec, path: Path, model: torch.nn.Module, dest: Path) -> Path:
    """The plain fp32 checkpoint whose weights are the quantized model's, by the formula."""
    dest.mkdir()
    for name in CONFIG_FILES:
        if (path / name).is_file():
            shutil.copy(path / name, dest / name)
    config = json.loads((dest / "config.json").read_text())
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config))
    layers = quant_layers(model)
    plain = {n: t for n, t in _file(path).items() if n.rpartition(".")[0] not in layers}
    for prefix, layer in layers.items():
        t = layer_tensors(path, prefix)
        plain[f"{prefix}.weight"] = reference_weight(
            spec, t, layer.in_features, layer.out_features
        ).t()
        if "bias" in t:
            plain[f"{prefix}.bias"] = t["bias"]
    save_file({n: t.contiguous() for n, t in plain.items()}, dest / "model.safetensors")
    return dest


LOGIT_ATOL = 1e-4  # fp32 both ways; only the summation order differs (x @ W vs F.linear)


@pytest.mark.parametrize(
    "case", ["awq-g32", "gptq-3bit-asym-v1-act-order", "gptq-4bit-qwen2-bias", "squeezellm-3bit"]
)
@torch.inference_mode()
def test_logits_match_the_dequantized_fp32_model(
    ckpts: QuantCheckpoints, case: str, tmp_path: Path
) -> None:
    spec = EXACT[case]
    path = ckpts(spec)
    quantized = load_quantized(path)
    plain = load_model(
        _dequantized_copy(spec, path, quantized, tmp_path / "plain"), torch.float32, "cpu"
    )
    prompt = torch.randint(
        0, quantized.config.vocab_size, (11,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    got = _step(quantized, _Batch(quantized, 1), [0], [prompt])[0]
    expected = _step(plain, _Batch(plain, 1), [0], [prompt])[0]
    assert expected.std() > 0.1  # spread-out logits, not a degenerate model
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)


# ----------------------------------------------------------------------------- configs


def test_awq_config_spellings_agree() -> None:
    new = AWQConfig.from_checkpoint(
        {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 128,
            "zero_point": True,
            "version": "gemm",
        },
        "config.json",
        {},
    )
    old = AWQConfig.from_checkpoint(
        {"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMM"},
        "quant_config.json",
        {},
    )
    assert (new.group_size, new.zero_point) == (old.group_size, old.zero_point) == (128, True)
    assert new.describe() == "awq 4-bit, group 128"


def test_awq_modules_to_not_convert() -> None:
    raw = {"bits": 4, "group_size": 64, "zero_point": False, "modules_to_not_convert": ["mlp.down"]}
    cfg = AWQConfig.from_checkpoint(raw, "config.json", {})
    assert cfg.describe() == "awq 4-bit, group 64, no zero point"
    assert cfg.quantizes("model.layers.0.mlp.up_proj")
    assert not cfg.quantizes("model.layers.3.mlp.down_proj") and not cfg.quantizes("lm_head")


def test_gptq_config_defaults_and_describe(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = GPTQConfig.from_checkpoint(
            {"bits": 4, "group_size": 128, "desc_act": True}, "quantize_config.json", {}
        )
    assert "no 'sym'" in caplog.text and cfg.sym is True and cfg.checkpoint_format == "gptq"
    assert cfg.describe() == "gptq 4-bit, group 128, act-order, sym"
    v2 = GPTQConfig.from_checkpoint(
        {"bits": 3, "group_size": -1, "sym": False, "checkpoint_format": "gptq_v2"}, "c", {}
    )
    assert v2.describe() == "gptq 3-bit, one group, asym, gptq_v2"
    assert SqueezeLLMConfig.from_checkpoint({"wbits": 3}, "q", {}).describe() == "squeezellm 3-bit"


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (
            AWQConfig,
            {"bits": 3, "group_size": 128},
            r"src\.json: 'bits' is 3; AWQ checkpoints are 4-bit only",
        ),
        (AWQConfig, {"w_bit": 8, "q_group_size": 128}, r"'w_bit' is 8"),
        (
            AWQConfig,
            {"bits": 4, "group_size": 128, "version": "gemv"},
            r"src\.json: AWQ 'version' 'gemv' is not supported",
        ),
        (  # transformers 5 and GPTQModel name the layout 'format'
            AWQConfig,
            {"bits": 4, "group_size": 128, "format": "gemv_fast"},
            r"src\.json: AWQ 'format' 'gemv_fast' is not supported",
        ),
        (AWQConfig, {"bits": 4}, r"src\.json: missing 'group_size' or 'q_group_size'"),
        (AWQConfig, {"bits": 4, "group_size": 0}, r"'group_size' must be a positive group size"),
        (
            GPTQConfig,
            {"bits": 5, "group_size": 128},
            r"src\.json: 'bits' is 5; GPTQ .* 2, 3, 4 or 8",
        ),
        (GPTQConfig, {"bits": "4", "group_size": 128}, r"'bits' must be an integer"),
        (
            GPTQConfig,
            {"bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
            r"'checkpoint_format' 'marlin'",
        ),
        (
            GPTQConfig,
            {"bits": 4, "group_size": 128, "desc_act": "yes"},
            r"'desc_act' must be true or false",
        ),
        (
            SqueezeLLMConfig,
            {"wbits": 2},
            r"src\.json: 'wbits' is 2; SqueezeLLM checkpoints are 3- or 4-bit",
        ),
    ],
)
def test_bad_configs_name_key_and_file(cls, raw: dict, message: str) -> None:
    with pytest.raises(QuantFormatError, match=message):
        cls.from_checkpoint(raw, "src.json", {})


@pytest.mark.parametrize("cls", [AWQConfig, GPTQConfig, SqueezeLLMConfig])
def test_no_load_time_quantization(cls) -> None:
    with pytest.raises(QuantFormatError, match="cannot quantize a plain model at load time"):
        cls.from_checkpoint(None, "model", {})


def _edit_config(path: Path, **changes) -> None:
    for fname in ("quantize_config.json", "quant_config.json"):
        if (path / fname).is_file():
            raw = json.loads((path / fname).read_text())
            raw.update(changes)
            (path / fname).write_text(json.dumps(raw))
            return
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, path / "model.safetensors")


def test_wrong_bits_in_the_config_file(ckpts: QuantCheckpoints, tmp_path: Path) -> None:
    path = ckpts.copy(EXACT["gptq-4bit-sym-v1"], tmp_path / "c")
    _edit_config(path, bits=6)
    with pytest.raises(QuantFormatError, match=r"quantize_config\.json: 'bits' is 6"):
        load_quantized(path)


def test_awq_group_not_dividing_in_features(ckpts: QuantCheckpoints, tmp_path: Path) -> None:
    path = ckpts.copy(EXACT["awq-g32"], tmp_path / "c")
    _edit_config(path, group_size=48)
    with pytest.raises(
        QuantFormatError,
        match=r"\(awq 4-bit, group 48\): model\.layers\.0\.self_attn\.q_proj: in_features 64 is not a multiple of the AWQ group size 48 \(.*config\.json\)",
    ):
        load_quantized(path)


@pytest.mark.parametrize(
    ("case", "tensor"),
    [
        ("awq-g32", "qzeros"),
        ("awq-g32", "scales"),
        ("gptq-3bit-asym-v1-act-order", "g_idx"),
        ("squeezellm-4bit", "lookup_table"),
    ],
)
def test_missing_tensor_is_named(
    ckpts: QuantCheckpoints, tmp_path: Path, case: str, tensor: str
) -> None:
    path = ckpts.copy(EXACT[case], tmp_path / "c")
    _drop_tensor(path, f"model.layers.1.mlp.up_proj.{tensor}")
    with pytest.raises(
        QuantFormatError, match=rf"missing tensor 'model\.layers\.1\.mlp\.up_proj\.{tensor}'"
    ):
        load_quantized(path)


def test_mis_shaped_tensor_is_named(ckpts: QuantCheckpoints, tmp_path: Path) -> None:
    path = ckpts.copy(EXACT["gptq-2bit-asym-v2"], tmp_path / "c")
    _edit_config(path, group_size=64)  # tensors were written for group 32
    with pytest.raises(
        QuantFormatError,
        match=r"tensor 'model\.layers\.0\.\w+\.\w+_proj\.qzeros' has shape \[2, \d+\], but the config implies \[1, \d+\]",
    ):
        load_quantized(path)


def test_gemv_checkpoint_is_rejected(ckpts: QuantCheckpoints, tmp_path: Path) -> None:
    path = ckpts.copy(EXACT["awq-g64-quant_config"], tmp_path / "c")
    _edit_config(path, version="GEMV")
    with pytest.raises(
        QuantFormatError, match=r"quant_config\.json: AWQ 'version' 'GEMV' is not supported"
    ):
        load_quantized(path)


def test_g_idx_out_of_range_is_named(ckpts: QuantCheckpoints, tmp_path: Path) -> None:
    path = ckpts.copy(EXACT["gptq-4bit-sym-v1"], tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.g_idx"][3] = 9
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        QuantFormatError,
        match=r"'model\.layers\.0\.self_attn\.o_proj\.g_idx' holds groups 0\.\.9, but the config implies 2 groups",
    ):
        load_quantized(path)


def test_awq_flag_on_a_gptq_checkpoint(ckpts: QuantCheckpoints) -> None:
    with pytest.raises(
        QuantFormatError,
        match=r"--quantization awq contradicts the checkpoint: .*quantize_config\.json says it is gptq-quantized",
    ):
        load_quantized(ckpts(EXACT["gptq-4bit-sym-v1"]), flag="awq")


# ----------------------------------------------------------------------------- GPU kernels

GPU_CASES = [
    "awq-g32",
    "gptq-2bit-asym-v2",
    "gptq-3bit-asym-v1-act-order",
    "gptq-8bit-sym-act-order",
    "gptq-4bit-qwen2-bias",
    "squeezellm-3bit",
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES)
@torch.inference_mode()
def test_kernels_on_loaded_layers_gpu(ckpts: QuantCheckpoints, case: str) -> None:
    """fp16 model on CUDA: the Triton GEMMs on the repacked layers against the formula."""
    spec = EXACT[case]
    path = ckpts(spec)
    quant = resolve(None, path, ModelConfig.from_pretrained(path).quantization_config, {})
    model = load_model(path, torch.float16, "cuda", quant=quant)
    for prefix, layer in quant_layers(model).items():
        t = layer_tensors(path, prefix)
        if "lookup_table" in t:  # the fp32 table runs in the model dtype
            t["lookup_table"] = t["lookup_table"].half()
        ref = reference_weight(spec, t, layer.in_features, layer.out_features).cuda()
        assert torch.equal(layer.quant_method.dequantize(layer), ref), prefix  # fp16 scales: exact
        for m in (1, 7, 64):
            x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.float16)
            expected = x.float() @ ref + (t["bias"].float().cuda() if "bias" in t else 0)
            y = layer(x)
            assert y.dtype == torch.float16 and not y.isnan().any()
            assert float((y.float() - expected).norm() / expected.norm()) < 1e-3, (prefix, m)
