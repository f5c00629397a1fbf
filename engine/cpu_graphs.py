"""Decode steps on the CPU through one compiled graph of the whole model (``torch.compile``).

Eager, a one-token decode step on the CPU is ~40 small ops a layer, each a few microseconds
of Python and dispatch: SmolLM2-135M (30 layers, GGUF Q4_1, bf16) spent ~7 of its ~10 ms a
step outside its matmuls. Inductor fuses the norms, rotary, residuals and activation into a
few C++ loops around the int4 kernels and the attention; the step took 7 ms
(docs/BENCHMARKS.md, ``bench/cpu.py``).

Where it runs: half precision only (float32 is the exact mode and stays eager; the fused
loops round differently), decode-only batches whose layers share one attention window, a KV
cache in the model dtype; prefill chunks stay eager. The graph's inputs are tensors only
(``DecodeStep``: the keys' slots and mask, built outside as ``DecodePlan``; the rope rows):
no guard reads the batch's lengths, so one graph serves every batch of two or more
sequences and every context length (a batch of one is a graph of its own, as torch
specialises size 1). Guards on module weights are skipped: they never change after load.

Both graphs are compiled at start-up, so no request waits for a compile (tens of seconds on
2 cores; inductor's cache makes a restart faster). A compile that fails (no C++ compiler on
the box) or a later step that raises leaves the eager path for good, logged once.
``enforce_eager`` turns it off.
"""

from __future__ import annotations

import itertools
import logging
import time
import types

import torch

from engine.kv_cache import PagedKVCache
from engine.layers.attention import AttentionMetadata, DecodePlan, DecodeStep

log = logging.getLogger(__name__)

MIN_KEYS = 2  # a 1-key step would be a graph of its own (torch specialises size 1)
# Each graph is compiled for the first shape it sees and again, with every size symbolic,
# for the next that differs: two lengths for one sequence, two batch sizes and lengths for more.
WARM_UP_LENGTHS = ([3], [5], [3, 5], [4, 6, 9])
HALF = (torch.bfloat16, torch.float16)


_GRAPH_IDS = itertools.count()


def _own_code(fn: types.FunctionType, tag: int) -> types.FunctionType:
    """``fn`` with a distinct code object (the same bytecode, named ``<name>_<tag>``)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class CpuDecodeGraph:
    """``can_run(meta)`` / ``run(input_ids, positions, meta) -> hidden [B, hidden]``, as
    ``engine.cuda_graphs.DecodeGraphs``."""

    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, dtype: torch.dtype,
                 window: int | None) -> None:
        self.model = model
        self.dtype = dtype
        self.window = window
        self.block_size = kv_cache.block_size
        self.caches = tuple((layer.k, layer.v) for layer in kv_cache.layers)
        self.ready = False  # compiled and warmed up
        # torch.compile keeps its graphs per code object, and the guards that would tell two
        # models apart are skipped here: each graph gets code of its own, else a second engine
        # in the process (tests, bench/cpu.py) could run the first one's graph on its weights
        forward = types.MethodType(_own_code(CpuDecodeGraph._forward, next(_GRAPH_IDS)), self)
        self._compiled = torch.compile(
            forward, dynamic=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: DecodeStep,
                 rope: tuple) -> torch.Tensor:
        return self.model.model(input_ids, positions, step, rope)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return self.ready and meta.decode_only

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        plan = DecodePlan.build(meta, self.block_size, self.window, MIN_KEYS, always_mask=True)
        if plan is None:
            return self.model(input_ids, positions, meta)
        step = DecodeStep(meta.slot_mapping, plan.slots, plan.mask, self.caches)
        rope = self.model.model.rope_rows(positions, self.dtype)
        try:
            return self._compiled(input_ids, positions, step, rope)
        except Exception as exc:  # a recompile that fails: eager from now on, this step too
            self.ready = False
            log.warning("compiled CPU decode step failed (%s); decode steps run eagerly from now on",
                        _reason(exc))
            return self.model(input_ids, positions, meta)

    @torch.inference_mode()
    def warm_up(self) -> bool:
        """Compile the graphs for one sequence and for several (writes a few slots of blocks
        0 to 2, which no sequence holds yet); False (and eager) if that fails."""
        if len(self.caches[0][0]) < len(WARM_UP_LENGTHS[-1]):
            return False
        started = time.monotonic()
        self.ready = True
        for lens in WARM_UP_LENGTHS:
            tables = [[i] for i in range(len(lens))]
            meta = AttentionMetadata.build([1] * len(lens), lens, tables, self.block_size, "cpu")
            ids = torch.zeros(len(lens), dtype=torch.long)
            positions = torch.tensor([n - 1 for n in lens])
            self.run(ids, positions, meta)
            if not self.ready:
                return False
        log.info("CPU decode steps compiled (torch.compile, a batch of 1 and of more) in %.1f s",
                 time.monotonic() - started)
        return True


def cpu_decode_graph(model: torch.nn.Module, kv_cache: PagedKVCache, dtype: torch.dtype) -> CpuDecodeGraph | None:
    """A warmed-up ``CpuDecodeGraph`` for ``model``, or None where it does not apply (see the
    module docstring) or could not be compiled."""
    if dtype not in HALF or kv_cache.cache_dtype != dtype:
        return None
    windows = {layer.self_attn.attn.sliding_window for layer in getattr(model.model, "layers", [])}
    if len(windows) != 1:
        log.info("CPU decode steps stay eager: the layers' attention windows differ (%s)", sorted(windows, key=str))
        return None
    graph = CpuDecodeGraph(model, kv_cache, dtype, windows.pop())
    try:
        return graph if graph.warm_up() else None
    except Exception as exc:  # no compiler, an unsupported op: eager
        log.warning("CPU decode steps stay eager: torch.compile failed (%s)", _reason(exc))
        return None


def _reason(exc: Exception) -> str:
    """``Type: first line`` of an exception (inductor's messages run to pages)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
