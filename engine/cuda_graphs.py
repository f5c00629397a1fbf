"""Decode steps replayed from CUDA graphs: one graph per common batch size.

A decode step of a small batch is mostly kernel launches (a few per layer, each a few
microseconds of CPU time) around very little work; replaying a captured graph launches
them all at once. Each graph reads its inputs from static buffers: a batch of ``n``
sequences is copied in and padded to the next captured size. Padding rows write their
keys and values nowhere (slot -1: ``write_kv`` skips negative slots) and attend to one
token of block 0; their outputs are dropped. Logits and sampling stay outside the graph.

The decode kernel's launch shape depends on ``max_seq_len``, so graphs are captured and
replayed with ``max_seq_len = max_model_len``: splits past a sequence's end read nothing.
Capture waits for the first decode-only batch, so that FP8 KV-cache scales computed from
the first prefill are in place before anything is recorded.

``capture=False`` runs the very same padded static-buffer path eagerly: the CPU tests use
it to check the padding and copying without a GPU.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``max_num_seqs`` (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    """Runs decode-only batches of up to ``max(sizes)`` sequences through captured graphs."""

    def __init__(
        self,
        model: torch.nn.Module,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        capture: bool = True,
    ) -> None:
        self.model, self.device, self.capture = model, device, capture
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        b, width = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(b, width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed = False  # a capture failed: every step runs eagerly from then on
        self.runs = 0  # batches run through the static buffers
        self.replays = 0  # ... of them replayed from a captured graph

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            not self.failed
            and meta.decode_only
            and meta.num_seqs <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``hidden [n, hidden]`` of a decode-only batch (``can_run(meta)`` must hold)."""
        n = meta.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.runs += 1
        if self.capture and not self.graphs:  # before the batch is copied in: capture pads all rows
            try:
                self._capture_all()
            except Exception:  # an op that cannot be captured (a host sync in a library kernel)
                log.warning("CUDA graphs: capture failed, decode steps run eagerly from now on",
                            exc_info=True)
                self.failed, self.graphs = True, {}
                if torch.cuda.is_available():
                    torch.cuda.synchronize(self.device)
                return self.model(input_ids, positions, meta)
        self._fill(input_ids, positions, meta, n, size)
        if not self.capture:
            return self.model(self.input_ids[:size], self.positions[:size], self._meta(size))[:n]
        graph, out = self.graphs[size]
        graph.replay()
        self.replays += 1
        return out[:n]

    # -- static buffers ------------------------------------------------------------------

    def _fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              n: int, size: int) -> None:
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if size > n:  # padding rows: write nothing, attend to one token of block 0
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size, 0].zero_()

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens=[1] * size,
            seq_lens_list=[self.max_model_len] * size,  # host copy: an upper bound only
            decode_only=True,
        )

    # -- capture -------------------------------------------------------------------------

    def _capture_all(self) -> None:
        started = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for size in reversed(self.sizes):  # the largest first: the others reuse its memory
            self._fill_padding(size)
            meta = self._meta(size)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # compile and autotune outside the capture
                for _ in range(2):
                    self.model(self.input_ids[:size], self.positions[:size], meta)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:size], self.positions[:size], meta)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("CUDA graphs: captured decode batch sizes %s in %.1fs (%.1f MiB)", self.sizes,
                 time.monotonic() - started, used / 2**20)

    def _fill_padding(self, size: int) -> None:
        """Every row a padding row: capture must not write into real KV blocks."""
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.slot_mapping[:size].fill_(-1)
        self.seq_lens[:size].fill_(1)
        self.block_tables[:size].zero_()
