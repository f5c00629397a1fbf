"""Admission of a request, on the MQTT thread: dedupe, shutdown, rate limit and queue bound,
each refusal answered at once; an accepted turn joins its session's lane and gets a deadline."""

from __future__ import annotations

import itertools
import logging

from agent import metrics as outcome
from agent.acks import NO_ACK, Ack
from agent.deadlines import DeadlineWatcher
from agent.debug_log import debug_log
from agent.dedupe import Deduper
from agent.envelope import Envelope, error_envelope
from agent.lanes import OVERLOADED, SHUTTING_DOWN, Shape, Turn, shaped
from agent.pipeline import Pipeline
from agent.protocol import ChatRequest, ProtocolError
from agent.rate_limit import RATE_LIMITED, RateLimiter
from agent.streaming import open_stream
from agent.turn_runner import TurnRunner

log = logging.getLogger("agent.router")  # the request path logs under one name


class Admission:
    def __init__(self, ctx: Pipeline, runner: TurnRunner, deduper: Deduper,
                 limiter: RateLimiter, watcher: DeadlineWatcher) -> None:
        self._ctx = ctx
        self._runner = runner
        self._deduper = deduper
        self._limiter = limiter
        self._watcher = watcher
        self._seq = itertools.count(1)
        self.stopping = False  # new requests get the shutting-down reply

    def reject(self, err: ProtocolError) -> None:
        """Answers a request that did not parse (once per requestId)."""
        if err.session_id and err.request_id and self._deduper.seen(
            (err.project, err.session_id, err.request_id)
        ):
            return
        self._ctx.metrics.rejected(err.project, outcome.BAD_REQUEST)
        if err.reply_topic is None:
            log.warning("bad request for project %s and no reply topic: %s", err.project, err.reply)
            return
        log.warning("bad request for project %s session %s: %s", err.project, err.session_id, err.reply)
        self._ctx.publish(err.reply_topic, error_envelope(err) or err.reply,
                          correlation=err.correlation_data)

    def submit(self, request: ChatRequest, shape: Shape | None = None, ack: Ack = NO_ACK) -> None:
        """See Router.submit."""
        ctx = self._ctx
        if shape is None and request.options.json:
            shape = Envelope(request, ctx.config.skip_thinking,
                             ctx.engine.tokenizer.opens_reasoning)
        key = (request.project, request.session_id)
        if request.request_id and self._deduper.seen(key + (request.request_id,)):
            # Delivered again (QoS 1 DUP after a reconnect) while still being answered: its
            # acknowledgement waits for that answer.
            if ctx.lanes.attach(key, request.request_id, ack):
                ack.hold()
            log.info("duplicate request %s of session %s/%s ignored", request.request_id, *key)
            return
        if self.stopping:
            ctx.metrics.rejected(request.project, outcome.SHUTTING_DOWN)
            ctx.reply(request, shaped(shape, SHUTTING_DOWN, False))
            return
        if not self._limiter.allow(key):
            log.warning("rate limit hit by session %s/%s", *key)
            ctx.metrics.rejected(request.project, outcome.RATE_LIMITED)
            ctx.reply(request, shaped(shape, RATE_LIMITED, False))
            return
        now = ctx.clock()
        turn = Turn(request, next(self._seq), now, shape=shape, stream=open_stream(
            request, ctx.topics, ctx.publish, ctx.config.skip_thinking,
            ctx.engine.tokenizer.opens_reasoning), acks=[ack])
        first = ctx.lanes.add(turn)
        if first is None:
            log.warning("queue full (%d requests): overloaded reply", ctx.config.max_queue)
            ctx.metrics.rejected(request.project, outcome.OVERLOADED)
            ctx.reply(request, shaped(shape, OVERLOADED, False))
            return
        ack.hold()  # from here on the turn's reply (TurnResults.finish) acknowledges the request
        if self.stopping:  # stop() may have listed the pending turns before this one came
            self._runner.results.finish(turn, SHUTTING_DOWN)
            return
        # Per request only DEBUG lines (here and when answered): an INFO line per request cost
        # the agent ~15% of its rate (docs/BENCHMARKS.md); the INFO stats line counts them.
        log.debug("request %d accepted: session %s/%s client %s", turn.seq, *key, request.client_id)
        debug_log.debug("request %d session %s/%s message: %r", turn.seq, *key, request.message)
        self._watcher.add(now + ctx.config.request_timeout, turn)
        if first:
            self._runner.start(turn)
