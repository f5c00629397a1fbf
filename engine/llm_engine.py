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
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.api import (
    EngineConfig,
    EngineError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from engine.block_manager import BlockManager
from engine.cuda_graphs import DecodeGraphs
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_stats import EngineStats
from engine.kv_setup import allocate_kv_cache, load_kv_scales, plan_kv_cache
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer
from engine.validation import check_supported, empty_result, validate_request

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # an idle loop still wakes this often, so its heartbeat stays fresh


@dataclass
class _Active:
    request: GenerationRequest
    seq: Sequence
    detok: IncrementalDetokenizer


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
        """Plans memory and allocates the paged KV cache once (``engine.kv_setup``);
        ``kv_scales``: the checkpoint's per-layer fp8 KV scales, if any."""
        check_supported(config)
        self.config = config
        self.tokenizer = tokenizer
        model_max = int(model.config.max_position_embeddings)
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {model_max}"
            )
        self.max_model_len: int = config.max_model_len or min(
            model_max, config.max_model_len_limit or model_max
        )
        self.vocab_size = int(model.config.vocab_size)
        self.memory_plan = plan_kv_cache(model, config, device, dtype, self.max_model_len)
        kv_cache = allocate_kv_cache(model, self.memory_plan, config, device, dtype, kv_scales)
        graphs = None
        if device.type == "cuda" and not config.enforce_eager:
            graphs = DecodeGraphs(model, model.config.hidden_size, dtype, device,
                                  config.max_num_seqs, self.max_model_len, config.block_size)
        self.runner = ModelRunner(model, kv_cache, device, seed=config.seed, graphs=graphs)
        self.block_manager = BlockManager(
            self.memory_plan.num_blocks, config.block_size,
            project_shares=dict(config.project_shares) or None,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(
            config.max_num_seqs, config.max_num_batched_tokens, self.block_manager
        )
        shares = ", ".join(
            f"{p} {self.block_manager.share_blocks(p) * config.block_size} tokens"
            for p, _ in config.project_shares
        )
        log.info("KV tokens per project (share): %s", shares or "one pool, shared by the "
                 "projects as they appear")
        self._inbox: queue.Queue[tuple[str, Any, float]] = queue.Queue()
        self._active: dict[str, _Active] = {}  # loop thread only
        self._lock = threading.Lock()  # guards _closed and _thread
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self.quantization = "none"  # the weights' method as loaded (from_config sets it)
        self._heartbeat = time.monotonic()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load tokenizer and model for ``config``; call ``start()`` before submitting."""
        check_supported(config)  # before any slow loading
        from engine.config import ModelConfig
        from engine.device import resolve_device, resolve_dtype
        from engine.loader import load_model
        from engine.quantization import resolve as resolve_quantization

        device = resolve_device(config.device)
        model_config = ModelConfig.from_pretrained(config.model_path)
        dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device)
        tokenizer = Tokenizer.from_pretrained(
            config.model_path, extra_eos_token_ids=tuple(model_config.eos_token_ids)
        )
        quant = resolve_quantization(
            config.quantization, config.model_path, model_config.quantization_config,
            {"bnb_quant_type": config.bnb_quant_type},
        )
        model = load_model(config.model_path, dtype, device, config=model_config, quant=quant)
        kv_scales = load_kv_scales(config.model_path, model_config.num_layers)
        engine = cls(config, tokenizer, model, device, dtype, kv_scales)
        engine.quantization = quant.describe() if quant is not None else "none"
        log.info("engine ready: %s on %s (%s, KV cache %s)", config.model_path, device, dtype,
                 engine.runner.kv_cache.cache_dtype)
        return engine

    # -- public interface (any thread) -------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise EngineError("the engine is shut down")
            if self._thread is None:
                self._heartbeat = time.monotonic()
                self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
                self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if not self._closed:
                self._inbox.put(("add", request, time.monotonic()))
                return
        self._call(request.on_done, empty_result(request, "cancelled", "the engine is shut down"))

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
            self._cancel_all()
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
        while not stop:
            self._heartbeat = time.monotonic()
            try:
                stop = self._drain_inbox(block=not self.scheduler.has_unfinished())
                if not stop and self.scheduler.has_unfinished():
                    self._step()
            except Exception:  # a bug; keep serving the other requests
                log.exception("engine loop iteration failed")
        self._cancel_all()
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
                    self._add(payload, t)
                except Exception as exc:  # a bug: answer the request, keep the loop
                    log.exception("adding request %s failed", payload.request_id)
                    self._call(payload.on_done, empty_result(payload, "error", repr(exc), t))
            elif kind == "cancel" and payload in self._active:
                self._finish(self._active[payload].seq, "cancelled")
            elif kind == "stop":
                stop = True

    def _add(self, request: GenerationRequest, arrival: float) -> None:
        error = validate_request(request, self.max_model_len, self.vocab_size)
        if error is None and request.request_id in self._active:
            error = f"request id {request.request_id!r} is already in flight"
        if error is not None:
            log.info("rejected request %s: %s", request.request_id, error)
            self._stats.add(processed=1, errors=1)
            self._call(request.on_done, empty_result(request, "error", error, arrival))
            return
        ids, sampling = request.prompt_token_ids, request.sampling
        seq = Sequence(request.request_id, ids, sampling, request.project, arrival_time=arrival)
        eos = () if sampling.ignore_eos else self.tokenizer.eos_token_ids
        detok = IncrementalDetokenizer(self.tokenizer, ids, sampling.stop, eos)
        self._active[request.request_id] = _Active(request, seq, detok)
        self.scheduler.add(seq)
        self._update_sizes()

    def _step(self) -> None:
        start = time.monotonic()
        batch = self.scheduler.schedule()
        for seq in batch.failed:
            self._finish(seq, "error", seq.error or "the request does not fit in the KV cache")
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
                self._finish(seq, "error", f"forward pass failed: {type(exc).__name__}: {exc}")
            return
        self.scheduler.update(batch, tokens)
        for seq, produced in zip(batch.seqs, batch.produces_token, strict=True):
            if not produced:
                continue  # a prefill chunk that does not reach the prompt's end yet
            try:
                self._postprocess(seq)
            except Exception as exc:  # a bug, not the request's fault: fail this one only
                log.exception("postprocessing request %s failed", seq.request_id)
                self._finish(seq, "error", f"internal error: {type(exc).__name__}: {exc}")
        self._stats.record_step(start, time.monotonic(), prompt_tokens, sum(batch.produces_token))
        self._update_sizes()

    def _postprocess(self, seq: Sequence) -> None:
        act = self._active[seq.request_id]
        delta = act.detok.add_token(seq.last_token_id)
        reason = "stop" if act.detok.stopped else None
        if reason is None and (
            seq.num_completion_tokens >= seq.sampling.max_tokens
            or seq.num_tokens >= self.max_model_len
        ):
            delta += act.detok.flush()  # may still find a stop string in held-back text
            reason = "stop" if act.detok.stopped else "length"
        if delta and act.request.on_delta is not None:
            self._call(act.request.on_delta, delta)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        act = self._active.pop(seq.request_id, None)
        if act is None or act.seq is not seq:
            return
        seq.finish(reason, error)
        self.scheduler.remove(seq)
        self.runner.free(seq)
        result = seq.to_result(act.detok.text)
        self._stats.add(processed=1, errors=reason == "error", cancelled=reason == "cancelled")
        log.debug("request %s finished (%s) after %.3f s", seq.request_id, reason, result.total_s)
        self._call(act.request.on_done, result)

    def _cancel_all(self) -> None:
        for act in list(self._active.values()):
            self._finish(act.seq, "cancelled", "the engine shut down")
        self._update_sizes()

    def _update_sizes(self) -> None:
        self._stats.set(running=self.scheduler.num_running, waiting=self.scheduler.num_waiting)

    @staticmethod
    def _call(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception:
            log.exception("a request callback raised; the engine carries on")
