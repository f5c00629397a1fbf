"""GGUF checkpoints: read (every supported tensor type), served, written, and checked against
the ``gguf`` package (its dequantization, its reader), transformers (``gguf_file=``) and
llama.cpp (llama-cpp-python).

The Triton path runs in the interpreter: ``tests/gguf_interp.py``, in a child process.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.api import EngineConfig, SamplingParams
from engine.gguf import is_gguf_path
from engine.gguf.linear import GGUFLinearMethod
from engine.gguf.load import load_gguf_model
from engine.gguf.mapping import GGUFArchitectureError
from engine.gguf.reader import GGUFCheckpoint
from engine.gguf.types import GROUP_TYPES, GGUFTypeError, to_group_affine
from engine.gguf.writer import write_gguf
from engine.model_source import ModelSourceError, resolve_model
from tests.checkpoints import tiny_checkpoint, tiny_variant
from tests.gguf_files import FILES, gguf_file, random_k_blocks

Q = gguf.GGMLQuantizationType
PROMPTS = [[5, 17, 99, 3, 250, 7], [300, 12, 44], [1, 33, 128, 9, 9, 61, 2, 400]]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gguf")
    return lambda layout: gguf_file(root, layout)


def _fp16_fields(qtype: Q, blocks: np.ndarray, rng: np.random.Generator) -> None:
    """Put finite fp16 values where the block type keeps its fp16 scales (random bytes could
    be NaN there)."""
    at = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for offset in at[qtype]:
        values = rng.standard_normal((blocks.shape[0], 1)) * 0.05
        blocks[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8)


# -- tensor types ------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(GROUP_TYPES), ids=lambda t: Q(t).name)
def test_block_types_equal_gguf_dequantize_exactly(qtype: int) -> None:
    """Random blocks (every bit pattern of values, scales and mins) -> q * scale + min equals
    gguf.quants.dequantize exactly (a zero may differ in sign only: 8d - 8d is +0.0 where
    ggml's d * 0 is -0.0 for a negative d)."""
    rng = np.random.default_rng(int(qtype))
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n, k = 7, 512
    raw = rng.integers(0, 256, size=(n, k // block * nbytes), dtype=np.uint8)
    _fp16_fields(Q(qtype), raw.reshape(-1, nbytes), rng)
    ours = to_group_affine(raw, qtype, (n, k), "t").dequantize().numpy()
    ref = gguf.quants.dequantize(raw, Q(qtype))
    assert ref.dtype == np.float32 and np.isfinite(ref).all()
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_quantized_by_gguf_reads_back_exactly(qtype: Q) -> None:
    w = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    ga = to_group_affine(raw, qtype, w.shape, "t")
    assert torch.equal(ga.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, qtype)))
    assert ga.q.dtype == torch.uint8 and int(ga.q.max()) < 2**ga.bits


def test_k_quant_fields_are_what_gguf_reads() -> None:
    """The test files' hand-built K-quant blocks dequantize (gguf's reading) to values of the
    size asked for: the fixture is a sensible model, not noise of any size."""
    rng = np.random.default_rng(0)
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w = gguf.quants.dequantize(random_k_blocks(qtype, 8, 512, rng, 0.05), qtype)
        assert w.shape == (8, 512) and 0.01 < np.abs(w).mean() < 0.2


def test_an_unsupported_tensor_type_is_a_clear_error(tmp_path: Path) -> None:
    def encode(name: str, values: np.ndarray):
        if values.ndim == 1:
            return values.astype(np.float32), Q.F32
        return gguf.quants.quantize(values, Q.Q5_0), Q.Q5_0

    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "q5_0.gguf", encode=encode)
    with pytest.raises(GGUFTypeError, match=r"GGUF tensor '[\w.]+' has type Q5_0, which this engine does not read; supported: F32"):
        GGUFCheckpoint(path)


def test_an_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFArchitectureError, match=r"architecture 'gemma' is not supported; supported: llama"):
        GGUFCheckpoint(path)


# -- loading -----------------------------------------------------------------------------------


def _transformers(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", list(FILES))
def test_loaded_weights_equal_transformers_dequantization(layout: str, files) -> None:
    """Every weight we hold (plain, or q * scale + min of a quantized layer) equals the one
    transformers loads from the same file (gguf.quants.dequantize, Q/K rows un-permuted)."""
    path = files(layout)
    model, quant = load_gguf_model(path, torch.float32, "cpu")
    reference = _transformers(path).state_dict()
    quantized = {n: m for n, m in model.named_modules() if getattr(m, "quantized", False)}
    assert bool(quantized) == (layout not in ("F32", "F16", "BF16"))
    for name, layer in quantized.items():
        assert torch.equal(layer.quant_method.dequantize(layer).t(), reference[f"{name}.weight"]), name
    for name, param in model.named_parameters():
        assert torch.equal(param, reference[name]), name


def _our_greedy(path: Path, tokens: int, **config: int) -> list:
    """Our engine's greedy results for PROMPTS on the model at ``path``, on the CPU in
    float32 (the exact mode; ``auto`` picks bf16 kernels for block-quantized files)."""
    from engine import create_engine

    engine = create_engine(EngineConfig(model_path=str(path), device="cpu", dtype="float32", **config))
    try:
        return engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=tokens,
                                                       ignore_eos=True))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_greedy_tokens_equal_transformers_on_the_same_gguf(layout: str, files) -> None:
    path = files(layout)
    results = _our_greedy(path, 12, num_kv_blocks=64, max_model_len=256)
    reference = _transformers(path)
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = torch.tensor([prompt])
        expected = reference.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert result.token_ids == expected[0, len(prompt):].tolist(), layout


def test_served_quantization_and_config_come_from_the_file(files) -> None:
    ck = GGUFCheckpoint(files("Q4_K_M"))
    config = ck.model_config()
    assert (config.architecture, config.hidden_size, config.head_dim) == ("LlamaForCausalLM", 256, 64)
    assert config.torch_dtype == "float16"
    tok = ck.hf_tokenizer()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    _, quant = load_gguf_model(ck, torch.float32, "cpu")
    assert quant is not None and quant.describe() == "gguf Q4_K x10, Q6_K x5"  # 2 layers x 7 + head


def test_auto_dtype_on_the_cpu_is_bf16_for_block_quantized_files(files) -> None:
    from engine.device import cpu_has_bf16_kernels
    from engine.gguf.load import load_gguf_for

    blocks = load_gguf_for(EngineConfig(model_path=str(files("Q4_0")), device="cpu"))
    plain = load_gguf_for(EngineConfig(model_path=str(files("F16")), device="cpu"))
    assert blocks.dtype == (torch.bfloat16 if cpu_has_bf16_kernels() else torch.float32)
    assert plain.dtype == torch.float32


def test_qwen3_head_dim_comes_from_the_file(tmp_path: Path) -> None:
    """transformers' qwen3 mapping drops attention.key_length (its config says 128); ours reads it."""
    path = write_gguf(tiny_checkpoint("qwen3"), tmp_path / "qwen3.gguf", "F32")
    assert GGUFCheckpoint(path).model_config().head_dim == 32


def test_cpu_paths_are_bound_once_at_load(files, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU no GGUF layer dequantizes its weight per call (engine.gguf.cpu): float32
    loads dequantize once (exactly gguf's values); bfloat16 loads of 4-bit fields run
    torch's int4 kernel on (q, scale, min) as stored, 8-bit fields (Q8_0) the same kernel on
    their two nibbles; the kernel's buffers replace the group-affine ones."""
    from engine.gguf.linear import GGUFLinearMethod

    exact, _ = load_gguf_model(files("Q4_1"), torch.float32, "cpu")
    up = exact.model.layers[0].mlp.up_proj
    assert up.quant_method.dense and up.dense_weight.dtype == torch.float32
    x = torch.randn(3, up.in_features)
    assert torch.allclose(up(x), x @ up.quant_method.dequantize(up), atol=1e-5)
    fast, _ = load_gguf_model(files("Q4_1"), torch.bfloat16, "cpu")
    layer = fast.model.layers[0].mlp.up_proj
    assert layer.quant_method.cpu_kernel is not None and not layer.quant_method.dense
    assert not hasattr(layer, "qweight") and layer.cpu_qweight_0.dtype == torch.uint8  # held once
    weight = layer.quant_method.dequantize(layer)  # as the kernel holds them: bf16 scales
    exact_weight = up.quant_method.dequantize(up)
    assert (weight - exact_weight).abs().max() <= 2**-8 * exact_weight.abs().max()

    def no_per_call_dequantize(self, layer):  # type: ignore[no-untyped-def]
        raise AssertionError("the whole weight was dequantized in a forward")

    with monkeypatch.context() as patch:
        patch.setattr(GGUFLinearMethod, "dequantize", no_per_call_dequantize)
        y = layer(x.bfloat16()).float()
    reference = x.bfloat16().float() @ weight
    assert (y - reference).norm() / reference.norm() < 8e-3  # bf16 compute, as the int4 tests
    eight_bit, _ = load_gguf_model(files("Q8_0"), torch.bfloat16, "cpu")
    exact8, _ = load_gguf_model(files("Q8_0"), torch.float32, "cpu")
    pair, dense = eight_bit.model.layers[0].mlp.up_proj, exact8.model.layers[0].mlp.up_proj
    assert pair.quant_method.cpu_kernel.pair is not None and not pair.quant_method.dense
    reference = x.bfloat16().float() @ dense.quant_method.dequantize(dense)
    y = pair(x.bfloat16()).float()
    assert (y - reference).norm() / reference.norm() < 8e-3


@torch.inference_mode()
def test_a_tied_head_multiplies_the_embedding_blocks_on_a_half_precision_cpu(files) -> None:
    """qwen2's head is tied to a Q8_0 token embedding: served in bf16 on the CPU it reads the
    embedding's blocks (two int4 products) for a few rows and the dequantized table for more;
    float32 keeps the plain tie, exactly gguf's values."""
    from engine.gguf.cpu import PAIR_MAX_ROWS

    exact, _ = load_gguf_model(files("Q4_0"), torch.float32, "cpu")
    assert exact.config.tie_word_embeddings and exact.lm_head.weight is exact.model.embed_tokens.weight
    fast, quant = load_gguf_model(files("Q4_0"), torch.bfloat16, "cpu")
    head = fast.lm_head
    assert quant is not None and "lm_head" in quant.layer_types and head.quantized
    assert head.quant_method.cpu_kernel.pair is not None and not hasattr(head, "weight")
    table = exact.model.embed_tokens.weight  # [vocab, hidden] float32
    for rows in (1, PAIR_MAX_ROWS, PAIR_MAX_ROWS + 4):
        x = torch.randn(rows, table.shape[1]).bfloat16()
        reference = x.float() @ table.t()
        y = fast.compute_logits(x)
        assert y.dtype == torch.float32 and (y - reference).norm() / reference.norm() < 8e-3


def test_triton_int_gemm_in_interpreter(run_in_triton_interpreter) -> None:
    run_in_triton_interpreter("gguf_interp.py")


# -- where the model comes from ----------------------------------------------------------------


def test_model_source_accepts_a_gguf_file_or_a_folder_with_one(files, tmp_path: Path) -> None:
    path = files("Q8_0")
    assert resolve_model(str(path)) == path.resolve() and is_gguf_path(path)
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(path)
    assert resolve_model(str(folder)) == path.resolve()  # the link, followed
    (folder / "other.gguf").symlink_to(path)
    with pytest.raises(ModelSourceError, match="holds 2 GGUF files"):
        resolve_model(str(folder))
    split = tmp_path / "m-00001-of-00002.gguf"
    split.symlink_to(path)
    with pytest.raises(ModelSourceError, match="split GGUF"):
        resolve_model(str(split))
    text = tmp_path / "m.txt"
    text.write_text("x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_model(str(text))


def test_quantization_flag_on_a_gguf_is_refused(files) -> None:
    from engine import create_engine

    with pytest.raises(ValueError, match="carries its own quantization"):
        create_engine(EngineConfig(model_path=str(files("Q8_0")), device="cpu", quantization="awq"))


# -- writing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0", "F16", "F32"])
def test_writer_round_trip(file_type: str, tmp_path: Path) -> None:
    """What the gguf package reads back is what we meant to write: each tensor's stored data
    equals gguf's own encoding of the source tensor (Llama Q/K rows in llama.cpp's order),
    and the metadata llama.cpp needs is there."""
    from engine.gguf.mapping import permute_rows
    from engine.loader import load_model

    src = tiny_checkpoint("llama")
    path = write_gguf(src, tmp_path / "m.gguf", file_type)
    reader = gguf.GGUFReader(path)
    source = {n: p.detach().numpy() for n, p in load_model(src, torch.float32, "cpu").named_parameters()}
    expected_types = {"Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "F16": Q.F16, "F32": Q.F32}[file_type]
    pairs = {"blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", 4),
             "blk.1.attn_k.weight": ("model.layers.1.self_attn.k_proj.weight", 2),
             "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj.weight", None),
             "output.weight": ("lm_head.weight", None),
             "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", None)}
    tensors = {t.name: t for t in reader.tensors}
    for gname, (name, heads) in pairs.items():
        values = source[name] if heads is None else permute_rows(source[name], heads)
        t = tensors[gname]
        if values.ndim == 1:
            assert t.tensor_type == Q.F32 and np.array_equal(np.asarray(t.data), values)
            continue
        qtype = Q.Q8_0 if gname == "output.weight" and file_type == "Q4_0" else expected_types
        assert t.tensor_type == qtype, gname
        stored = np.asarray(t.data)
        assert np.array_equal(stored.reshape(-1), gguf.quants.quantize(values, qtype).reshape(-1)), gname
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.embedding_length")) == (2, 4, 2, 64)
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == 512
    assert "<|im_start|>" in field("tokenizer.chat_template")
    assert field("tokenizer.ggml.eos_token_id") == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_written_f32_gguf_gives_transformers_the_original_logits(arch: str, tmp_path: Path) -> None:
    """transformers, reading our file with its own GGUF code, gets the source model back
    exactly: names, Q/K permutation and hyperparameters are what llama.cpp's converter writes."""
    src = tiny_checkpoint(arch)
    path = write_gguf(src, tmp_path / "m.gguf", "F32")
    ids = torch.tensor([PROMPTS[2]])
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    assert torch.equal(_transformers(path)(ids).logits, original(ids).logits)


def test_quantize_command_writes_gguf(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.quantize.__main__ import main

    out = tmp_path / "m.gguf"
    assert main(["--model", str(tiny_checkpoint("qwen2")), "--output", str(out), "--method", "gguf",
                 "--gguf_type", "Q4_0"]) == 0
    assert GGUFCheckpoint(out).describe_types().startswith("Q4_0 x 14")
    assert main(["--model", str(tiny_checkpoint("qwen2")), "--output", str(tmp_path / "x.gguf"),
                 "--method", "gguf", "--gguf_type", "Q2_K"]) == 2
    assert "GGUF type 'Q2_K' is not written" in capsys.readouterr().err


@torch.inference_mode()
def test_llama3_rope_scaling_goes_through_a_rope_freqs_tensor(tmp_path: Path) -> None:
    """Llama 3.1 rope scaling is written as llama.cpp's converter writes it (one divisor per
    frequency pair in ``rope_freqs``) and read back as those divisors: the GGUF's logits at
    positions where the scaling matters equal the HF checkpoint's, and differ without it."""
    from engine.config import RopeConfig
    from engine.gguf.writer import rope_freq_factors
    from engine.kv_cache import PagedKVCache
    from engine.layers.attention import AttentionMetadata
    from engine.layers.rotary import inv_frequencies
    from engine.loader import load_model

    src = tiny_variant("llama3-rope")
    ck = GGUFCheckpoint(write_gguf(src, tmp_path / "l3.gguf", "F32"))
    assert "rope_freqs.weight" in ck.tensors
    rope = ck.model_config().rope
    assert rope.rope_type == "freq_factors"
    factors = np.array(rope.freq_factors)
    hf_model = load_model(src, torch.float32, "cpu")
    assert np.allclose(factors, rope_freq_factors(hf_model.config)) and factors.max() > 1
    gguf_model, _ = load_gguf_model(ck, torch.float32, "cpu")
    ids, positions = torch.tensor([3, 17, 5, 250, 9, 41, 7, 8]), torch.arange(8) + 3000

    def logits(model: torch.nn.Module, inv_freq: torch.Tensor | None = None) -> torch.Tensor:
        if inv_freq is not None:
            model.model.rotary_emb.inv_freq = inv_freq
            model.model.rotary_emb._tables.clear()
        kv = PagedKVCache(model.config.num_layers, 1, 16, model.config.num_kv_heads,
                          model.config.head_dim, torch.float32, "cpu")
        kv.bind(model)
        return model.compute_logits(model(ids, positions, AttentionMetadata.build([8], [8], [[0]], 16, "cpu")))

    ref = logits(hf_model)
    assert (logits(gguf_model) - ref).abs().max() <= 1e-5 * ref.abs().max()
    unscaled = logits(gguf_model, inv_frequencies(hf_model.config.head_dim, RopeConfig(theta=rope.theta)))
    assert (unscaled - ref).abs().max() > 1e-3 * ref.abs().max()


def _llama_cpp(path: Path, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, logits_all=logits_all)


@pytest.mark.parametrize("variant", ["llama", "llama3-rope"])
def test_llama_cpp_generates_our_greedy_tokens_on_our_file(variant: str, tmp_path: Path) -> None:
    """llama.cpp (llama-cpp-python, built from source) loads the F32 file we wrote and picks
    the same greedy tokens as our engine on it: names, Q/K row order, hyperparameters, the
    tokenizer table and (Llama 3.1 scaling) the rope_freqs tensor are what llama.cpp expects."""
    src = tiny_checkpoint("llama") if variant == "llama" else tiny_variant(variant)
    path = write_gguf(src, tmp_path / "m.gguf", "F32")
    ours = _our_greedy(path, 8, num_kv_blocks=32, max_model_len=128)
    llm = _llama_cpp(path)
    for prompt, result in zip(PROMPTS, ours, strict=True):
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            theirs.append(token)
            if len(theirs) == 8:
                break
        assert theirs == result.token_ids


@pytest.mark.parametrize(("arch", "file_type"), [("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2", "Q8_0")])
def test_llama_cpp_reads_our_quantized_file_as_transformers_does(arch: str, file_type: str,
                                                                 tmp_path: Path) -> None:
    """llama.cpp's logits on our Q8_0/Q4_0 file agree with transformers' (which dequantizes the
    same blocks) within what llama.cpp's 8-bit activations cost on a tiny random model (it
    multiplies Q8_0-quantized activations: ~1-2% of the largest logit here), and pick the same
    top token wherever the top two are further apart than that."""
    path = write_gguf(tiny_checkpoint(arch), tmp_path / "m.gguf", file_type)
    llm = _llama_cpp(path, logits_all=True)
    reference = _transformers(path)
    compared = 0
    for prompt in PROMPTS:
        llm.reset()
        llm.eval(prompt)
        theirs = torch.tensor(np.array(llm.scores[: len(prompt)]))
        ours = reference(torch.tensor([prompt])).logits[0].detach()
        tolerance = 0.03 * ours.abs().max()  # 8-bit activations (a wrong row order: ~100%)
        assert (theirs - ours).abs().max() < tolerance
        top2 = ours.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
        assert torch.equal(theirs.argmax(-1)[clear], ours.argmax(-1)[clear])
        compared += int(clear.sum())
    assert compared >= 3


def test_runtime_int_gemm_buffers_on_the_cpu(files) -> None:
    """The GPU layout (zeros = -min / scale in the model dtype) on the CPU: Q4_0/Q8_0 are exact
    (integer zeros); the float zeros of Q4_1/K-quants stay within float32 rounding."""
    for layout, exact in (("Q4_0", True), ("Q8_0", True), ("Q4_1", False), ("Q4_K_M", False)):
        path = files(layout)
        ref, _ = load_gguf_model(path, torch.float32, "cpu", runtime="affine")
        gpu, _ = load_gguf_model(path, torch.float32, "cpu", runtime="int_gemm")
        for name, layer in gpu.named_modules():
            if isinstance(getattr(layer, "quant_method", None), GGUFLinearMethod):
                w = layer.quant_method.dequantize(layer)
                r = ref.get_submodule(name).quant_method.dequantize(ref.get_submodule(name))
                if exact:
                    assert torch.equal(w, r), (layout, name)
                else:
                    assert (w - r).abs().max() <= 2e-6 * r.abs().max(), (layout, name)


def test_a_constant_sub_block_is_dequantized_for_the_gpu_layout() -> None:
    """A K-quant sub-block with scale 0 and a nonzero min is one constant value; (q - zero) *
    scale cannot hold it, so the layer is dequantized once, still equal to gguf's values."""
    from engine.layers.linear import Linear
    from engine.quantization.base import TensorSet

    rng = np.random.default_rng(3)
    raw = random_k_blocks(Q.Q4_K, 8, 256, rng, 0.05)
    raw[0, 4] &= 0xC0  # sub-block 0 of row 0: 6-bit scale 0
    raw[0, 8] |= 0x01  # ... and a nonzero min
    ga = to_group_affine(raw, Q.Q4_K, (8, 256), "w")
    assert ga.scales[0, 0] == 0 and ga.mins[0, 0] != 0
    layer = Linear(256, 8, quant_method=GGUFLinearMethod(int(Q.Q4_K), runtime="int_gemm"))
    layer.quant_method.load(layer, TensorSet("w", {"q": ga.q, "scales": ga.scales, "mins": ga.mins}),
                            torch.device("cpu"), torch.float32)
    assert layer.quant_method.dense and not layer.quant_method.int_gemm
    reference = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K))
    assert torch.equal(layer.quant_method.dequantize(layer).t(), reference)
    x = torch.randn(2, 256)
    assert torch.allclose(layer(x), x @ reference.t(), atol=1e-5)


# -- on a real GPU (bench/gpu_all.sh runs the gpu-marked tests; CI has no GPU) -----------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 16])
def test_gguf_layers_on_a_gpu(qtype: Q, m: int) -> None:
    """A 7B-sized GGUF layer loaded for CUDA (Triton int_gemm, or dense for a constant
    sub-block) against gguf's own dequantization, fp16."""
    from engine.layers.linear import Linear
    from engine.quantization.base import TensorSet

    n, k = 4096, 4096
    rng = np.random.default_rng(int(qtype) + m)
    raw = (random_k_blocks(qtype, n, k, rng, 0.05) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else
           gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype))
    ga = to_group_affine(raw, qtype, (n, k), "w")
    layer = Linear(k, n, bias=False, quant_method=GGUFLinearMethod(int(qtype)))
    layer.quant_method.load(layer, TensorSet("w", {"q": ga.q, "scales": ga.scales,
                                                   "mins": ga.mins}),
                            torch.device("cuda"), torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).cuda().float()  # [N, K]
    ref = x.float() @ w.t()
    y = layer(x).float()
    assert ((y - ref).norm() / ref.norm()).item() < 2e-3, qtype.name
