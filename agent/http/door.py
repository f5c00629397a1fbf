"""The HTTP door's work between the ASGI routes and the core: a parsed call goes to
``Conversation.submit_given``; its Outcome (or its stream of deltas) comes back across
threads into the event loop and becomes the OpenAI response.

A client that goes away (the stream's task is cancelled, or a waiting request sees the
disconnect) cancels its turn in the engine at once: its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from agent.core.conversation import Conversation
from agent.core.metrics import BAD_REQUEST
from agent.core.outcome import Outcome
from agent.core.reasoning import EMPTY_ANSWER, REASONING_CUT_OFF, AnswerFilter, split_completion
from agent.core.turns import Turn
from agent.http import responses
from agent.http.auth import ApiKeys
from agent.http.errors import ApiError, bad_request, from_core
from agent.http.requests import Call, ModelIds, parse_chat, parse_completion
from agent.http.tool_calls import parse as parse_tool_calls
from agent.http.tool_calls import parser_for

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[bool]]
POLL_S = 0.25  # how often a waiting (not streamed) request looks for its client
DOOR = "http"  # this front door's name in the metrics


class _Sink:
    """The core's DeltaSink for one stream: deltas into the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self._loop, self._queue = loop, queue

    def feed(self, delta: str) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ("delta", delta))

    def restart(self) -> None:  # only with output rules, which are not streamed incrementally
        pass


class HttpDoor:
    def __init__(self, core: Conversation, models: ModelIds, keys: ApiKeys) -> None:
        self.core = core
        self.models = models
        self.keys = keys

    # ---- the routes' calls ----

    def client(self, authorization: str | None, address: str) -> str:
        try:
            return self.keys.client(authorization, address)
        except ApiError:
            self.refused()
            raise

    async def chat(self, body: Any, client: str, disconnected: Disconnected
                   ) -> dict[str, Any] | AsyncIterator[str]:
        try:
            call = parse_chat(body, self.models, self.core.sessions.default_prompt, client)
            parser = self._tool_parser(call)
        except ApiError:
            self.refused()
            raise
        return await self._serve(call, disconnected, chat=True, parser=parser)

    async def completion(self, body: Any, client: str, disconnected: Disconnected
                         ) -> dict[str, Any] | AsyncIterator[str]:
        try:
            call = parse_completion(body, self.models, client)
        except ApiError:
            self.refused()
            raise
        return await self._serve(call, disconnected, chat=False, parser=None)

    def refused(self) -> None:
        """Counts a request the door refused itself (bad field, unknown model, key, size)."""
        self.core.metrics.rejected(None, BAD_REQUEST, door=DOOR)

    def _tool_parser(self, call: Call) -> str | None:
        if not call.conversation.tools:
            return None
        parser = parser_for(self.core.chat_template)
        if parser is None or not self.core.renders_tools:
            raise bad_request("this model's chat template does not support tools", "tools")
        return parser

    # ---- one call ----

    async def _serve(self, call: Call, disconnected: Disconnected, *, chat: bool,
                     parser: str | None) -> dict[str, Any] | AsyncIterator[str]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        incremental = call.stream and parser is None and not self._rules_apply(call)
        turn = self.core.submit_given(
            call.conversation,
            lambda outcome: loop.call_soon_threadsafe(queue.put_nowait, ("done", outcome)),
            _Sink(loop, queue) if incremental else None, door=DOOR)
        if turn is None:  # refused at admission: its outcome is on its way into the queue
            _, outcome = await queue.get()
            raise from_core(outcome.text)
        if call.stream:
            return self._stream(call, turn, queue, chat, parser, incremental)
        outcome = await self._outcome(turn, queue, disconnected)
        return self._complete(call, outcome, chat, parser)

    def _rules_apply(self, call: Call) -> bool:
        """A project's output rules change the reply after it was generated: such a reply is
        not streamed token by token."""
        spec = self.core.projects[call.conversation.project]
        return call.rules and spec.output_rules is not None

    async def _outcome(self, turn: Turn, queue: asyncio.Queue,
                       disconnected: Disconnected) -> Outcome:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if await disconnected():
                    self.core.cancel(turn)
                    raise ApiError(499, "the client went away", "server_error") from None
                continue
            if kind == "done":
                return value

    # ---- the answer ----

    def _answer(self, call: Call, outcome: Outcome, parser: str | None
                ) -> tuple[str, str | None, list, str]:
        """(content, reasoning, tool calls, finish reason), or ApiError for a failure. A reply
        that is all reasoning (cut off by max_tokens, or empty) is an answer with no content
        here, as OpenAI servers give it, not an error."""
        result = outcome.result
        if outcome.ok:
            text = outcome.text
        elif result is not None and outcome.text in (EMPTY_ANSWER, REASONING_CUT_OFF):
            text = ""
        else:
            raise from_core(outcome.text)
        reasoning = None
        if call.include_reasoning and result is not None:
            reasoning = (split_completion(result.text, self.core.prompt_opens_reasoning)[1]
                         if self.core.settings.skip_thinking else "")
        calls: list = []
        if parser is not None:
            content, calls = parse_tool_calls(text, parser)
            text = content or ""
        finish = "tool_calls" if calls else responses.finish_reason(result)
        return text, reasoning, calls, finish

    def _complete(self, call: Call, outcome: Outcome, chat: bool,
                  parser: str | None) -> dict[str, Any]:
        content, reasoning, calls, finish = self._answer(call, outcome, parser)
        if not chat:
            rid, created = responses.new_id("cmpl")
            return responses.text_completion(rid, created, call.model, content, finish,
                                             outcome.result)
        message: dict[str, Any] = {"role": "assistant",
                                   "content": content if content or not calls else None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [c.as_openai() for c in calls]
        rid, created = responses.new_id("chatcmpl")
        return responses.chat_completion(rid, created, call.model, message, finish,
                                         outcome.result)

    async def _stream(self, call: Call, turn: Turn, queue: asyncio.Queue, chat: bool,
                      parser: str | None, incremental: bool) -> AsyncIterator[str]:
        rid, created = responses.new_id("chatcmpl" if chat else "cmpl")
        model = call.model

        def chunk(delta: str | dict, finish: str | None = None) -> str:
            if chat:
                body = delta if isinstance(delta, dict) else {"content": delta}
                return responses.sse(responses.chat_chunk(rid, created, model, body, finish))
            return responses.sse(responses.text_chunk(rid, created, model, str(delta), finish))

        answer = AnswerFilter(self.core.settings.skip_thinking and chat,
                              self.core.prompt_opens_reasoning)
        finished = False
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    text = answer.feed(value)
                    if text:
                        yield chunk(text)
                    continue
                finished = True
                try:
                    content, reasoning, calls, finish = self._answer(call, value, parser)
                except ApiError as err:
                    yield responses.sse(err.body())
                    break
                rest = answer.flush() if incremental else content
                last: dict[str, Any] = {"content": rest} if rest else {}
                if chat and reasoning is not None:
                    last["reasoning_content"] = reasoning
                if calls:
                    last["tool_calls"] = [c.as_openai(i) for i, c in enumerate(calls)]
                yield chunk(last if chat else rest, finish)
                if call.include_usage:
                    yield responses.sse(responses.usage_chunk(
                        rid, created, model, "chat.completion.chunk" if chat else
                        "text_completion", value.result))
                break
            yield responses.DONE
        finally:
            if not finished:  # the client went away mid-stream
                self.core.cancel(turn)
                log.info("a stream's client went away: its request was cancelled")
