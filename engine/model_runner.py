"""Run one scheduled step: tensors in, one sampled token per finished chunk out.

The runner turns a ``ScheduledBatch`` into a flattened token axis
(``input_ids``, ``positions``) plus ``AttentionMetadata`` over the sequences'
block tables, runs the model once for the whole batch, computes logits only
for the chunks that end a sequence's known tokens, and samples those. It owns
the paged KV cache (allocated once, bound to the model's attention layers) and
each seeded request's generator; the block manager owns which blocks hold what.
"""

from __future__ import annotations

import logging

import torch

from engine.cpu_graphs import CpuDecodeGraph
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import PagedKVCache
from engine.layers.attention import AttentionMetadata
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the paged KV cache and the sampler."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        device: torch.device,
        seed: int = 0,
        graphs: DecodeGraphs | CpuDecodeGraph | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs  # decode-only batches: CUDA graphs, or a compiled CPU step
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        kv_cache.bind(model)
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> seeded generator

    def _generator_for(self, seq: Sequence) -> torch.Generator | None:
        if seq.sampling.seed is None or seq.sampling.greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.sampling.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def free(self, seq: Sequence) -> None:
        """Forget a finished sequence's generator (its blocks go back via the block manager)."""
        self.generators.pop(seq.seq_id, None)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """``input_ids [T]``, ``positions [T]`` and the attention metadata of the batch."""
        ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            assert n > 0 and start + n <= seq.num_tokens, (seq, n)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seq_lens.append(start + n)
        meta = AttentionMetadata.build(
            list(batch.num_new_tokens), seq_lens, [seq.block_table for seq in batch.seqs],
            self.block_size, self.device,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, meta

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """One forward pass for the whole batch; the sampled token of each sequence whose
        chunk reaches its last known token, ``None`` for partial prefill chunks."""
        if batch.is_empty:
            return []
        input_ids, positions, meta = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)  # [B, hidden]
        else:
            hidden = self.model.forward(input_ids, positions, meta)  # [T, hidden]
        rows = [i for i, produces in enumerate(batch.produces_token) if produces]
        out: list[int | None] = [None] * len(batch.seqs)
        if not rows:
            return out
        last = meta.last_token_indices()
        index = torch.tensor([last[i] for i in rows], dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, index))  # [n, vocab] fp32
        seqs = [batch.seqs[i] for i in rows]
        tokens = self.sampler(
            logits, [s.sampling for s in seqs], [self._generator_for(s) for s in seqs]
        ).tolist()
        for i, token in zip(rows, tokens, strict=True):
            out[i] = int(token)
        return out
