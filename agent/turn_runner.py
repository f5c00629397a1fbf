"""Running a turn: its prompt built (trimmed to the budget) and handed to the engine, on the
MQTT thread when that is quick (see agent.router), else on a pool of worker threads; the
engine's answer goes to agent.turn_results."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from agent.lanes import INTERNAL, Turn
from agent.options import RESET, RESET_REPLY
from agent.output_rules import RuleReviewer
from agent.pipeline import Pipeline
from agent.prompt_builder import PromptBuilder, PromptTooLong, prompt_limit
from agent.sessions import MemorySessionStore, Session, resolve_system_prompt
from agent.turn_results import TurnResults
from engine.api import EngineError, GenerationRequest, GenerationResult, SamplingParams

log = logging.getLogger("agent.router")  # the request path logs under one name

# Prompts up to this many characters are built on the MQTT thread (well under a millisecond
# of tokenizing); longer ones on a worker, so that the MQTT thread never stalls for long.
INLINE_CHARS = 8192


class TurnRunner:
    def __init__(self, ctx: Pipeline, builder: PromptBuilder, rules: RuleReviewer) -> None:
        self._ctx = ctx
        self._builder = builder
        self._tag = secrets.token_hex(3)  # engine request ids stay unique across routers
        self._pool = ThreadPoolExecutor(ctx.config.num_workers, thread_name_prefix="agent-worker")
        # Starting a turn on the MQTT thread needs a store without I/O, a tokenizer without lock.
        self._inline = isinstance(ctx.store, MemorySessionStore) and builder.lock_free
        self._local = threading.local()  # .submitting: the turn this thread is handing the engine
        self.results = TurnResults(ctx, rules, regenerate=self._generate,
                                   start_next=partial(self._spawn, self._run))

    def start(self, turn: Turn) -> None:
        """Starts the turn at the head of its lane: here if that is quick, else on a worker."""
        if self._inline:
            self._guarded(self._run, turn, True)
        else:
            self._spawn(self._run, turn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- worker threads ----

    def _spawn(self, fn: Callable[..., None], turn: Turn, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # shut down: stop() answered every turn
            self._pool.submit(self._guarded, fn, turn, *args)

    def _guarded(self, fn: Callable[..., None], turn: Turn, *args: Any) -> None:
        try:
            fn(turn, *args)
        except Exception:
            log.exception("request %d failed", turn.seq)
            self.results.finish(turn, INTERNAL)

    def _deliver(self, turn: Turn, result: GenerationResult) -> None:
        """The engine's ``on_done``. From the engine's thread, the result goes to a worker; an
        engine that answers inside ``submit`` (an instant or failing one) is served on the spot,
        on the worker that submitted: one thread hand-off less."""
        if getattr(self._local, "submitting", None) is turn:
            self._guarded(self.results.on_result, turn, result)
        else:
            self._spawn(self.results.on_result, turn, result)

    def _run(self, turn: Turn, inline: bool = False) -> None:
        """Builds the prompt and submits it; ``inline`` (on the MQTT thread): only a short one,
        else the turn goes to a worker."""
        if turn.answered:
            return
        ctx = self._ctx
        req, spec = turn.request, ctx.projects[turn.request.project]
        if req.options.command == RESET:
            self._reset(turn)
            return
        with ctx.store_lock:
            turn.stale = False  # only changes made after this read make the turn stale
            session = ctx.store.get(turn.key)
        system_prompt = resolve_system_prompt(req.system_prompt, session, ctx.default_prompt(req.project))
        turns = session.turns if session else []
        if inline and len(system_prompt) + len(req.message) + sum(
                len(u) + len(a) for u, a in turns) > INLINE_CHARS:
            self._spawn(self._run, turn)
            return
        max_tokens = min(req.max_tokens or spec.max_tokens or ctx.config.max_tokens, ctx.config.max_tokens)
        limit = prompt_limit(
            ctx.config.max_history_tokens, max_tokens,
            ctx.engine.token_budget(req.project), ctx.engine.max_model_len,
        )
        try:
            prompt = self._builder.build(system_prompt, turns, req.message, limit)
        except PromptTooLong as exc:
            self.results.finish(turn, str(exc))
            return
        turn.history = Session(system_prompt, turns[prompt.first_turn:])
        temperature = req.temperature if req.temperature is not None else spec.temperature
        top_p = req.top_p if req.top_p is not None else spec.top_p
        sampling = SamplingParams(
            temperature=ctx.config.temperature if temperature is None else temperature,
            top_p=ctx.config.top_p if top_p is None else top_p,
            max_tokens=max_tokens,
        )
        self._generate(turn, GenerationRequest(
            request_id=f"{self._tag}-{turn.seq}",
            prompt_token_ids=prompt.token_ids,
            sampling=sampling,
            on_done=partial(self._deliver, turn),
            on_delta=turn.stream.feed if turn.stream is not None else None,
            project=req.project,
            metadata={"session_id": req.session_id, "client_id": req.client_id},
        ))

    def _generate(self, turn: Turn, generation: GenerationRequest) -> None:
        turn.engine_id, turn.generation = generation.request_id, generation
        outer, self._local.submitting = getattr(self._local, "submitting", None), turn
        try:
            self._ctx.engine.submit(generation)
        except EngineError as exc:
            self.results.finish(turn, f"Error: {exc}")
            return
        finally:
            self._local.submitting = outer
        if turn.answered and turn.engine_id == generation.request_id:
            self._ctx.engine.cancel(generation.request_id)  # timed out (or shut down) meanwhile

    def _reset(self, turn: Turn) -> None:
        """``command: reset``: forgets the session (history, system prompt) in its lane's order."""
        with self._ctx.changing_sessions(*turn.key) as store:
            store.delete(turn.key)
        log.info("request %d: session %s/%s reset", turn.seq, *turn.key)
        self.results.finish(turn, RESET_REPLY, ok=True)
