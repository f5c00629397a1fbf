"""Run one scheduled step: tensors in, one sampled token per sequence out.

The runner turns a ``ScheduledBatch`` into a flattened token axis
(``input_ids``, ``positions``) plus an ``AttentionContext``, runs the model once
for the whole batch, takes the hidden state of each sequence's last new token,
computes logits for those rows only, and samples. It owns the KV cache of every
sequence (and its seeded generator) and frees them when the engine says so.
"""

from __future__ import annotations

import logging

import torch

from engine.kv_cache import SequenceKVCache
from engine.layers.attention import AttentionContext
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger(__name__)

_MIN_CACHE = 32  # tokens a fresh cache holds at least
_DECODE_HEADROOM = 128  # completion tokens a fresh cache makes room for up front


class ModelRunner:
    """Owns the model, the per-sequence KV caches and the sampler."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        cfg = model.config
        self.num_layers: int = cfg.num_layers
        self.num_kv_heads: int = cfg.num_kv_heads
        self.head_dim: int = cfg.head_dim
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.caches: dict[int, SequenceKVCache] = {}  # seq_id -> cache
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> seeded generator

    # -- cache ownership --------------------------------------------------------------------

    def _cache_for(self, seq: Sequence) -> SequenceKVCache:
        cache = self.caches.get(seq.seq_id)
        if cache is None:
            want = seq.num_prompt_tokens + min(seq.sampling.max_tokens, _DECODE_HEADROOM)
            cache = SequenceKVCache(
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                self.dtype,
                self.device,
                initial_capacity=max(_MIN_CACHE, min(want, self.max_model_len)),
            )
            self.caches[seq.seq_id] = cache
        return cache

    def _generator_for(self, seq: Sequence) -> torch.Generator | None:
        if seq.sampling.seed is None or seq.sampling.greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.sampling.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def free(self, seq: Sequence) -> None:
        """Release a sequence's cache and generator (finished, cancelled or failed)."""
        self.caches.pop(seq.seq_id, None)
        self.generators.pop(seq.seq_id, None)

    def kv_cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())

    # -- one step ---------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """``input_ids [T]``, ``positions [T]`` and the context of the flattened batch."""
        ids: list[int] = []
        positions: list[int] = []
        caches: list[SequenceKVCache] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            assert n > 0 and start + n <= seq.num_tokens, (seq, n)
            cache = self._cache_for(seq)
            assert cache.num_tokens == start, (cache.num_tokens, start)
            cache.reserve(start + n)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            caches.append(cache)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, AttentionContext(list(batch.num_new_tokens), caches)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int]:
        """One forward pass for the whole batch; the sampled token of each sequence.

        Every scheduled sequence gets a token (whole-prompt prefills only, for now).
        On an exception no cache has advanced; the caller fails (and frees) the batch.
        """
        if batch.is_empty:
            return []
        input_ids, positions, ctx = self.prepare(batch)
        hidden = self.model.forward(input_ids, positions, ctx)  # [T, hidden]
        last = torch.tensor(ctx.last_token_indices(), dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last))  # [n, vocab] fp32
        params = [seq.sampling for seq in batch.seqs]
        generators = [self._generator_for(seq) for seq in batch.seqs]
        tokens = self.sampler(logits, params, generators).tolist()
        for cache, n in zip(ctx.caches, ctx.query_lens, strict=True):
            cache.advance(n)
        return tokens
