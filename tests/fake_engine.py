"""A fake engine with the real EngineProtocol surface and a real (tiny, byte-level BPE) tokenizer.

It answers on its own timer threads, like the real engine's loop thread; it
echoes the last user message unless told otherwise, records every prompt it
saw, streams the reply in small pieces to ``on_delta``, and can be slowed,
made to fail, or made to "think" first.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from functools import cache

from engine.api import GenerationRequest, GenerationResult
from engine.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_CORPUS = [
    "You are a helpful assistant. Answer the question of the user.",
    "Hello world! How are you today? I am fine, thank you.",
    "The maze has walls, germs and an exit; move up, down, left or right.",
    "turn one two three four five six seven eight nine ten session message reply",
]
_USER_RE = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


@cache
def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE with a ChatML template: any text encodes, counts are exact."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return Tokenizer(hf)


class MarkingTokenizer(Tokenizer):
    """Adds a token before every text it encodes (like a tokenizer that marks the start of
    its input): no split point of a prompt keeps the ids of tokenizing it whole."""

    def encode(self, text: str) -> list[int]:
        return [7, *super().encode(text)]


def user_turns(prompt: str) -> list[str]:
    """The user messages in a rendered ChatML prompt, oldest first."""
    return _USER_RE.findall(prompt)


def echo(prompt: str, request: GenerationRequest) -> str:
    return f"echo: {user_turns(prompt)[-1]}"


class FakeEngine:
    def __init__(
        self,
        reply: Callable[[str, GenerationRequest], str] = echo,
        delay: float = 0.0,
        max_model_len: int = 4096,
        budgets: dict[str, int] | None = None,
    ) -> None:
        self.tokenizer = tiny_tokenizer()
        self.max_model_len = max_model_len
        self.budgets = dict(budgets or {})
        self.reply = reply
        self.delay = delay  # seconds before each answer
        self.fail: str | None = None  # answer with finish_reason "error" and this message
        self.submit_error: Exception | None = None  # raised by submit()
        self.think: str | None = None  # "closed": "<think>..</think>answer"; "open": "..</think>answer"
        self.delta_chars = 3  # a request with on_delta gets the text in pieces this long first
        self.requests: list[GenerationRequest] = []
        self.prompts: list[str] = []  # decoded, special tokens kept
        self.cancelled: list[str] = []
        self.started = self.shut_down = False
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.shut_down = True
        with self._lock:
            timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()

    def stats(self) -> dict:
        return {"requests": len(self.requests), "running": len(self._timers)}

    def token_budget(self, project: str) -> int:
        return self.budgets.get(project, self.max_model_len)

    def submit(self, request: GenerationRequest) -> None:
        if self.submit_error is not None:
            raise self.submit_error
        prompt = self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)
        with self._lock:
            self.requests.append(request)
            self.prompts.append(prompt)
            timer = threading.Timer(self.delay, self._finish, (request, prompt))
            timer.daemon = True
            self._timers[request.request_id] = timer
        timer.start()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.cancelled.append(request_id)
            timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()

    def _finish(self, request: GenerationRequest, prompt: str) -> None:
        with self._lock:
            if self._timers.pop(request.request_id, None) is None:
                return  # cancelled
        n = len(request.prompt_token_ids)
        if self.fail is not None:
            request.on_done(GenerationResult(request.request_id, "", [], "error", n, error=self.fail))
            return
        text = self.reply(prompt, request)
        if self.think == "closed":
            text = f"<think>Let me think about it.</think>\n\n{text}"
        elif self.think == "open":
            text = f"The user wants something. Let me think.\n</think>\n\n{text}"
        ids = self.tokenizer.encode(text)
        finish = "stop"
        if len(ids) > request.sampling.max_tokens:  # cut off, as the real engine would
            ids, finish = ids[: request.sampling.max_tokens], "length"
            text = self.tokenizer.decode(ids)
        if request.on_delta is not None:
            for i in range(0, len(text), self.delta_chars):
                request.on_delta(text[i:i + self.delta_chars])
        request.on_done(GenerationResult(request.request_id, text, ids, finish, n))

    def user_turns(self, index: int = -1) -> list[str]:
        """The user turns of the ``index``-th prompt the engine saw."""
        return user_turns(self.prompts[index])


class InstantEngine(FakeEngine):
    """Answers ``pong`` inside ``submit``, on the caller's thread, and keeps nothing of the
    request (FakeEngine records each one): the agent's path with no engine time."""

    def submit(self, request: GenerationRequest) -> None:
        request.on_done(GenerationResult(request.request_id, "pong", [5], "stop",
                                         len(request.prompt_token_ids)))
