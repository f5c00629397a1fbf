"""One turn from admission to its end: the core's request path, in one class.

A front door parses a request and calls ``Conversation.submit`` with a ``deliver``
callback; the turn's one ``Outcome`` comes back through it. In between: a copy of an
answered request gets its reply again (agent.core.dedupe); shutdown, rate limit and
queue bound (each refusal delivered at once, nothing remembered); one turn in
flight per session, in arrival order; the prompt (system prompt, history, message)
trimmed to the budget and handed to the engine; the engine's result made into the
reply (reasoning split, output rules with one retry); the session recorded on
success; a deadline for every turn.

``submit`` runs on the front door's receiving thread and does only quick work there,
and, where that is quick too, starts the turn there: with the in-process session store
and a tokenizer that needs no lock, a prompt of at most ``INLINE_CHARS`` characters is
built and handed to the engine (a queue) on the spot. A thread hand-off costs more than
that work (bench/agent.py, docs/BENCHMARKS.md). Longer prompts, the Redis store and
engine results run on a pool of worker threads; a watcher thread ends turns that run past
``request_timeout`` and cancels their generation.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any

from agent.core import metrics as outcomes
from agent.core.deadlines import DeadlineWatcher
from agent.core.debug_log import debug_log
from agent.core.dedupe import AnsweredRequests, RequestKey, request_key
from agent.core.metrics import RequestMetrics
from agent.core.outcome import (
    CANCELLED,
    INTERNAL,
    OVERLOADED,
    RESET_REPLY,
    SHUTTING_DOWN,
    Deliver,
    DeltaSink,
    GivenConversation,
    Outcome,
    TurnRequest,
)
from agent.core.output_rules import RuleReviewer, retry_request
from agent.core.prompt_builder import PromptBuilder, PromptTooLong, prompt_limit
from agent.core.rate_limit import RATE_LIMITED, RateLimiter
from agent.core.reasoning import answer_of
from agent.core.sampling import reply_tokens, sampling_for
from agent.core.session_access import SessionAccess
from agent.core.sessions import MemorySessionStore, Session, SessionStore, resolve_system_prompt
from agent.core.settings import CoreSettings
from agent.core.turns import OnSent, SessionLanes, Turn
from engine.api import (
    EngineError,
    EngineProtocol,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from projects import ProjectSpec

log = logging.getLogger(__name__)

NO_DEFAULTS = ProjectSpec("", "")  # no generation defaults, no output rules

# Prompts up to this many characters are built on the receiving thread (well under a
# millisecond of tokenizing); longer ones on a worker, so that thread never stalls for long.
INLINE_CHARS = 8192


class Conversation:
    def __init__(
        self, *, settings: CoreSettings, engine: EngineProtocol, projects: dict[str, ProjectSpec],
        sessions: SessionAccess, lanes: SessionLanes, builder: PromptBuilder,
        limiter: RateLimiter, client_limiter: RateLimiter, answered: AnsweredRequests, rules: RuleReviewer, metrics: RequestMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.projects = projects
        self.sessions = sessions
        self.lanes = lanes
        self.metrics = metrics
        self._builder = builder
        self._limiter = limiter  # per session
        self._client_limiter = client_limiter
        self._answered = answered
        self._rules = rules
        self._clock = clock
        self._seq = itertools.count(1)
        self._tag = secrets.token_hex(3)  # engine request ids stay unique across cores
        self._pool = ThreadPoolExecutor(settings.num_workers, thread_name_prefix="agent-worker")
        # Starting a turn on the receiving thread needs a store without I/O, a tokenizer
        # without a lock.
        self._inline = isinstance(sessions.store, MemorySessionStore) and builder.lock_free
        self._local = threading.local()  # .submitting: the turn this thread hands the engine
        self._watcher = DeadlineWatcher(self.expire, clock, done=lambda turn: turn.answered)
        self.stopping = False  # new requests get the shutting-down reply
        self._closed = False  # stop(): no queued turn starts any more
        self._cancelling = threading.Lock()  # _cancel_generation: one cancel per generation

    # ---- the front doors' API ----

    def start(self) -> None:
        self._watcher.start()

    def submit(self, request: TurnRequest, deliver: Deliver, stream: DeltaSink | None = None,
               on_sent: OnSent | None = None, *, door: str, redelivery: bool = False,
               client: str | None = None, session_limit: bool = True) -> bool:
        """Admits ``request``; its one Outcome goes to ``deliver`` (a refusal at once, here).
        ``on_sent`` is called after that delivery; True: the core holds it (it is called
        later, maybe on another thread, or never: see ``redelivery``), False: the caller may
        call it as this returns. ``door``: the front door's name, for the metrics.
        ``redelivery``: the transport delivers the request again, to this process or the
        next, until ``on_sent`` is called (MQTT QoS 1 on a persistent session): once the core
        stops, such a request that has not started is left to it, neither answered nor
        acknowledged, instead of getting the shutting-down error. ``client``: who sent it, as
        the front door can tell (``""``: it cannot), for the per-client rate limit; None:
        only the session's limit applies. ``session_limit``: False for a request its door
        limits by a rule of its own (game states: agent.mqtt.state_gate)."""
        key = (request.project, request.session_id)
        if request.request_id:
            held = self._repeat(request, deliver, on_sent)
            if held is not None:
                return held
        if self.stopping:
            if redelivery and on_sent is not None:
                log.debug("stopping: a request of session %s/%s left to the broker", *key)
                return True  # never acknowledged: the broker keeps it for the next process
            return self._refuse(request, deliver, SHUTTING_DOWN, outcomes.SHUTTING_DOWN, door)
        limits = self._allow(key if session_limit else None,
                             None if client is None else (request.project, client))
        if limits is None:
            return self._refuse(request, deliver, RATE_LIMITED, outcomes.RATE_LIMITED, door)
        now = self._clock()
        turn = Turn(request, next(self._seq), now, deliver, door, stream,
                    self._timeout(request), on_sent=[] if on_sent is None else [on_sent],
                    redelivery=redelivery and on_sent is not None)
        first = self.lanes.add(turn)
        if first is None:
            log.warning("queue full (%d requests): overloaded reply", self.settings.max_queue)
            self._refund(limits)
            return self._refuse(request, deliver, OVERLOADED, outcomes.OVERLOADED, door)
        if self.stopping:  # stop() may have listed the pending turns before this one came
            self._end(turn)
            return True
        # Per request only DEBUG lines (here and when answered): an INFO line per request cost
        # the agent ~15% of its rate (docs/BENCHMARKS.md); the INFO stats line counts them.
        log.debug("request %d accepted: session %s/%s client %.200r", turn.seq, *key, request.client_id)
        debug_log.debug("request %d session %s/%s message: %r", turn.seq, *key, request.message)
        self._watcher.add(now + turn.timeout, turn)
        if first:
            self._start(turn)
        return True

    def _repeat(self, request: TurnRequest, deliver: Deliver,
                on_sent: OnSent | None) -> bool | None:
        """For a copy of an admitted request, what ``submit`` returns: True for one still
        being answered (its ``on_sent``, if any, waits for that answer), False for one
        answered with success (its reply is delivered again, here); else None."""
        project, session_id, request_id = request.project, request.session_id, request.request_id
        if self.lanes.attach(request, on_sent):
            log.info("request %.200r of session %.200r/%.200r delivered again while being "
                     "answered", request_id, project, session_id)
            return on_sent is not None
        # Kept before its turn gives up on_sent (finish): a copy that finds no turn above
        # finds the reply here.
        outcome = self._answered.reply_of(_request_key(request))
        if outcome is None:
            return None
        log.info("request %.200r of session %.200r/%.200r delivered again: its reply sent again",
                 request_id, project, session_id)
        _safely(deliver, outcome)
        return False

    def submit_given(self, request: GivenConversation, deliver: Deliver,
                     stream: DeltaSink | None = None, *, door: str) -> Turn | None:
        """Admits a conversation given whole (the HTTP door); its Outcome goes to ``deliver``
        (a refusal at once, here: then None). The rate limit counts per ``client_id``. The
        Turn returned is what ``cancel`` takes."""
        if self.stopping:
            self._refuse(request, deliver, SHUTTING_DOWN, outcomes.SHUTTING_DOWN, door)
            return None
        limits = self._allow(None, (request.project, request.client_id or ""))
        if limits is None:
            self._refuse(request, deliver, RATE_LIMITED, outcomes.RATE_LIMITED, door)
            return None
        seq, now = next(self._seq), self._clock()
        request = replace(request, session_id=f"#given-{seq}")  # a lane of its own
        turn = Turn(request, seq, now, deliver, door, stream, self._timeout(request))
        if self.lanes.add(turn) is None:
            log.warning("queue full (%d requests): overloaded reply", self.settings.max_queue)
            self._refund(limits)
            self._refuse(request, deliver, OVERLOADED, outcomes.OVERLOADED, door)
            return None
        if self.stopping:
            self.finish(turn, SHUTTING_DOWN)
            return turn
        log.debug("request %d accepted: a given conversation of project %s, client %.200r", seq,
                  request.project, request.client_id)
        self._watcher.add(now + turn.timeout, turn)
        self._spawn(self._run, turn)
        return turn

    def cancel(self, turn: Turn) -> None:
        """Ends ``turn`` (its client went away) and frees its place in the engine at once."""
        if self.finish(turn, CANCELLED):
            self._cancel_generation(turn)

    def refuse_new(self) -> None:
        """A graceful stop's first step: new requests get the shutting-down reply, the ones
        accepted before go on (``stop()`` answers whatever is left)."""
        self.stopping = True

    def stop(self) -> None:
        """Ends every pending turn, cancels their generation, stops threads. A turn that went
        to the engine gets the shutting-down error; one that did not and that its transport
        delivers again (``redelivery``) is left to it, unanswered."""
        self.stopping = self._closed = True
        left = 0
        for turn in self.lanes.unanswered():
            left += self._end(turn)
        if left:
            log.info("%d requests not started: left unacknowledged for the next process", left)
        self._watcher.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def template_problem(self, project: str, prompt: str) -> str | None:
        """Why ``prompt`` cannot be a system prompt of ``project`` (too many tokens for the
        prompt budget that a default-length reply leaves), or None. Checked when a template
        is set, so that the sender hears of it, not each new session's user."""
        limit = prompt_limit(self.settings.max_history_tokens, self.settings.max_tokens,
                             self.engine.token_budget(project), self.engine.max_model_len)
        tokens = len(self.engine.tokenizer.encode(prompt))
        if tokens >= limit:
            return (f"the template is too long: {tokens} tokens, and prompts of project "
                    f"{project} hold at most {limit} (system prompt, history and message)")
        return None

    @property
    def prompt_opens_reasoning(self) -> bool:
        """Whether the chat template opens ``<think>`` itself (the reply starts in reasoning)."""
        return self.engine.tokenizer.opens_reasoning

    @property
    def chat_template(self) -> str:
        """The model's chat template, for a front door that reads tool calls."""
        return self._builder.chat_template

    @property
    def renders_tools(self) -> bool:
        """Whether the model's chat template renders tools (tool calling works)."""
        return self._builder.renders_tools

    def stats(self) -> dict:
        return {"pending": self.lanes.pending, "output_rules": self._rules.counts()}

    # ---- admission ----

    def _timeout(self, request: TurnRequest) -> float:
        """The request's own deadline (``timeoutS``), within ``request_timeout``."""
        own = request.timeout_s
        limit = self.settings.request_timeout
        return limit if own is None else min(own, limit)

    def _allow(self, session: tuple[str, str] | None,
               client: tuple[str, str] | None) -> list[tuple[RateLimiter, tuple]] | None:
        """Counts a request against its session's and its client's rate limits (those that
        are not None); None if one refuses it (then neither counts it). Returns what
        ``_refund`` takes back if the request is refused later."""
        counted: list[tuple[RateLimiter, tuple]] = []
        for limiter, key, whose in ((self._limiter, session, "session"),
                                    (self._client_limiter, client, "client")):
            if key is None:
                continue
            if not limiter.allow(key):
                log.warning("rate limit hit by %s %.200r of project %s", whose, key[1], key[0])
                self._refund(counted)
                return None
            counted.append((limiter, key))
        return counted

    @staticmethod
    def _refund(counted: list[tuple[RateLimiter, tuple]]) -> None:
        for limiter, key in counted:
            limiter.refund(key)

    def _end(self, turn: Turn) -> bool:
        """Ends a turn because the core stops; True if it was left to its transport."""
        if turn.redelivery and turn.generation is None and turn.result is None:
            if self.lanes.claim(turn):  # no reply, no on_sent: the broker delivers it again
                self.lanes.take_on_sent(turn)
                self.lanes.advance(turn)
                return True
            return False
        if self.finish(turn, SHUTTING_DOWN):
            self._cancel_generation(turn)
        return False

    def _refuse(self, request: TurnRequest, deliver: Deliver, text: str, reason: str,
                door: str) -> bool:
        self.metrics.rejected(request.project, reason, door=door)
        _safely(deliver, Outcome(text, False, admitted=False))
        return False

    def _start(self, turn: Turn) -> None:
        """Starts the turn at the head of its lane: here if that is quick, else on a worker."""
        if self._inline:
            self._guarded(self._run, turn, True)
        else:
            self._spawn(self._run, turn)

    def _spawn(self, fn: Callable[..., None], turn: Turn, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # shut down: stop() answered every turn
            self._pool.submit(self._guarded, fn, turn, *args)

    def _guarded(self, fn: Callable[..., None], turn: Turn, *args: Any) -> None:
        try:
            fn(turn, *args)
        except Exception:
            log.exception("request %d failed", turn.seq)
            self.finish(turn, INTERNAL)

    # ---- the prompt, to the engine ----

    def _run(self, turn: Turn, inline: bool = False) -> None:
        """Builds the prompt and submits it; ``inline`` (on the receiving thread): only a short
        one, else the turn goes to a worker."""
        if turn.answered:
            return
        req, spec, settings = turn.request, self.projects[turn.request.project], self.settings
        if isinstance(req, GivenConversation):
            self._run_given(turn, req, spec if req.as_project else NO_DEFAULTS)
            return
        if req.reset:
            self._reset(turn)
            return
        session = self.sessions.read(turn)
        system_prompt = resolve_system_prompt(req.system_prompt, session,
                                              self.sessions.default_prompt(req.project))
        turns = session.turns if session else []
        if inline and len(system_prompt) + len(req.message) + sum(
                len(u) + len(a) for u, a in turns) > INLINE_CHARS:
            self._spawn(self._run, turn)
            return
        max_tokens = reply_tokens(req, spec, settings)
        limit = prompt_limit(settings.max_history_tokens, max_tokens,
                             self.engine.token_budget(req.project), self.engine.max_model_len)
        try:
            prompt = self._builder.build(system_prompt, turns, req.message, limit)
        except PromptTooLong as exc:
            self.finish(turn, str(exc))
            return
        turn.history = Session(system_prompt, turns[prompt.first_turn:])
        self._generate(turn, self._generation(
            turn, prompt.token_ids, sampling_for(req, spec, settings, max_tokens),
            {"session_id": req.session_id, "client_id": req.client_id}))

    def _run_given(self, turn: Turn, req: GivenConversation, spec: ProjectSpec) -> None:
        """A conversation given whole: its prompt as it is, ``max_tokens`` within what fits."""
        settings = self.settings
        try:
            ids = self._builder.given(req.messages, req.prompt, req.tools, req.template_kwargs)
        except ValueError as exc:
            self.finish(turn, f"Error: {exc}")
            return
        room = min(self.engine.token_budget(req.project), self.engine.max_model_len)
        if len(ids) >= room:
            self.finish(turn, f"Error: the prompt is too long ({len(ids)} tokens; at most "
                              f"{room - 1} fit with one to generate)")
            return
        max_tokens = min(reply_tokens(req, spec, settings), room - len(ids))
        sampling = sampling_for(req, spec, settings, max_tokens, req.stop, req.seed)
        self._generate(turn, self._generation(turn, ids, sampling, {"client_id": req.client_id}))

    def _generation(self, turn: Turn, token_ids: list[int], sampling: SamplingParams,
                    metadata: dict) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"{self._tag}-{turn.seq}", prompt_token_ids=token_ids, sampling=sampling,
            on_done=partial(self._on_done, turn),
            on_delta=turn.stream.feed if turn.stream is not None else None,
            project=turn.request.project, metadata=metadata,
        )

    def _generate(self, turn: Turn, generation: GenerationRequest) -> None:
        turn.engine_id, turn.generation = generation.request_id, generation
        outer, self._local.submitting = getattr(self._local, "submitting", None), turn
        try:
            self.engine.submit(generation)
        except EngineError as exc:
            self.finish(turn, f"Error: {exc}")
            return
        finally:
            self._local.submitting = outer
        if turn.answered:  # timed out, cancelled or shut down meanwhile
            self._cancel_generation(turn, generation.request_id)

    def _reset(self, turn: Turn) -> None:
        """A reset request: forgets the session (history, system prompt) in its lane's order."""
        with self.sessions.changing(*turn.key) as store:
            store.delete(turn.key)
        log.info("request %d: session %s/%s reset", turn.seq, *turn.key)
        self.finish(turn, RESET_REPLY, ok=True)

    # ---- the engine's result, to the reply ----

    def _cancel_generation(self, turn: Turn, only: str | None = None) -> None:
        """Cancels the turn's generation in the engine, once: the thread that answers the
        turn and the one that submitted it may both get here (``only``: if it is that one)."""
        with self._cancelling:
            engine_id = turn.engine_id
            if engine_id is None or (only is not None and engine_id != only):
                return
            turn.engine_id = None
        self.engine.cancel(engine_id)

    def _on_done(self, turn: Turn, result: GenerationResult) -> None:
        """The engine's ``on_done``. From the engine's thread, the result goes to a worker; an
        engine that answers inside ``submit`` (an instant or failing one) is served on the
        spot, on the thread that submitted: one thread hand-off less."""
        if getattr(self._local, "submitting", None) is turn:
            self._guarded(self._on_result, turn, result)
        else:
            self._spawn(self._on_result, turn, result)

    def _on_result(self, turn: Turn, result: GenerationResult) -> None:
        turn.engine_id = None  # the engine is done with it: nothing to cancel
        if turn.answered:  # timed out or shut down meanwhile: nothing to send, nothing to retry
            return
        turn.result = result
        given = turn.request if isinstance(turn.request, GivenConversation) else None
        if given is not None and given.raw:
            failed = result.finish_reason == "error" or result.error
            text, error = result.text, (f"Error: {result.error or 'generation failed'}"
                                        if failed else None)
        else:
            text, error = answer_of(result, self.settings.skip_thinking,
                                    self.engine.tokenizer.opens_reasoning)
        if error is not None:
            if result.error:
                log.warning("request %d: engine error: %s", turn.seq, result.error)
            self.finish(turn, error)
            return
        rules = self.projects[turn.request.project].output_rules
        if given is not None and (given.raw or not given.as_project):
            rules = None  # the model's own text
        if rules is not None and turn.generation is not None:
            reviewed = self._rules.review(turn.request.project, rules, text, turn.seq,
                                          not turn.retried)
            if reviewed is None:  # broke its rules: once more
                turn.retried = True
                if turn.stream is not None:
                    turn.stream.restart()
                self._generate(turn, retry_request(turn.generation))
                return
            text = reviewed
        if turn.history is None:  # a conversation given whole: no session to record
            self.finish(turn, text, ok=True)
            return
        history = Session(turn.history.system_prompt,
                          turn.history.turns + [(turn.request.message, text)])
        if self.finish(turn, text, history):
            log.debug(
                "request %d answered: session %s/%s client %.200r, %d prompt + %d completion tokens, "
                "%.2f s", turn.seq, *turn.key, turn.request.client_id, result.prompt_tokens,
                len(result.token_ids), self._clock() - turn.accepted_at,
            )
            debug_log.debug("request %d reply: %r", turn.seq, text)

    def finish(self, turn: Turn, text: str, history: Session | None = None,
               ok: bool | None = None) -> bool:
        """Ends ``turn`` unless it ended already; the session changes only on success. ``ok``
        (default: ``history`` was given) tells a reply from an error. Any thread."""
        if not self.lanes.claim(turn):
            return False
        # Its on_done refers back to the turn: without this cycle, reference counting frees
        # the turn as soon as it is answered, not the cyclic GC later (docs/BENCHMARKS.md).
        turn.generation = None
        ok = history is not None if ok is None else ok
        if history is not None:
            self.sessions.record(turn, history)
        outcome = Outcome(text, ok, turn.result)
        _safely(turn.deliver, outcome)
        if ok and turn.request.request_id:  # kept before on_sent goes: see _repeat
            self._answered.remember(_request_key(turn.request), outcome)
        for on_sent in self.lanes.take_on_sent(turn):
            on_sent()
        self.metrics.answered(turn.request.project, ok, self._clock() - turn.accepted_at,
                              door=turn.door)
        following = self.lanes.advance(turn)
        if following is not None and not self._closed:  # closed: stop() ends it
            self._spawn(self._run, following)
        return True

    def expire(self, turn: Turn) -> None:
        """The deadline watcher's callback: ends a turn past its timeout (``timeoutS`` or
        ``request_timeout``); its late answer, if any, is not delivered."""
        if turn.answered:
            return
        log.warning("request %d of session %s/%s timed out", turn.seq, *turn.key)
        reply = f"Error: no answer within {turn.timeout:g} s. Please try again."
        if self.finish(turn, reply):
            self._cancel_generation(turn)


def _request_key(request: TurnRequest) -> RequestKey:
    return request_key(request.project, request.session_id, request.request_id or "",
                       request.message)


def _safely(deliver: Deliver, outcome: Outcome) -> None:
    """A front door's failure to deliver must not leave the turn's lane stuck."""
    try:
        deliver(outcome)
    except Exception:
        log.exception("delivering a result failed")


def build_conversation(settings: CoreSettings, engine: EngineProtocol,
                       projects: dict[str, ProjectSpec], store: SessionStore,
                       clock: Callable[[], float] = time.monotonic) -> Conversation:
    """The core with its parts made from ``settings``."""
    lanes = SessionLanes(settings.max_queue)
    return Conversation(
        settings=settings, engine=engine, projects=projects,
        sessions=SessionAccess(store, lanes, projects), lanes=lanes,
        builder=PromptBuilder(engine.tokenizer),
        limiter=RateLimiter(settings.max_requests_per_session, settings.rate_limit_window,
                            clock=clock),
        client_limiter=RateLimiter(settings.max_requests_per_client, settings.rate_limit_window,
                                   clock=clock),
        answered=AnsweredRequests(max(600.0, 2 * settings.request_timeout), clock=clock),
        rules=RuleReviewer(), metrics=RequestMetrics(clock), clock=clock,
    )
