"""The engine: a loop thread that batches every request into shared forward passes.

``submit`` and ``cancel`` only put a message into a thread-safe inbox and return
at once. The loop thread owns everything else: add new requests -> ``schedule``
-> ``run`` (one forward pass for the batch) -> postprocess (append tokens,
detokenize, stream deltas, finish). Every accepted request gets exactly one
``on_done``, always on the loop thread: invalid requests (empty prompt, unknown
token ids, prompt + max_tokens over ``max_model_len``, a request id already in
flight) finish with ``finish_reason="error"`` and a readable ``error``; ``submit``
never raises for them. A request submitted after ``shutdown`` is answered at once,
on the caller's thread, with ``finish_reason="cancelled"``.

``engine.engine_builder`` loads the model and builds the parts the loop runs on;
``engine.request_tracker`` keeps the requests in flight and assembles their results.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Any

import torch

from engine.api import (
    EngineConfig,
    EngineError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from engine.engine_builder import build_core, load_model_for
from engine.engine_stats import EngineStats
from engine.openmp_pool import release_calling_thread_pool
from engine.request_tracker import RequestTracker, call_safely
from engine.tokenizer import Tokenizer
from engine.validation import check_supported, empty_result

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # an idle loop still wakes this often, so its heartbeat stays fresh


class LLMEngine:
    """Continuous-batching engine over our own model code (implements ``EngineProtocol``)."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        kv_scales: tuple[list[float], list[float]] | None = None,
    ) -> None:
        """Plans memory and allocates the paged KV cache once (``engine.engine_builder``);
        ``kv_scales``: the checkpoint's per-layer fp8 KV scales, if any."""
        check_supported(config)
        self.config = config
        self.tokenizer = tokenizer
        core = build_core(config, model, device, dtype, kv_scales)
        self.max_model_len: int = core.max_model_len
        self.vocab_size = core.vocab_size
        self.memory_plan = core.memory_plan
        self.runner = core.runner
        self.block_manager = core.block_manager
        self.scheduler = core.scheduler
        self._inbox: queue.Queue[tuple[str, Any, float]] = queue.Queue()
        self._lock = threading.Lock()  # guards _closed and _thread
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._requests = RequestTracker(  # loop thread only
            tokenizer, self.scheduler, self.runner, self._stats, self.max_model_len, self.vocab_size
        )
        self.quantization = "none"  # the weights' method as loaded (from_config sets it)
        self._heartbeat = time.monotonic()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load tokenizer and model for ``config``; call ``start()`` before submitting."""
        check_supported(config)  # before any slow loading
        loaded = load_model_for(config)
        engine = cls(config, loaded.tokenizer, loaded.model, loaded.device, loaded.dtype,
                     loaded.kv_scales)
        engine.quantization = loaded.quantization
        log.info("engine ready: %s on %s (%s, KV cache %s)", config.model_path, loaded.device,
                 loaded.dtype, engine.runner.kv_cache.cache_dtype)
        return engine

    # -- public interface (any thread) -------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (once). The caller's OpenMP team is ended here: the loop's
        team must be the only one for decode to run at full speed (``engine.openmp_pool``)."""
        with self._lock:
            if self._closed:
                raise EngineError("the engine is shut down")
            if self._thread is None:
                self._heartbeat = time.monotonic()
                self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
                self._thread.start()
        release_calling_thread_pool()

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if not self._closed:
                self._inbox.put(("add", request, time.monotonic()))
                return
        call_safely(request.on_done, empty_result(request, "cancelled", "the engine is shut down"))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if not self._closed:
                self._inbox.put(("cancel", request_id, time.monotonic()))

    def token_budget(self, project: str) -> int:
        """Prompt + completion tokens one request of ``project`` may hold: its KV share."""
        share = self.block_manager.share_blocks(project) * self.block_manager.block_size
        return min(self.max_model_len, share)

    def stats(self) -> dict:
        """running, waiting, processed, errors, cancelled, steps, prompt_tokens,
        tokens_generated, tokens_per_s (last 10 s), max_model_len."""
        out: dict[str, Any] = self._stats.snapshot()
        out["waiting"] += self._inbox.qsize()  # submitted, not yet seen by the loop
        out["max_model_len"] = self.max_model_len
        out["preemptions"] = self.scheduler.num_preemptions
        out["kv_blocks_total"] = self.block_manager.num_blocks
        out["kv_blocks_free"] = self.block_manager.num_free_blocks
        out["kv_blocks_by_project"] = self.block_manager.usage_by_project()
        return out

    def last_progress(self) -> float:
        """``time.monotonic()`` of the loop's latest iteration: it ticks at least every
        ``IDLE_TICK_S`` while idle and once per forward pass while busy, so an old value
        means a hung loop (the agent's systemd watchdog reads it)."""
        return self._heartbeat

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; every outstanding request finishes with ``"cancelled"``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(("stop", None, time.monotonic()))
            thread = self._thread
        if thread is None:
            self._drain_inbox(block=False)
            self._requests.cancel_all()
            return
        if thread is threading.current_thread():
            return  # called from a callback: the loop stops after this step
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the engine loop did not stop within %.0f s", timeout)

    def generate(
        self,
        prompts_token_ids: list[list[int]],
        sampling: SamplingParams | list[SamplingParams],
        timeout: float | None = None,
    ) -> list[GenerationResult]:
        """Blocking convenience (bench, tests): submit all prompts together, wait for all
        (``TimeoutError`` after ``timeout`` seconds). Starts the loop if needed."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts_token_ids)
        self.start()
        done: queue.Queue[GenerationResult] = queue.Queue()
        tag = uuid.uuid4().hex[:8]
        for i, (ids, sp) in enumerate(zip(prompts_token_ids, params, strict=True)):
            self.submit(GenerationRequest(f"gen-{tag}-{i}", list(ids), sp, on_done=done.put))
        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[str, GenerationResult] = {}
        while len(results) < len(params):
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                result = done.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(
                    f"generate: {len(params) - len(results)} requests unfinished"
                ) from None
            results[result.request_id] = result
        return [results[f"gen-{tag}-{i}"] for i in range(len(params))]

    # -- loop thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        log.debug("engine loop started")
        stop = False
        team_idle = True  # no step since this thread's OpenMP team was last released
        while not stop:
            self._heartbeat = time.monotonic()
            try:
                busy = self.scheduler.has_unfinished()
                if not busy and not team_idle:  # idle: leave the cores to other teams
                    release_calling_thread_pool()
                    team_idle = True
                stop = self._drain_inbox(block=not busy)
                if not stop and self.scheduler.has_unfinished():
                    self._step()
                    team_idle = False
            except Exception:  # a bug; keep serving the other requests
                log.exception("engine loop iteration failed")
        self._requests.cancel_all()
        log.debug("engine loop stopped")

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and cancels; True once the stop message was seen."""
        stop = False
        while True:
            try:
                kind, payload, t = self._inbox.get(block=block, timeout=IDLE_TICK_S if block else None)
            except queue.Empty:
                return stop
            block = False
            if kind == "add":
                try:
                    self._requests.add(payload, t)
                except Exception as exc:  # a bug: answer the request, keep the loop
                    log.exception("adding request %s failed", payload.request_id)
                    call_safely(payload.on_done, empty_result(payload, "error", repr(exc), t))
            elif kind == "cancel":
                self._requests.cancel(payload)
            elif kind == "stop":
                stop = True

    def _step(self) -> None:
        start = time.monotonic()
        batch = self.scheduler.schedule()
        for seq in batch.failed:
            self._requests.finish(seq, "error", seq.error or "the request does not fit in the KV cache")
        if batch.is_empty:
            return
        prompt_tokens = sum(
            n for n, prefill in zip(batch.num_new_tokens, batch.is_prefill, strict=True) if prefill
        )
        try:
            tokens = self.runner.run(batch)
        except Exception as exc:
            log.exception("forward pass failed; failing its %d requests", len(batch))
            for seq in batch.seqs:
                self._requests.finish(seq, "error", f"forward pass failed: {type(exc).__name__}: {exc}")
            return
        self.scheduler.update(batch, tokens)
        for seq, produced in zip(batch.seqs, batch.produces_token, strict=True):
            if not produced:
                continue  # a prefill chunk that does not reach the prompt's end yet
            try:
                self._requests.postprocess(seq)
            except Exception as exc:  # a bug, not the request's fault: fail this one only
                log.exception("postprocessing request %s failed", seq.request_id)
                self._requests.finish(seq, "error", f"internal error: {type(exc).__name__}: {exc}")
        self._stats.record_step(start, time.monotonic(), prompt_tokens, sum(batch.produces_token))
        self._requests.update_sizes()
