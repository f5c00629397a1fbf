"""A tiny Qwen2 model trained for under a minute on the demo's example dialogues.

It parrots the dialogues it is given (the demo passes ``projects.demo_corpus``), so the demo shows
replies in each project's format; it is not a real LLM. Built once on the CPU,
then cached like the tiny random checkpoints (same folder layout, so the
loader and the engine read it as any Hugging Face checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from agent.demo.tiny_checkpoint import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    _default_cache_root,
    build_once,
)
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

VOCAB_SIZE = 1024
MODEL = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2)
STEPS, BATCH, LR, SEED = 250, 6, 3e-3, 0  # BATCH dialogues of every project per step
THREADS = 2


def _corpus_text(dialogues: list[tuple[str, list[dict[str, str]]]]) -> list[str]:
    """Lines for the tokenizer: every message once, role names included."""
    seen: dict[str, None] = dict.fromkeys(["system", "user", "assistant"])
    for _, messages in dialogues:
        for m in messages:
            seen.setdefault(m["content"])
    return [line for text in seen for line in text.splitlines()]


def build_tokenizer(lines: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (any UTF-8 text encodes) trained on ``lines``, with the ChatML template.

    It splits text as Qwen2's tokenizer does: transformers loads a qwen2 checkpoint's
    tokenizer with that pipeline, whatever tokenizer.json says.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def encode_dialogue(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of the whole chat and where the answer starts.

    The prompt is encoded exactly as the agent encodes it; the answer ends with ``<|im_end|>``.
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    answer = tokenizer.encode(messages[-1]["content"])
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    return prompt + answer + [eos], len(prompt)


Example = tuple[list[int], int]  # token ids, where the answer starts


def _shared_prefix(examples: list[Example]) -> int:
    """Length of the ids every example starts with (the system prompt), before any answer."""
    first, n = examples[0][0], min(start for _, start in examples) - 1
    for seq, _ in examples[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n


def _group_batches(group: list[Example], pad_id: int, rng: random.Random):
    """Endless shuffled batches of one group: (shared prefix, right-padded rest, targets).

    Targets are the next tokens of the answers, -100 (no loss) elsewhere.
    """
    n = _shared_prefix(group)
    prefix = torch.tensor(group[0][0][:n])
    while True:
        order = rng.sample(range(len(group)), len(group))
        whole = len(order) - len(order) % BATCH or len(order)  # equal batches; the rest waits
        for i in range(0, whole, BATCH):
            rows = [group[j] for j in order[i:i + BATCH]]
            width = max(len(seq) for seq, _ in rows) - n
            ids = torch.full((len(rows), width), pad_id)
            targets = torch.full((len(rows), width), -100)
            for row, (seq, start) in enumerate(rows):
                ids[row, :len(seq) - n] = torch.tensor(seq[n:])
                targets[row, start - 1 - n:len(seq) - 1 - n] = torch.tensor(seq[start:])
            yield prefix, ids, targets


def train(model, groups: list[list[Example]], pad_id: int, steps: int = STEPS) -> float:
    """AdamW with warm-up and cosine decay, loss on answer tokens only; the last loss.

    A step takes a few dialogues of every group (project). A group's system prompt
    runs once, and its dialogues attend to it through the KV cache (gradients flow
    through both), so the long system prompts cost little.
    """
    rng = random.Random(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    streams, loss = [_group_batches(g, pad_id, rng) for g in groups], torch.tensor(0.0)
    for step in range(steps):
        logits, targets = [], []
        for prefix, ids, target in map(next, streams):
            cache = model.model(input_ids=prefix[None], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(ids))
            out = model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state
            keep = target != -100  # right padding: causal attention is enough
            logits.append(model.lm_head(hidden[keep]))  # the head only where the loss is
            targets.append(target[keep])
        loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("demo model: step %d/%d, loss %.3f", step + 1, steps, loss.item())
    model.eval()
    return float(loss.item())


Dialogue = tuple[str, list[dict[str, str]]]  # (project, chat messages ending in the answer)


def build_demo_checkpoint(out_dir: Path, dialogues: list[Dialogue], steps: int = STEPS) -> Path:
    """Train the demo model on ``dialogues`` and save it (fp32 safetensors, tokenizer, eos ids)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    started, cpu, threads = time.monotonic(), time.process_time(), torch.get_num_threads()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = build_tokenizer(_corpus_text(dialogues))
    eos_id = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(hf_tokenizer), max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
        **MODEL,
    )
    config.save_pretrained(out_dir)
    hf_tokenizer.save_pretrained(out_dir)
    # Train on the ids the engine will see: the tokenizer as the engine loads it.
    tokenizer = Tokenizer.from_pretrained(out_dir)
    groups: dict[str, list[Example]] = {}
    for project, messages in dialogues:
        groups.setdefault(project, []).append(encode_dialogue(tokenizer, messages))
    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(SEED)
        try:
            torch.set_num_threads(THREADS)
            model = Qwen2ForCausalLM(config).float()
            loss = train(model, list(groups.values()), pad_id, steps)
        finally:
            torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    log.info("demo model: trained on %d dialogues in %.1f s (%.1f s CPU), last loss %.3f",
             len(dialogues), time.monotonic() - started, time.process_time() - cpu, loss)
    return out_dir


def _cache_key(dialogues: list[Dialogue]) -> str:
    """Changes with the training code, the dialogues (system prompts included), the versions."""
    import transformers

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).with_name("tiny_checkpoint.py")):
        digest.update(path.read_bytes())
    digest.update(json.dumps(dialogues).encode())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:12]


def cached_demo_checkpoint(dialogues: list[Dialogue], cache_root: Path | str | None = None) -> Path:
    """Build the demo model for ``dialogues`` once (about a minute on two cores), then reuse it.

    It is built in a temporary folder renamed into place, so a parallel caller
    never sees a half-written checkpoint.
    """
    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    final = root / f"demo-qwen2-{_cache_key(dialogues)}"
    return build_once(final, lambda tmp: build_demo_checkpoint(tmp, dialogues))
