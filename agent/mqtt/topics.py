"""Topic names of the chat protocol, and the rules that confine client-chosen reply topics."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from projects import plugin_of, plugin_requests

log = logging.getLogger(__name__)

REQUEST = "user_input"
REPLY = "assistant_response"
STREAM = "stream"  # part C: "<reply topic>/stream"
# Control topics of every project (part B); each also takes a "/<sessionId>" suffix.
CONTROL = ("template", "clear_history", "delete_session")
# A project's own request topics beyond user_input (part B) and reply trees come from its
# plug-in (projects.plugins): maze's state and hint.
# Plain-text topics of the older game clients (part B, --legacy_topics): request topic (with a
# "/<sessionId>" suffix, or none: the old servers' session "default") -> reply topic (same
# suffix); the session handshakes (the chat server's and the racing game's driving server's)
# -> their answers.
LEGACY_CHAT = {
    "llama/user_input": "llama/assistant_response",
    "llama/driving/user_input": "llama/driving/assistant_response",
}
LEGACY_SESSIONS = {
    "llama/session": "llama/session/response",
    "llama/driving/session": "llama/driving/session/response",
}
LEGACY_REQUESTS = (*LEGACY_CHAT, *LEGACY_SESSIONS)
_LEGACY_SESSION_LEVELS = tuple(t.split("/") for t in LEGACY_SESSIONS)
QOS_LEGACY = 0  # what the old game clients use
MAX_TOPIC_BYTES = 65535
WILDCARDS = ("+", "#", "\0")
# Topics.publish_problem remembers its verdict for topics up to this long, this many at most:
# a session's reply topic is checked for every request and every reply.
VERDICT_MAX_CHARS, VERDICT_ENTRIES = 512, 4096
# Code points MQTT 5 says a topic should not hold and Mosquitto disconnects a publisher for:
# one such reply topic would cut the agent off (and its QoS 1 retry, again after reconnecting).
_REFUSED_BY_BROKERS = re.compile(
    "[\x01-\x1f\x7f-\x9f\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]")
# Any character topic_problem objects to (wildcards, the above, lone surrogates): one search
# clears the usual topic (this runs a few times per request).
_ANY_PROBLEM = re.compile(_REFUSED_BY_BROKERS.pattern[:-1] + "+#\0\ud800-\udfff]")
# The same for an ASCII topic (the usual one), ten times faster: a class without the code
# points above U+FFFF.
_ASCII_PROBLEM = re.compile("[\0-\x1f\x7f+#]")


def normalize_prefix(prefix: str) -> str:
    """``clinic1`` and ``clinic1/`` both give ``clinic1/``; no wildcards."""
    if not prefix:
        return ""
    if any(c in prefix for c in WILDCARDS) or prefix.startswith("$"):
        raise ValueError(f"topic_prefix must not contain '+', '#', NUL or start with '$': {prefix!r}")
    return prefix if prefix.endswith("/") else prefix + "/"


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None if it can."""
    problems = _ASCII_PROBLEM if topic.isascii() else _ANY_PROBLEM
    if (topic and not topic.startswith("$") and len(topic) <= MAX_TOPIC_BYTES // 4
            and problems.search(topic) is None):
        return None  # at most 4 UTF-8 bytes a character: short enough
    if not topic:
        return "it is empty"
    if any(c in topic for c in WILDCARDS):
        return "it contains '+', '#' or NUL"
    if topic.startswith("$"):
        return "it starts with '$' (the broker's topics, shared subscriptions)"
    if _REFUSED_BY_BROKERS.search(topic):
        return "it contains a control character or a Unicode non-character"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return "it is too long"
    return None


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters (``+`` one level, ``#`` the rest; a topic
    name is a filter of itself)."""
    levels_a, levels_b = a.split("/"), b.split("/")
    for x, y in zip(levels_a, levels_b, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    shorter, longer = sorted((levels_a, levels_b), key=len)
    rest = longer[len(shorter):]
    return not rest or rest == ["#"]  # "a/#" also matches "a"


def looks_like_request(topic: str) -> bool:
    """Whether ``topic`` has the shape of a request or control topic of some project under some
    prefix (another agent on the same broker): ``.../P/user_input``, ``.../P/template[/sid]``,
    a project plug-in's (``.../maze/state``), ``.../llama[/driving]/session``,
    a client's own ``.../P/user_input/<owner>`` and ``.../llama[/driving]/user_input/sid``."""
    levels = topic.split("/")
    if len(levels) < 2:
        return False
    last, before = levels[-1], levels[-2]
    if last == REQUEST or last in CONTROL or before in CONTROL:
        return True
    if (before, last) in plugin_requests() or any(
            levels[-len(tail):] == tail for tail in _LEGACY_SESSION_LEVELS):
        return True
    return before == REQUEST  # a client's own P/user_input/<owner>, or a legacy chat topic


class Topics:
    """All topic names of one agent: ``<prefix><project>/...``."""

    def __init__(
        self, projects: Iterable[str], prefix: str = "", reserved_prefixes: Iterable[str] = ()
    ) -> None:
        self.prefix = normalize_prefix(prefix)
        self.projects = tuple(projects)
        self._project_of_request = {self.user_input(p): p for p in self.projects}
        plugins = {p: plugin_of(p) for p in self.projects}
        # a project's own request topics and reply trees (its plug-in's)
        self.own_requests = {p: m.requests for p, m in plugins.items() if m is not None}
        self._own_replies = [self.base(p) + name + "/" for p, m in plugins.items()
                             if m is not None for name in m.replies]
        exact = set(self._project_of_request)
        under: set[str] = set(reserved_prefixes)
        for p in self.projects:
            under.add(self.user_input(p) + "/")  # a client's own request topic
            for name in CONTROL + self.own_requests.get(p, ()):
                exact.add(self.base(p) + name)
                under.add(self.base(p) + name + "/")
        for legacy in LEGACY_REQUESTS:
            for t in (legacy, self.prefix + legacy):
                exact.add(t)
                if legacy not in LEGACY_SESSIONS:  # their answers live under them: .../response
                    under.add(t + "/")
        self._reserved_exact = frozenset(exact)
        self._reserved_under = tuple(sorted(under))
        self._verdicts: dict[str, str | None] = {}  # topic -> publish_problem (see there)
        self._reply_roots: dict[str, str] = {}

    def base(self, project: str) -> str:
        return f"{self.prefix}{project}/"

    def user_input(self, project: str) -> str:
        return self.base(project) + REQUEST

    def reply_root(self, project: str) -> str:
        root = self._reply_roots.get(project)  # asked for twice per request: made once
        if root is None:
            root = self._reply_roots[project] = f"{self.base(project)}{REPLY}/"
        return root

    def default_reply(self, project: str, session_id: str) -> str:
        return self.reply_root(project) + session_id

    def subscriptions(self) -> list[str]:
        return [self.user_input(p) for p in self.projects]

    def control(self, project: str, action: str) -> str:
        return self.base(project) + action

    def legacy(self, name: str) -> str:
        return self.prefix + name

    def all_subscriptions(self, legacy: bool = False) -> list[tuple[str, int]]:
        """Chat, control (exact and one "/<sessionId>" level), the projects' own request topics
        (maze state) and, with ``legacy``, the old game topics, with their QoS. None is a
        wildcard over a reply topic."""
        topics = [(t, 1) for t in self.subscriptions()]
        topics += [(t + "/+", 1) for t in self.subscriptions()]  # owned: P/user_input/<owner>
        for p in self.projects:
            for action in CONTROL:
                topics += [(self.control(p, action), 1), (self.control(p, action) + "/+", 1)]
            topics += [(self.base(p) + name, 1) for name in self.own_requests.get(p, ())]
        if legacy:  # each chat topic with a session level, and bare (session "default")
            topics += [(self.legacy(t) + end, QOS_LEGACY)
                       for t in LEGACY_CHAT for end in ("/+", "")]
            topics += [(self.legacy(t), QOS_LEGACY) for t in LEGACY_SESSIONS]
        return topics

    def project_of(self, topic: str) -> str | None:
        """The project whose chat request topic ``topic`` is."""
        return self._project_of_request.get(topic)

    def owned_request(self, topic: str) -> tuple[str, str] | None:
        """``(project, owner)`` for a client's own request topic ``P/user_input/<owner>``
        (agent.mqtt.owned), else None."""
        base, _, owner = topic.rpartition("/")
        project = self._project_of_request.get(base)
        return None if project is None or not owner else (project, owner)

    def parse_control(self, topic: str) -> tuple[str, str, str | None] | None:
        """``(project, action, session suffix or None)`` for a control topic, else None."""
        for p in self.projects:
            base = self.base(p)
            if not topic.startswith(base):
                continue
            action, _, suffix = topic[len(base):].partition("/")
            if action in CONTROL and "/" not in suffix:
                return p, action, suffix or None
        return None

    def is_reserved(self, topic: str) -> bool:
        """A request or control topic of any project, ours or another agent's (any prefix):
        never published to."""
        return (topic in self._reserved_exact or topic.startswith(self._reserved_under)
                or looks_like_request(topic))

    def publish_problem(self, topic: str) -> str | None:
        """Why the agent may not publish on ``topic`` (not a topic, or a request or control
        topic), or None. Remembered for short topics; emptied when full (a flood of new
        topics costs the re-checks only)."""
        verdict = self._verdicts.get(topic, self)
        if verdict is not self:
            return verdict  # type: ignore[return-value]
        verdict = topic_problem(topic)
        if verdict is None and self.is_reserved(topic):
            verdict = "it is a request or control topic"
        if len(topic) <= VERDICT_MAX_CHARS:
            if len(self._verdicts) >= VERDICT_ENTRIES:
                self._verdicts.clear()
            self._verdicts[topic] = verdict
        return verdict

    def publishable(self, topic: str) -> bool:
        return self.publish_problem(topic) is None

    def stream_of(self, reply_topic: str) -> str | None:
        """``<reply topic>/stream`` (part C), or None if it may not be published to."""
        topic = f"{reply_topic}/{STREAM}"
        return topic if self.publishable(topic) else None

    def service_problem(self, topic: str) -> str | None:
        """Why the agent cannot publish its own status or metrics on ``topic``, or None: it must
        be publishable and outside every tree a client may choose a reply topic in."""
        problem = self.publish_problem(topic)
        if problem:
            return problem
        roots = [self.reply_root(p) for p in self.projects] + self._own_replies
        roots += [self.legacy(t) + "/" for t in LEGACY_CHAT.values()]
        if topic.startswith(tuple(roots)):
            return "clients may choose it as a reply topic"
        return None

    def reply_problem(self, project: str, topic: str) -> str | None:
        """Why ``topic`` (trailing '/' already stripped) is no reply topic of ``project``."""
        return self.problem_under(self.reply_root(project), topic)

    def problem_under(self, root: str, topic: str) -> str | None:
        """Why ``topic`` (trailing '/' already stripped) is no topic to answer on under ``root``."""
        if not topic.startswith(root):
            return f"it does not start with {root!r}"
        if len(topic) == len(root):
            return "it names no sub-topic"
        return self.publish_problem(topic)

    def confine_reply(self, project: str, requested: object, session_id: str) -> str:
        """The client's ``replyTopic`` if allowed, else the default topic (with a warning)."""
        return self.confine(self.reply_root(project), requested, self.default_reply(project, session_id))

    def confine(self, root: str, requested: object, default: str) -> str:
        """``requested`` if it is an allowed topic under ``root``, else ``default`` (with a warning)."""
        if requested is None:
            return default
        if not isinstance(requested, str):
            problem = "it is not a string"
        else:
            requested = requested.rstrip("/")
            problem = self.problem_under(root, requested)
        if problem is None:
            return requested  # type: ignore[return-value]
        log.warning("replyTopic %.200r not allowed (%s); replying on %s", requested, problem, default)
        return default
