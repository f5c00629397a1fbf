"""Topic names of the chat protocol, and the rules that confine client-chosen reply topics."""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

REQUEST = "user_input"
REPLY = "assistant_response"
# Control topics of every project (part B); each also takes a "/<sessionId>" suffix.
CONTROL = ("template", "clear_history", "delete_session")
# Per-project request topics beyond user_input (part B).
PROJECT_REQUESTS = {"maze": ("state",)}
# Plain-text topics of the older game clients (part B, --legacy_topics).
LEGACY_REQUESTS = ("llama/user_input", "llama/driving/user_input", "llama/session")
MAX_TOPIC_BYTES = 65535
WILDCARDS = ("+", "#", "\0")


def normalize_prefix(prefix: str) -> str:
    """``clinic1`` and ``clinic1/`` both give ``clinic1/``; no wildcards."""
    if not prefix:
        return ""
    if any(c in prefix for c in WILDCARDS) or prefix.startswith("$"):
        raise ValueError(f"topic_prefix must not contain '+', '#', NUL or start with '$': {prefix!r}")
    return prefix if prefix.endswith("/") else prefix + "/"


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None if it can."""
    if not topic:
        return "it is empty"
    if any(c in topic for c in WILDCARDS):
        return "it contains '+', '#' or NUL"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return "it is too long"
    return None


class Topics:
    """All topic names of one agent: ``<prefix><project>/...``."""

    def __init__(
        self, projects: Iterable[str], prefix: str = "", reserved_prefixes: Iterable[str] = ()
    ) -> None:
        self.prefix = normalize_prefix(prefix)
        self.projects = tuple(projects)
        self._project_of_request = {self.user_input(p): p for p in self.projects}
        exact = set(self._project_of_request)
        under: set[str] = set(reserved_prefixes)
        for p in self.projects:
            for name in CONTROL + PROJECT_REQUESTS.get(p, ()):
                exact.add(self.base(p) + name)
                under.add(self.base(p) + name + "/")
        for legacy in LEGACY_REQUESTS:
            for t in (legacy, self.prefix + legacy):
                exact.add(t)
                under.add(t + "/")
        self._reserved_exact = frozenset(exact)
        self._reserved_under = tuple(sorted(under))

    def base(self, project: str) -> str:
        return f"{self.prefix}{project}/"

    def user_input(self, project: str) -> str:
        return self.base(project) + REQUEST

    def reply_root(self, project: str) -> str:
        return f"{self.base(project)}{REPLY}/"

    def default_reply(self, project: str, session_id: str) -> str:
        return self.reply_root(project) + session_id

    def subscriptions(self) -> list[str]:
        return [self.user_input(p) for p in self.projects]

    def project_of(self, topic: str) -> str | None:
        """The project whose chat request topic ``topic`` is."""
        return self._project_of_request.get(topic)

    def is_reserved(self, topic: str) -> bool:
        """A request or control topic of any project: never published to."""
        return topic in self._reserved_exact or topic.startswith(self._reserved_under)

    def publishable(self, topic: str) -> bool:
        return topic_problem(topic) is None and not self.is_reserved(topic)

    def reply_problem(self, project: str, topic: str) -> str | None:
        """Why ``topic`` (trailing '/' already stripped) is no reply topic of ``project``."""
        root = self.reply_root(project)
        if not topic.startswith(root):
            return f"it does not start with {root!r}"
        if len(topic) == len(root):
            return "it names no sub-topic"
        problem = topic_problem(topic)
        if problem:
            return problem
        if self.is_reserved(topic):
            return "it is a request or control topic"
        return None

    def confine_reply(self, project: str, requested: object, session_id: str) -> str:
        """The client's ``replyTopic`` if allowed, else the default topic (with a warning)."""
        default = self.default_reply(project, session_id)
        if requested is None:
            return default
        if not isinstance(requested, str):
            problem = "it is not a string"
        else:
            requested = requested.rstrip("/")
            problem = self.reply_problem(project, requested)
        if problem is None:
            return requested  # type: ignore[return-value]
        log.warning(
            "replyTopic %.200r of project %s not allowed (%s); replying on %s",
            requested, project, problem, default,
        )
        return default
