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
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from agent import metrics as outcome
from agent.acks import NO_ACK, Ack
from agent.config import AgentConfig
from agent.deadlines import DeadlineWatcher
from agent.debug_log import debug_log
from agent.dedupe import Deduper
from agent.envelope import Envelope, error_envelope
from agent.lanes import INTERNAL, OVERLOADED, SHUTTING_DOWN, SessionLanes, Shape, Turn, shaped
from agent.metrics import RequestMetrics
from agent.options import RESET, RESET_REPLY
from agent.output_rules import RuleReviewer, retry_request
from agent.prompt_builder import PromptBuilder, PromptTooLong, prompt_limit
from agent.protocol import ChatRequest, ProtocolError, RequestParser
from agent.rate_limit import RATE_LIMITED, RateLimiter
from agent.reasoning import answer_of
from agent.sessions import MemorySessionStore, Session, SessionStore, resolve_system_prompt
from agent.streaming import open_stream
from agent.topics import Topics
from agent.v5 import apply_v5, apply_v5_to_error
from engine.api import (
    EngineError,
    EngineProtocol,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from projects import ProjectSpec

log = logging.getLogger(__name__)

Publish = Callable[..., None]  # (topic, payload); part C adds qos= and correlation=
# Prompts up to this many characters are built on the MQTT thread (well under a millisecond
# of tokenizing); longer ones on a worker, so that the MQTT thread never stalls for long.
INLINE_CHARS = 8192


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
        self._clock = clock
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
        self.default_prompts: dict[str, str] = {}  # set by P/template without a session
        self._store_lock = threading.Lock()  # reading a session for a turn vs. changing it
        self._seq = itertools.count(1)
        self._tag = secrets.token_hex(3)  # engine request ids stay unique across routers
        self._stopping = False
        self._watcher = DeadlineWatcher(self._expire, clock, done=lambda turn: turn.answered)
        self._pool = ThreadPoolExecutor(config.num_workers, thread_name_prefix="agent-worker")
        # Starting a turn on the MQTT thread needs a store without I/O, a tokenizer without lock.
        self._inline = isinstance(self.store, MemorySessionStore) and self.builder.lock_free
        self._local = threading.local()  # .submitting: the turn this thread is handing the engine

    def start(self) -> None:
        self._watcher.start()

    # ---- hooks for the other topics (control, maze state, legacy) ----

    def default_prompt(self, project: str) -> str:
        """The system prompt of new sessions of ``project``."""
        return self.default_prompts.get(project) or self.projects[project].system_prompt

    @contextlib.contextmanager
    def changing_sessions(self, project: str, session_id: str | None = None) -> Iterator[SessionStore]:
        """The store, to change a session (every session of ``project`` for None) so that no
        turn in flight writes its older copy back over the change."""
        with self._store_lock:
            yield self.store
            self.lanes.mark_stale(project, session_id)

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
            self._reject(apply_v5_to_error(err, properties, self.topics))
            return
        self.submit(apply_v5(request, properties, self.topics), ack=ack)

    def _reject(self, err: ProtocolError) -> None:
        if err.session_id and err.request_id and self.deduper.seen(
            (err.project, err.session_id, err.request_id)
        ):
            return
        self.metrics.rejected(err.project, outcome.BAD_REQUEST)
        if err.reply_topic is None:
            log.warning("bad request for project %s and no reply topic: %s", err.project, err.reply)
            return
        log.warning("bad request for project %s session %s: %s", err.project, err.session_id, err.reply)
        self.publish(err.reply_topic, error_envelope(err) or err.reply,
                     correlation=err.correlation_data)

    def submit(self, request: ChatRequest, shape: Shape | None = None, ack: Ack = NO_ACK) -> None:
        """Admits a request (also one from another topic); ``shape`` makes the payload of its
        reply or error from the text (None: the text itself). ``ack``: see handle_message."""
        if shape is None and request.options.json:
            shape = Envelope(request, self.config.skip_thinking,
                             self.engine.tokenizer.opens_reasoning)
        key = (request.project, request.session_id)
        if request.request_id and self.deduper.seen(key + (request.request_id,)):
            # Delivered again (QoS 1 DUP after a reconnect) while still being answered: its
            # acknowledgement waits for that answer.
            if self.lanes.attach(key, request.request_id, ack):
                ack.hold()
            log.info("duplicate request %s of session %s/%s ignored", request.request_id, *key)
            return
        if self._stopping:
            self.metrics.rejected(request.project, outcome.SHUTTING_DOWN)
            self._reply(request, shaped(shape, SHUTTING_DOWN, False))
            return
        if not self.limiter.allow(key):
            log.warning("rate limit hit by session %s/%s", *key)
            self.metrics.rejected(request.project, outcome.RATE_LIMITED)
            self._reply(request, shaped(shape, RATE_LIMITED, False))
            return
        now = self._clock()
        turn = Turn(request, next(self._seq), now, shape=shape, stream=open_stream(
            request, self.topics, self.publish, self.config.skip_thinking,
            self.engine.tokenizer.opens_reasoning), acks=[ack])
        first = self.lanes.add(turn)
        if first is None:
            log.warning("queue full (%d requests): overloaded reply", self.config.max_queue)
            self.metrics.rejected(request.project, outcome.OVERLOADED)
            self._reply(request, shaped(shape, OVERLOADED, False))
            return
        ack.hold()  # from here on the turn's reply (_finish) acknowledges the request
        if self._stopping:  # stop() may have listed the pending turns before this one came
            self._finish(turn, SHUTTING_DOWN)
            return
        # Per request only DEBUG lines (here and when answered): an INFO line per request cost
        # the agent ~15% of its rate (docs/BENCHMARKS.md); the INFO stats line counts them.
        log.debug("request %d accepted: session %s/%s client %s", turn.seq, *key, request.client_id)
        debug_log.debug("request %d session %s/%s message: %r", turn.seq, *key, request.message)
        self._watcher.add(now + self.config.request_timeout, turn)
        if first and self._inline:
            self._guarded(self._run, turn, True)
        elif first:
            self._spawn(self._run, turn)

    # ---- worker threads ----

    def _spawn(self, fn: Callable[..., None], turn: Turn, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # shut down: stop() answered every turn
            self._pool.submit(self._guarded, fn, turn, *args)

    def _guarded(self, fn: Callable[..., None], turn: Turn, *args: Any) -> None:
        try:
            fn(turn, *args)
        except Exception:
            log.exception("request %d failed", turn.seq)
            self._finish(turn, INTERNAL)

    def _deliver(self, turn: Turn, result: GenerationResult) -> None:
        """The engine's ``on_done``. From the engine's thread, the result goes to a worker; an
        engine that answers inside ``submit`` (an instant or failing one) is served on the spot,
        on the worker that submitted: one thread hand-off less."""
        if getattr(self._local, "submitting", None) is turn:
            self._guarded(self._on_result, turn, result)
        else:
            self._spawn(self._on_result, turn, result)

    def _run(self, turn: Turn, inline: bool = False) -> None:
        """Builds the prompt and submits it; ``inline`` (on the MQTT thread): only a short one,
        else the turn goes to a worker."""
        if turn.answered:
            return
        req, spec = turn.request, self.projects[turn.request.project]
        if req.options.command == RESET:
            self._reset(turn)
            return
        with self._store_lock:
            turn.stale = False  # only changes made after this read make the turn stale
            session = self.store.get(turn.key)
        system_prompt = resolve_system_prompt(req.system_prompt, session, self.default_prompt(req.project))
        turns = session.turns if session else []
        if inline and len(system_prompt) + len(req.message) + sum(
                len(u) + len(a) for u, a in turns) > INLINE_CHARS:
            self._spawn(self._run, turn)
            return
        max_tokens = min(req.max_tokens or spec.max_tokens or self.config.max_tokens, self.config.max_tokens)
        limit = prompt_limit(
            self.config.max_history_tokens, max_tokens,
            self.engine.token_budget(req.project), self.engine.max_model_len,
        )
        try:
            prompt = self.builder.build(system_prompt, turns, req.message, limit)
        except PromptTooLong as exc:
            self._finish(turn, str(exc))
            return
        turn.history = Session(system_prompt, turns[prompt.first_turn:])
        temperature = req.temperature if req.temperature is not None else spec.temperature
        top_p = req.top_p if req.top_p is not None else spec.top_p
        sampling = SamplingParams(
            temperature=self.config.temperature if temperature is None else temperature,
            top_p=self.config.top_p if top_p is None else top_p,
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
            self.engine.submit(generation)
        except EngineError as exc:
            self._finish(turn, f"Error: {exc}")
            return
        finally:
            self._local.submitting = outer
        if turn.answered and turn.engine_id == generation.request_id:
            self.engine.cancel(generation.request_id)  # timed out (or shut down) meanwhile

    def _on_result(self, turn: Turn, result: GenerationResult) -> None:
        turn.engine_id = None  # the engine is done with it: nothing to cancel
        if turn.answered:  # timed out or shut down meanwhile: nothing to send, nothing to retry
            return
        if isinstance(turn.shape, Envelope):
            turn.shape.result = result
        text, error = answer_of(result, self.config.skip_thinking, self.engine.tokenizer.opens_reasoning)
        if error is not None:
            if result.error:
                log.warning("request %d: engine error: %s", turn.seq, result.error)
            self._finish(turn, error)
            return
        rules = self.projects[turn.request.project].output_rules
        if rules is not None and turn.generation is not None:
            reviewed = self.rules.review(turn.request.project, rules, text, turn.seq, not turn.retried)
            if reviewed is None:  # broke its rules: once more
                turn.retried = True
                if turn.stream is not None:
                    turn.stream.restart()
                self._generate(turn, retry_request(turn.generation))
                return
            text = reviewed
        assert turn.history is not None
        history = Session(turn.history.system_prompt, turn.history.turns + [(turn.request.message, text)])
        if self._finish(turn, text, history):
            log.debug(
                "request %d answered: session %s/%s client %s, %d prompt + %d completion tokens, "
                "%.2f s", turn.seq, *turn.key, turn.request.client_id, result.prompt_tokens,
                len(result.token_ids), self._clock() - turn.accepted_at,
            )
            debug_log.debug("request %d reply: %r", turn.seq, text)

    # ---- any thread ----

    def _finish(self, turn: Turn, reply: str, history: Session | None = None,
                ok: bool | None = None) -> bool:
        """Answers ``turn`` unless it was answered already; the session changes only on success.
        ``ok`` (default: ``history`` was given) tells a reply from an error."""
        if not self.lanes.claim(turn):
            return False
        ok = history is not None if ok is None else ok
        with self._store_lock:
            if history is not None and not turn.stale:
                self.store.put(turn.key, history)
        if turn.stream is not None:
            turn.stream.close()  # the stream's last message goes before the reply
        self._reply(turn.request, shaped(turn.shape, reply, ok))
        for ack in self.lanes.take_acks(turn):
            ack()
        self.metrics.answered(turn.request.project, ok, self._clock() - turn.accepted_at)
        following = self.lanes.advance(turn)
        if following is not None:
            self._spawn(self._run, following)
        return True

    def _reset(self, turn: Turn) -> None:
        """``command: reset``: forgets the session (history, system prompt) in its lane's order."""
        with self.changing_sessions(*turn.key) as store:
            store.delete(turn.key)
        log.info("request %d: session %s/%s reset", turn.seq, *turn.key)
        self._finish(turn, RESET_REPLY, ok=True)

    def _expire(self, turn: Turn) -> None:
        if turn.answered:
            return
        log.warning("request %d of session %s/%s timed out", turn.seq, *turn.key)
        reply = f"Error: no answer within {self.config.request_timeout:g} s. Please try again."
        if self._finish(turn, reply) and turn.engine_id:
            self.engine.cancel(turn.engine_id)

    def _reply(self, request: ChatRequest, payload: str) -> None:
        self.publish(request.reply_topic, payload, correlation=request.correlation_data)

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
        self._stopping = True

    def stop(self) -> None:
        """Answers every pending request (shutting down), cancels their generation, stops threads."""
        self._stopping = True
        for turn in self.lanes.unanswered():
            if self._finish(turn, SHUTTING_DOWN) and turn.engine_id:
                self.engine.cancel(turn.engine_id)
        self._watcher.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

