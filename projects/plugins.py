"""Project plug-ins: topics a project serves beside chat, and what it does on control topics.

A project's YAML names a module of this package (``plugin: maze_plugin``) that defines

- ``REQUESTS``: names of request topics of its own, ``<prefix><project>/<name>`` (maze:
  ``("state",)``);
- ``REPLIES``: names of reply trees of its own, ``<prefix><project>/<name>/...`` (maze:
  ``("hint",)``), where clients may have their answers sent;
- ``make_plugin(host) -> Plugin``: the plug-in, given its ``PluginHost`` (the MQTT door).

The door subscribes to the request topics, hands each message to ``Plugin.handle`` and
calls the ``Plugin``'s control hooks after a template, clear or delete of the project.
Nothing here knows MQTT or the agent: the host offers what a plug-in may do.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# Topic names every project has (chat and control): no plug-in may take them.
RESERVED = frozenset({"user_input", "assistant_response", "template", "clear_history",
                      "delete_session"})


@dataclass(frozen=True)
class Answer:
    """A turn's end as a plug-in's ``shape`` sees it: ``text`` is the reply or, without ``ok``,
    the error's text; ``empty``: the model said nothing (an error, unless the plug-in
    makes something of it)."""

    text: str
    ok: bool
    empty: bool = False


Shape = Callable[[Answer], str]  # an answer -> the payload to publish


class PluginHost(Protocol):
    """What the door offers one project's plug-in."""

    project: str
    max_payload_bytes: int
    max_sessions: int  # sessions kept per project ...
    session_timeout: float  # ... and how long an idle one is kept

    def topic(self, name: str) -> str:
        """``<prefix><project>/<name>``."""
        ...

    def session_problem(self, session_id: str) -> str | None:
        """Why ``session_id`` cannot name a session (None: it can)."""
        ...

    def confine(self, root: str, requested: object, default: str) -> str:
        """``requested`` if it is an allowed reply topic under ``root``, else ``default``."""
        ...

    def ask(self, *, session_id: str, message: str, reply_topic: str, shape: Shape,
            system_prompt: str | None = None, client_id: str | None = None,
            request_id: str | None = None, ack: Any = None) -> None:
        """A turn of the project's conversation; its answer, made a payload by ``shape``, goes
        to ``reply_topic``. ``ack``: the received message's, passed on as it came."""
        ...

    def ask_state(self, *, session_id: str, message: str, reply_topic: str, shape: Shape,
                  system_prompt: str | None = None, client_id: str | None = None,
                  request_id: str | None = None, ack: Any = None) -> None:
        """Like ``ask``, for a game's state, of which only the newest matters: counted against
        ``--state_rate_limit`` instead of the chat limit; while the session's last state is
        being answered it waits, and a newer one replaces it (no reply; ``ack`` sent then)."""
        ...

    def publish(self, topic: str, payload: str) -> None: ...

    def rejected(self) -> None:
        """Counts a message refused as a bad request."""
        ...


class Plugin(Protocol):
    def handle(self, name: str, payload: bytes, ack: Any) -> None:
        """A message on request topic ``name`` (one of REQUESTS)."""
        ...

    def check_template(self, data: dict) -> bool:
        """Checks the plug-in's own fields of a template message (ValueError says what is
        wrong); True if it has some (then a message without a template is still one)."""
        ...

    def template_set(self, session_id: str | None, data: dict, reset: bool) -> None:
        """After a template (of new sessions for None) was set; ``reset``: history cleared."""
        ...

    def history_cleared(self, session_id: str | None) -> None:
        """After one session's history (every session's for None) was cleared."""
        ...

    def sessions_deleted(self, session_id: str | None) -> None: ...

    def control_failed(self, session_id: str, message: str) -> None:
        """A control message for ``session_id`` was not carried out, because of ``message``."""
        ...


@dataclass(frozen=True)
class PluginModule:
    name: str
    requests: tuple[str, ...]
    replies: tuple[str, ...]
    make: Callable[[PluginHost], Plugin]


def load_plugin(module: str) -> PluginModule:
    """The plug-in of ``projects/<module>.py``; ValueError if there is none."""
    if not _NAME_RE.match(module):
        raise ValueError(f"plugin {module!r} is no module name of the projects package")
    qualified = f"projects.{module}"
    try:
        loaded: ModuleType = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            raise
        raise ValueError(f"plugin {module!r}: there is no projects/{module}.py") from None
    requests, replies = getattr(loaded, "REQUESTS", ()), getattr(loaded, "REPLIES", ())
    make = getattr(loaded, "make_plugin", None)
    names = (*requests, *replies)
    if not callable(make) or not all(isinstance(n, str) and _NAME_RE.match(n) for n in names):
        raise ValueError(f"projects/{module}.py must define make_plugin(host) and REQUESTS and "
                         "REPLIES as topic-level names")
    if set(names) & RESERVED:
        raise ValueError(f"projects/{module}.py: {sorted(set(names) & RESERVED)} are the "
                         "chat and control topics of every project")
    return PluginModule(module, tuple(requests), tuple(replies), make)
