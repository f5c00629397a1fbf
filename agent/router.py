"""The per-request pipeline: admission, one turn in flight per session, one reply per request.

``handle_message`` runs on the MQTT thread and does only quick work (parse,
dedupe, rate limit, queue bound) and, where that is quick too, starts the turn
there: with the in-process session store and a tokenizer that needs no lock, a
prompt of at most ``INLINE_CHARS`` characters (system prompt, history, message)
is built and handed to the engine (a queue) on the MQTT thread. A thread
hand-off costs more than that work (bench/agent.py, docs/BENCHMARKS.md). Longer
prompts, the Redis store, engine callbacks and publishing run on a pool of
worker threads; a watcher thread answers requests that run past
``request_timeout`` and cancels their generation.

The Router wires the parts, each in its own module: agent.admission (the checks on
the MQTT thread), agent.turn_runner (prompt and engine submit, inline or on a worker),
agent.turn_results (reply, session update, acks), agent.pipeline (what they share).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from agent.acks import NO_ACK, Ack
from agent.admission import Admission
from agent.config import AgentConfig
from agent.deadlines import DeadlineWatcher
from agent.dedupe import Deduper
from agent.lanes import OVERLOADED, SHUTTING_DOWN, SessionLanes, Shape
from agent.metrics import RequestMetrics
from agent.output_rules import RuleReviewer
from agent.pipeline import Pipeline, Publish
from agent.prompt_builder import PromptBuilder
from agent.protocol import ChatRequest, ProtocolError, RequestParser
from agent.rate_limit import RateLimiter
from agent.sessions import MemorySessionStore, SessionStore
from agent.topics import Topics
from agent.turn_runner import INLINE_CHARS, TurnRunner
from agent.v5 import apply_v5, apply_v5_to_error
from engine.api import EngineProtocol
from projects import ProjectSpec

__all__ = ["INLINE_CHARS", "OVERLOADED", "SHUTTING_DOWN", "Publish", "Router"]

log = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        config: AgentConfig,
        engine: EngineProtocol,
        projects: dict[str, ProjectSpec],
        topics: Topics,
        publish: Publish,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.engine = engine
        self.projects = projects
        self.topics = topics
        self._publish_raw = publish
        self.parser = RequestParser(topics, config.max_payload_bytes, config.max_tokens)
        self.builder = PromptBuilder(engine.tokenizer)
        self.store: SessionStore = store if store is not None else MemorySessionStore(
            config.max_concurrent_sessions, config.session_timeout, clock
        )
        self.limiter = RateLimiter(config.max_requests_per_session, config.rate_limit_window, clock=clock)
        self.deduper = Deduper(max(600.0, 2 * config.request_timeout), clock=clock)
        self.lanes = SessionLanes(config.max_queue)
        self.rules = RuleReviewer()
        self.metrics = RequestMetrics(clock)
        self._ctx = Pipeline(config, engine, projects, topics, self.store, self.lanes,
                             self.metrics, clock, self.publish)
        self.default_prompts = self._ctx.default_prompts  # set by P/template without a session
        self._runner = TurnRunner(self._ctx, self.builder, self.rules)
        self._watcher = DeadlineWatcher(self._runner.results.expire, clock,
                                        done=lambda turn: turn.answered)
        self._admission = Admission(self._ctx, self._runner, self.deduper, self.limiter,
                                    self._watcher)

    def start(self) -> None:
        self._watcher.start()

    # ---- hooks for the other topics (control, maze state, legacy) ----

    def default_prompt(self, project: str) -> str:
        """The system prompt of new sessions of ``project``."""
        return self._ctx.default_prompt(project)

    def changing_sessions(self, project: str,
                          session_id: str | None = None) -> AbstractContextManager[SessionStore]:
        """The store, to change a session (every session of ``project`` for None) so that no
        turn in flight writes its older copy back over the change."""
        return self._ctx.changing_sessions(project, session_id)

    def stats(self) -> dict:
        return {"pending": self.lanes.pending, "output_rules": self.rules.counts()}

    # ---- MQTT thread: quick checks, then hand off ----

    def handle_message(self, topic: str, payload: bytes, properties: Any = None,
                       ack: Ack = NO_ACK) -> None:
        """``properties``: an MQTT v5 request's (Response Topic, Correlation Data), or None.
        ``ack``: held by the turn if one is accepted (sent after its reply), else left to the
        caller, who sends it once this returns (every other path has replied by then)."""
        project = self.topics.project_of(topic)
        if project is None:
            log.warning("ignoring a message on unexpected topic %.200r", topic)
            return
        try:
            request = self.parser.parse(project, payload)
        except ProtocolError as err:
            self._admission.reject(apply_v5_to_error(err, properties, self.topics))
            return
        self.submit(apply_v5(request, properties, self.topics), ack=ack)

    def submit(self, request: ChatRequest, shape: Shape | None = None, ack: Ack = NO_ACK) -> None:
        """Admits a request (also one from another topic); ``shape`` makes the payload of its
        reply or error from the text (None: the text itself). ``ack``: see handle_message."""
        self._admission.submit(request, shape, ack)

    # ---- any thread ----

    def publish(self, topic: str, payload: str, *, qos: int = 1,
                correlation: bytes | None = None) -> None:
        """Publishes unless ``topic`` is a request, control or invalid topic; ``qos`` 0 for
        stream messages, ``correlation``: MQTT v5 Correlation Data to echo (part C)."""
        if not self.topics.publishable(topic):
            log.error("refusing to publish on %.200r (a request, control or invalid topic)", topic)
            return
        try:
            if qos == 1 and correlation is None:
                self._publish_raw(topic, payload)
            else:
                self._publish_raw(topic, payload, qos=qos, correlation=correlation)
        except Exception:
            log.exception("publishing on %.200r failed", topic)

    def refuse_new(self) -> None:
        """A graceful stop's first step: new requests get the shutting-down reply, the ones
        accepted before go on (``stop()`` answers whatever is left)."""
        self._admission.stopping = True

    def stop(self) -> None:
        """Answers every pending request (shutting down), cancels their generation, stops threads."""
        self._admission.stopping = True
        for turn in self.lanes.unanswered():
            if self._runner.results.finish(turn, SHUTTING_DOWN) and turn.engine_id:
                self.engine.cancel(turn.engine_id)
        self._watcher.stop()
        self._runner.shutdown()
