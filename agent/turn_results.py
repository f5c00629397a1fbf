"""A turn's end: the engine's result made into the reply (output rules, one retry), the
session updated on success, the stream closed, the reply published, then the acks."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.debug_log import debug_log
from agent.envelope import Envelope
from agent.lanes import Turn, shaped
from agent.output_rules import RuleReviewer, retry_request
from agent.pipeline import Pipeline
from agent.reasoning import answer_of
from agent.sessions import Session
from engine.api import GenerationRequest, GenerationResult

log = logging.getLogger("agent.router")  # the request path logs under one name


class TurnResults:
    """``regenerate(turn, generation)``: submits a turn again (its reply broke its rules);
    ``start_next(turn)``: starts the turn next in a lane once the one before is answered."""

    def __init__(self, ctx: Pipeline, rules: RuleReviewer,
                 regenerate: Callable[[Turn, GenerationRequest], None],
                 start_next: Callable[[Turn], None]) -> None:
        self._ctx = ctx
        self._rules = rules
        self._regenerate = regenerate
        self._start_next = start_next

    def on_result(self, turn: Turn, result: GenerationResult) -> None:
        ctx = self._ctx
        turn.engine_id = None  # the engine is done with it: nothing to cancel
        if turn.answered:  # timed out or shut down meanwhile: nothing to send, nothing to retry
            return
        if isinstance(turn.shape, Envelope):
            turn.shape.result = result
        text, error = answer_of(result, ctx.config.skip_thinking, ctx.engine.tokenizer.opens_reasoning)
        if error is not None:
            if result.error:
                log.warning("request %d: engine error: %s", turn.seq, result.error)
            self.finish(turn, error)
            return
        rules = ctx.projects[turn.request.project].output_rules
        if rules is not None and turn.generation is not None:
            reviewed = self._rules.review(turn.request.project, rules, text, turn.seq, not turn.retried)
            if reviewed is None:  # broke its rules: once more
                turn.retried = True
                if turn.stream is not None:
                    turn.stream.restart()
                self._regenerate(turn, retry_request(turn.generation))
                return
            text = reviewed
        assert turn.history is not None
        history = Session(turn.history.system_prompt, turn.history.turns + [(turn.request.message, text)])
        if self.finish(turn, text, history):
            log.debug(
                "request %d answered: session %s/%s client %s, %d prompt + %d completion tokens, "
                "%.2f s", turn.seq, *turn.key, turn.request.client_id, result.prompt_tokens,
                len(result.token_ids), ctx.clock() - turn.accepted_at,
            )
            debug_log.debug("request %d reply: %r", turn.seq, text)

    def finish(self, turn: Turn, reply: str, history: Session | None = None,
               ok: bool | None = None) -> bool:
        """Answers ``turn`` unless it was answered already; the session changes only on success.
        ``ok`` (default: ``history`` was given) tells a reply from an error. Any thread."""
        ctx = self._ctx
        if not ctx.lanes.claim(turn):
            return False
        # Its on_done refers back to the turn: without this cycle, reference counting frees
        # the turn as soon as it is answered, not the cyclic GC later (docs/BENCHMARKS.md).
        turn.generation = None
        ok = history is not None if ok is None else ok
        with ctx.store_lock:
            if history is not None and not turn.stale:
                ctx.store.put(turn.key, history)
        if turn.stream is not None:
            turn.stream.close()  # the stream's last message goes before the reply
        ctx.reply(turn.request, shaped(turn.shape, reply, ok))
        for ack in ctx.lanes.take_acks(turn):
            ack()
        ctx.metrics.answered(turn.request.project, ok, ctx.clock() - turn.accepted_at)
        following = ctx.lanes.advance(turn)
        if following is not None:
            self._start_next(following)
        return True

    def expire(self, turn: Turn) -> None:
        """The deadline watcher's callback: answers a turn past ``request_timeout``."""
        if turn.answered:
            return
        log.warning("request %d of session %s/%s timed out", turn.seq, *turn.key)
        reply = f"Error: no answer within {self._ctx.config.request_timeout:g} s. Please try again."
        if self.finish(turn, reply) and turn.engine_id:
            self._ctx.engine.cancel(turn.engine_id)
