"""Tiny random checkpoints of the Llama family, written exactly as transformers writes them.

They make the engine and the agent testable without downloads: a byte-level BPE
tokenizer (any UTF-8 text encodes) with a ChatML template, and a 2-layer model
whose weights are drawn from one seed. Weights are re-drawn after transformers'
own init so that norms and biases are not trivial (ones and zeros would hide bugs)
and logits are spread out (greedy parity does not hinge on near ties).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 512

# A Llama 3.1 style rope scaling, sized so that the tiny model's positions cross its bands.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model runs on an edge box and
answers questions for several projects at once. Each project sends a message to the
broker, and the agent replies on its own topic with the text that the model wrote.
The robot drives along the corridor, turns left at the door, and stops in front of the
charging station. When the battery is low, it returns to the dock and waits until it is
full again. The maze has walls, open cells, a start and a goal; the answer is a list of
moves such as up, down, left and right, written as JSON.
Good tests run fast and fail with a clear message. The engine loads the weights once,
keeps a cache of keys and values for every sequence, and schedules prefill and decode
steps so that no project waits for too long. Numbers like 0, 1, 2, 3, 42, 100 and 2048
appear in logs; so do words like temperature, tokens, budget, session and history.
Hello world! How are you today? I am fine, thank you. What is the weather like in the
city? It is sunny and warm, with a light wind from the west.
"""


def _train_tokenizer():
    """Byte-level BPE trained on the built-in corpus; every byte is in the base alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tok


def _hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _model_config(architecture: str, vocab_size: int, eos_id: int, pad_id: int, overrides: dict):
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    per_arch: dict[str, tuple[str, dict[str, Any]]] = {
        "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=default_rope)),
        "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
        "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
        "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32)),
    }
    cls_name, extra = per_arch[architecture]
    kwargs = {**common, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights, independent of transformers' init order."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = 0.5 * noise
        else:  # linear weight [out, in]
            value = noise / p.shape[1] ** 0.5
        p.copy_(value.to(p.dtype))


def _reshard(out_dir: Path, shards: int) -> None:
    """Split model.safetensors into ``shards`` files with an index, as save_pretrained names them."""
    from safetensors.torch import load_file, save_file

    single = out_dir / "model.safetensors"
    tensors = load_file(single)
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(
            {n: tensors[n].contiguous() for n in part}, out_dir / fname, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True)
    )
    single.unlink()


def build_tiny_checkpoint(
    out_dir: Path,
    architecture: str = "qwen2",
    seed: int = 0,
    *,
    shards: int = 1,
    dtype: str = "float32",
    **overrides: Any,
) -> Path:
    """Write a tiny random ``architecture`` checkpoint with tokenizer into ``out_dir``.

    ``overrides`` go to the transformers config (e.g. ``rope_parameters=LLAMA3_ROPE``,
    ``vocab_size=640``, ``tie_word_embeddings=False``); ``dtype`` is the saved weight dtype.
    """
    from transformers import GenerationConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _hf_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    overrides.setdefault("vocab_size", len(tokenizer))
    vocab_size = overrides.pop("vocab_size")
    config = _model_config(architecture, vocab_size, eos_id, pad_id, overrides)

    import transformers

    model_cls = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype))
    _randomize(model, seed)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if shards > 1:
        _reshard(out_dir, shards)
    log.debug("wrote a tiny %s checkpoint to %s", architecture, out_dir)
    return out_dir


def _default_cache_root() -> Path:
    env = os.environ.get("VLLM_DEPLOY_CACHE")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / ".cache"
    return base / "tiny-models"


def cached_tiny_checkpoint(
    architecture: str = "qwen2", cache_root: Path | str | None = None, **kw: Any
) -> Path:
    """Build once per distinct arguments (and version of this module), then reuse.

    The build goes to a temporary folder renamed into place, so parallel callers
    (pytest-xdist workers, several test sessions) never see a half-written checkpoint.
    """
    import transformers

    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    key = json.dumps(
        {
            "arch": architecture,
            "kw": kw,
            "src": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "transformers": transformers.__version__,
        },
        sort_keys=True,
        default=str,
    )
    final = root / f"{architecture}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return build_once(final, lambda tmp: build_tiny_checkpoint(tmp, architecture, **kw))


def build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """``final`` if it holds a checkpoint, else ``build`` it in a temporary folder renamed
    into place, so parallel callers never see a half-written checkpoint."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another caller finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
