"""A request body of ``/v1/chat/completions`` or ``/v1/completions``, checked field by field
as OpenAI and vLLM define them, and made the core's ``GivenConversation``.

A field this server cannot honour and that would change the result (``logprobs``, a JSON
``response_format``, images, ``n`` > 1, penalties other than 0) is a 400 that names it;
fields that change nothing (``user``, ``frequency_penalty: 0``, ...) are accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core.outcome import GivenConversation
from agent.http.errors import ApiError, bad_request

MAX_STOPS, MAX_STOP_CHARS = 16, 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
# apply_chat_template's own parameters: not for chat_template_kwargs
_TEMPLATE_RESERVED = {"conversation", "messages", "tools", "documents", "chat_template",
                      "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                      "truncation", "max_length", "return_tensors", "return_dict",
                      "return_assistant_tokens_mask", "tokenizer_kwargs"}


@dataclass(frozen=True)
class ModelIds:
    """``served``: the model's own id (messages as given); each project's name is an id too
    (its system prompt where the messages have none, its defaults and output rules)."""

    served: str
    projects: tuple[str, ...]

    def all(self) -> list[str]:
        return [self.served, *(p for p in self.projects if p != self.served)]

    def resolve(self, model: object) -> tuple[str, bool]:
        """(the project that budgets it, whether the project's prompt, defaults and rules
        apply); 404 for an unknown id."""
        if not isinstance(model, str) or not model:
            raise bad_request("model must be a string: one of GET /v1/models", "model")
        if model in self.projects:
            return model, True
        if model == self.served:
            return self.projects[0], False
        raise ApiError(404, f"the model {model!r} does not exist; served: "
                       f"{', '.join(self.all())}", "invalid_request_error", "model_not_found",
                       "model")


@dataclass(frozen=True)
class Call:
    """One parsed request: what goes to the core, and how to answer."""

    model: str  # as the client named it: echoed in the response
    conversation: GivenConversation
    stream: bool
    include_usage: bool
    include_reasoning: bool
    rules: bool  # the project's output rules apply


def parse_chat(body: Any, models: ModelIds, default_prompt: Callable[[str], str],
               client: str) -> Call:
    data = _object(body)
    project, as_project = models.resolve(data.get("model"))
    _refuse_unsupported(data)
    messages = _messages(data.get("messages"))
    if as_project and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": default_prompt(project)})
    tools = _tools(data)
    extra = data.get("extra_body") if isinstance(data.get("extra_body"), dict) else {}
    kwargs = data.get("chat_template_kwargs", extra.get("chat_template_kwargs"))
    return _call(data, project, as_project, client,
                 messages=messages, tools=tools, template_kwargs=_template_kwargs(kwargs),
                 max_tokens=_first_int(data, ("max_completion_tokens", "max_tokens")))


def parse_completion(body: Any, models: ModelIds, client: str) -> Call:
    data = _object(body)
    project, as_project = models.resolve(data.get("model"))
    _refuse_unsupported(data)
    for name, allowed in (("echo", (None, False)), ("suffix", (None, "")),
                          ("best_of", (None, 1))):
        if data.get(name) not in allowed:
            raise bad_request(f"{name} is not supported", name)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("prompt must be a non-empty string (one prompt per request)", "prompt")
    return _call(data, project, as_project, client, prompt=prompt, raw=True,
                 max_tokens=_first_int(data, ("max_tokens",)))


def _call(data: dict, project: str, as_project: bool, client: str, **given: Any) -> Call:
    stream = _bool(data, "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    conversation = GivenConversation(
        project=project, as_project=as_project, client_id=client,
        temperature=_number(data, "temperature", 0.0, 2.0),
        top_p=_number(data, "top_p", 0.0, 1.0, low_open=True),
        seed=_seed(data), stop=_stop(data.get("stop")), **given)
    return Call(model=data["model"], conversation=conversation, stream=stream,
                include_usage=bool(stream and options and _bool(options, "include_usage")),
                include_reasoning=_bool(data, "include_reasoning"),
                rules=as_project and not given.get("raw", False))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _refuse_unsupported(data: dict) -> None:
    """400 for fields that would change the result and are not served."""
    n = data.get("n")
    if n not in (None, 1):
        raise bad_request("n must be 1: one choice per request", "n")
    if data.get("logprobs") not in (None, False) or data.get("top_logprobs") not in (None, 0):
        raise bad_request("logprobs are not supported", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported (only 0)", name)
    if data.get("logit_bias"):
        raise bad_request("logit_bias is not supported", "logit_bias")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request('response_format is not supported (only {"type": "text"})',
                          "response_format")
    if data.get("functions") is not None or data.get("function_call") is not None:
        raise bad_request("functions is not supported: use tools", "functions")
    modalities = data.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad_request("only text output is supported", "modalities")
    if data.get("audio") is not None:
        raise bad_request("audio is not supported", "audio")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list", "messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object", where)
    role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
    out: dict[str, Any] = {"role": role, "content": _content(message.get("content"), where)}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        out["tool_calls"] = _tool_calls_in_history(calls, where)
    elif out["content"] is None:
        raise bad_request(f"{where}.content must be a string or a list of text parts",
                          f"{where}.content")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def _content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts",
                          f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "image"):
            raise bad_request("this model does not accept images", f"{where}.content[{j}]")
        else:
            raise bad_request(f"{where}.content[{j}] must be a text part "
                              '({"type": "text", "text": ...})', f"{where}.content[{j}]")
    return "".join(texts)


def _tool_calls_in_history(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier tool calls, their ``arguments`` decoded for the chat template
    (as vLLM gives them to Qwen's and Llama's templates)."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}.tool_calls[{j}] must have function.name",
                              f"{where}.tool_calls[{j}]")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise bad_request(f"{where}.tool_calls[{j}].function.arguments is not JSON",
                                  f"{where}.tool_calls[{j}]") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(data: dict) -> list[dict[str, Any]] | None:
    choice = data.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad_request('tool_choice must be "auto" or "none"', "tool_choice")
    tools = data.get("tools")
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise bad_request('tools must be a list of {"type": "function", "function": {"name", '
                          '...}}', "tools")
    return tools or None


def _template_kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
    reserved = sorted(set(value) & _TEMPLATE_RESERVED)
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}",
                          "chat_template_kwargs")
    return dict(value)


def _first_int(data: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"{name} must be an integer >= 1", name)
        return value
    return None


def _number(data: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        raise bad_request(f"{name} must be a number in {'(' if low_open else '['}{low:g}, "
                          f"{high:g}]", name)
    return float(value)


def _seed(data: dict) -> int | None:
    value = data.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise bad_request("seed must be an integer in [0, 2^63)", "seed")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOPS} non-empty "
                          f"strings of at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def _bool(data: dict, name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", name)
    return value
