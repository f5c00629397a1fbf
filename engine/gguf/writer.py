"""Write a plain Llama-family checkpoint folder as one GGUF file that llama.cpp loads.

Everything in the file is written by the ``gguf`` package: ``GGUFWriter`` (header,
metadata, tensor table), ``gguf.quants.quantize`` (Q8_0 / Q4_0 blocks, as ggml quantizes
them), ``gguf.SpecialVocab`` (merges, special token ids, chat template). What is ours is the
choice of each tensor's type and the metadata values, following llama.cpp's
``convert_hf_to_gguf.py``:

- ``Q8_0`` / ``Q4_0``: every linear weight (attention, MLP) in that type; the token
  embedding and the output head in Q8_0 (llama.cpp's ``llama-quantize`` likewise keeps the
  head above 4 bits); a weight whose rows are not whole 32-value blocks in F16.
- ``F16`` / ``F32``: every 2-D weight in that type.
- norms and biases: F32 always.
- Llama ``q_proj``/``k_proj`` rows permuted for llama.cpp's rotary layout (``mapping``).

The tokenizer must be byte-level BPE (tokenizer.json), as Llama 3, Qwen and SmolLM ship.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import numpy as np

from engine.config import ModelConfig, RopeConfig
from engine.gguf.mapping import WRITTEN_ARCHITECTURES, gguf_names, permute_rows, rotary_rows
from engine.gguf.reader import ROPE_FREQS
from engine.layers.rotary import inv_frequencies

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FILE_TYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "F32": (Q.F32, gguf.LlamaFileType.ALL_F32),
}
_HEAD_TENSORS = ("token_embd.weight", "output.weight")
_BLOCK = 32  # Q8_0 / Q4_0 block size


Encoder = Callable[[str, np.ndarray], tuple[np.ndarray, Q]]  # (GGUF name, float32 values) -> (data, type)


def write_gguf(src: str | Path, dst: str | Path, file_type: str = "Q8_0",
               encode: Encoder | None = None) -> Path:
    """Write the checkpoint folder ``src`` as the GGUF file ``dst`` (``file_type``: Q8_0,
    Q4_0, F16 or F32); returns ``dst``. ``encode`` replaces the choice and encoding of each
    tensor (tests write other block types through it)."""
    from engine.loader import checkpoint_tensor_files  # torch-heavy; only when writing

    src, dst = Path(src), Path(dst)
    key = file_type.upper()
    if key not in FILE_TYPES:
        raise ValueError(f"GGUF type {file_type!r} is not written; choose one of {', '.join(FILE_TYPES)}")
    if dst.suffix != ".gguf":
        raise ValueError(f"the GGUF output {dst} must end in .gguf")
    if dst.exists():
        raise ValueError(f"the output file {dst} already exists")
    config = ModelConfig.from_pretrained(src)
    _check_writable(config, src)
    arch = WRITTEN_ARCHITECTURES[config.architecture]
    qtype, ftype = FILE_TYPES[key]

    tensor_files = checkpoint_tensor_files(src)
    names = sorted(n for n in tensor_files if not n.endswith("rotary_emb.inv_freq"))
    if config.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    mapped = gguf_names(arch, names, config.num_layers)

    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")  # renamed once complete: no half-written .gguf
    writer = gguf.GGUFWriter(str(part), arch)
    _write_hparams(writer, config, src, ftype)
    _write_tokenizer(writer, src, config.vocab_size)

    from engine.tensor_files import open_tensor_file

    for name in names:
        with open_tensor_file(tensor_files[name]) as fh:
            tensor = fh.get(name).float().numpy()
        out = mapped[name]
        heads = rotary_rows(out, arch, config.num_heads, config.num_kv_heads)
        if heads is not None:
            tensor = permute_rows(tensor, heads)
        data, ttype = (encode or partial(_encode, qtype=qtype))(out, tensor)
        writer.add_tensor(out, data, raw_dtype=ttype)
    if config.rope.rope_type == "llama3":  # as llama.cpp's converter: per-pair divisors
        writer.add_tensor(ROPE_FREQS, rope_freq_factors(config), raw_dtype=Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    part.replace(dst)
    log.info("wrote %s (%s, %s, %d tensors, %.1f MiB)", dst, arch, key, len(names),
             dst.stat().st_size / 2**20)
    return dst


def rope_freq_factors(config: ModelConfig) -> np.ndarray:
    """Llama 3.1 scaling as llama.cpp stores it: ``inv_freq / llama3_inv_freq`` per pair
    (1 for the kept high frequencies, ``factor`` for the divided low ones)."""
    plain = inv_frequencies(config.head_dim, RopeConfig(theta=config.rope.theta))
    scaled = inv_frequencies(config.head_dim, config.rope)
    return (plain.double() / scaled.double()).float().numpy()


def _check_writable(config: ModelConfig, src: Path) -> None:
    if config.quantization_config:
        raise ValueError(f"{src} is already quantized; write GGUF from a plain fp16/bf16/fp32 checkpoint")
    if config.rope.rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"{src}: rope type {config.rope.rope_type!r} is not written to GGUF; default, linear "
            "and llama3 are"
        )
    if config.sliding_window is not None:
        raise ValueError(f"{src}: a sliding-window model is not written to GGUF (llama.cpp's llama has none)")
    if config.mlp_bias:
        raise ValueError(f"{src}: MLP biases are not written to GGUF")


def _encode(name: str, tensor: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    ttype = _tensor_type(name, tensor, qtype)
    return (tensor.astype(np.float32) if ttype == Q.F32 else gguf.quants.quantize(tensor, ttype)), ttype


def _tensor_type(name: str, tensor: np.ndarray, qtype: Q) -> Q:
    if tensor.ndim == 1:
        return Q.F32
    if qtype in (Q.F16, Q.F32):
        return qtype
    if tensor.shape[-1] % _BLOCK:
        return Q.F16
    return Q.Q8_0 if name in _HEAD_TENSORS else qtype


def _write_hparams(writer: gguf.GGUFWriter, c: ModelConfig, src: Path, ftype: gguf.LlamaFileType) -> None:
    writer.add_name(src.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope.theta)
    if c.rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope.factor)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- tokenizer ---------------------------------------------------------------------------------

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _pre_tokenizer_name(tokenizer_json: dict, src: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the pre-tokenizer in tokenizer.json: the
    GPT-2 byte-level split, Qwen2's or Llama 3's regex; anything else is refused (llama.cpp
    would split the text differently)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
        if len(regexes) == 1 and regexes[0] in _SPLITS:
            return _SPLITS[regexes[0]]
    raise ValueError(
        f"{src}/tokenizer.json: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name known "
        "here (GPT-2 byte level, Qwen2 and Llama 3 splits are)"
    )


def _write_tokenizer(writer: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    file = src / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{src} has no tokenizer.json: the GGUF writer needs a byte-level BPE tokenizer")
    tokenizer_json = json.loads(file.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{file}: tokenizer model {model.get('type')!r} is not written to GGUF (BPE is)")
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ValueError(f"{src}: the tokenizer has {len(by_id)} tokens, the model's vocab_size is {vocab_size}")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json, src))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{file}: no BPE merges found")
    special.add_to_gguf(writer)
    if tok.bos_token_id is None:  # nothing to add at the start (Qwen): tell llama.cpp so
        writer.add_add_bos_token(False)

