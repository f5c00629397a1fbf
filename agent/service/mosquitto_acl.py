"""The Mosquitto ACL file for this agent's topics (README and PROTOCOL.md, "Security model").

MQTT does not tell a subscriber who published a message: only the broker can keep one client
from reading another's replies, writing into another's sessions or using the control topics.
``python -m agent.service.mosquitto_acl [vLLMDeploy.py flags] [--trusted_users NAME ...]``
prints the ACL for the same settings as ``vLLMDeploy.py`` (command line, ``VLLM_DEPLOY_*``
environment, ``--config`` YAML): projects, ``--topic_prefix``, ``--status_prefix``,
``--legacy_topics``, the agent's ``--mqtt_username`` and ``--control_users``.
``systemd/mosquitto-acl.example`` is its output for the example settings (a test checks it).

Four kinds of broker user:

- every client: a ``pattern`` with ``%u`` confines it to its own request topic
  ``P/user_input/<user>`` and reply trees ``P/assistant_response/<user>[/...]``; the agent
  keeps such a request to the sessions ``<user>`` and ``<user>/...`` (agent.mqtt.owned);
- the agent: reads every request and control topic, writes every reply, status and metrics
  topic;
- ``--control_users``: the control topics, and what trusted users may;
- ``--trusted_users`` (this command only): the shared request topics, whose payload names
  any session (a backend that serves many people, a game's state topic), and every reply.

``%u``, not ``%c``: any client may pick any client id, a user name needs the password.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence

from agent.mqtt.topics import CONTROL, LEGACY_CHAT, LEGACY_SESSIONS, Topics
from agent.service.config import AgentConfig, broker_user_problem
from projects import plugin_of

log = logging.getLogger(__name__)

PROG = "python -m agent.service.mosquitto_acl"


class _Acl:
    """Lines of an ACL file; every topic checked so that no setting can add a line or a %u."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, *text: str) -> None:
        self.lines += [f"# {t}".rstrip() for t in text]

    def add(self, keyword: str, access: str, topics: Iterable[str], *ends: str) -> None:
        """A line for each topic with each of ``ends`` (none: the topic itself)."""
        for topic in topics:
            if not topic.isprintable() or "%" in topic or topic != topic.strip():
                raise ValueError(f"topic {topic!r} cannot go into an ACL file: it holds a control "
                                 "character, '%' or spaces at its ends (check --topic_prefix "
                                 "and --status_prefix)")
            self.lines += [f"{keyword} {access} {topic}{end}" for end in ends or ("",)]

    def section(self, *text: str) -> None:
        self.lines.append("")
        self.comment(*text)

    def user(self, name: str) -> None:
        self.lines += ([] if self.lines[-1].startswith("#") else [""]) + [f"user {name}"]


class _Trees:
    """The agent's topics, by who may use them."""

    def __init__(self, config: AgentConfig) -> None:
        topics = Topics(config.projects, config.topic_prefix)
        self.requests = [topics.user_input(p) for p in config.projects]
        self.control = [topics.control(p, a) + end for p in config.projects for a in CONTROL
                        for end in ("", "/+")]
        self.replies = [topics.reply_root(p) for p in config.projects]  # each ends in "/"
        self.own_requests = [topics.base(p) + name for p in config.projects
                             for name in topics.own_requests.get(p, ())]
        self.own_replies = [topics.base(p) + name + "/" for p in config.projects
                            if plugin_of(p) is not None for name in plugin_of(p).replies]
        legacy = config.legacy_topics
        self.legacy_chat = {topics.legacy(k): topics.legacy(v) + "/"
                            for k, v in LEGACY_CHAT.items()} if legacy else {}
        self.legacy_sessions = {topics.legacy(k): topics.legacy(v)
                                for k, v in LEGACY_SESSIONS.items()} if legacy else {}
        self.status = config.status_prefix.strip("/")


def acl_text(config: AgentConfig, trusted_users: Sequence[str] = ()) -> str:
    """The ACL file for ``config`` (ValueError for a user name or topic it cannot hold)."""
    agent = config.mqtt_username
    if not agent:
        raise ValueError("the agent's broker user is needed: give --mqtt_username "
                         "(VLLM_DEPLOY_MQTT_USERNAME)")
    control = tuple(dict.fromkeys(config.control_users))
    trusted = tuple(u for u in dict.fromkeys(trusted_users) if u not in control)
    for name in (agent, *control, *trusted):
        problem = broker_user_problem(name)
        if problem:
            raise ValueError(problem)
    if agent in control + trusted:
        raise ValueError(f"the agent's user {agent!r} cannot also be a control or trusted user: "
                         "give people and services broker users of their own")
    trees, acl = _Trees(config), _Acl()
    acl.comment(
        f"Mosquitto ACL file for vLLMDeploy.py, printed by `{PROG}`",
        f"for projects {' '.join(config.projects)}, topic prefix {config.topic_prefix!r}, "
        f"status prefix {trees.status!r},",
        f"agent user {agent}, control users {' '.join(control) or '(none)'}, trusted users "
        f"{' '.join(trusted) or '(none)'}, legacy topics {'on' if trees.legacy_chat else 'off'}.",
        "In mosquitto.conf: acl_file <this file>, password_file <file>, allow_anonymous false;",
        "then reload mosquitto (SIGHUP). README.md and docs/PROTOCOL.md: Security model.",
        "",
        "Every client, by its user name (%u): requests on P/user_input/<user> (sessionId",
        "<user> or <user>/...), replies on P/assistant_response/<user> and below; the status.")
    acl.add("pattern", "write", trees.requests, "/%u")
    acl.add("pattern", "read", trees.replies + trees.own_replies, "%u/#")
    acl.add("pattern", "write", trees.legacy_chat, "/%u")
    acl.add("pattern", "read", trees.legacy_chat.values(), "%u")
    acl.add("pattern", "read", [f"{trees.status}/+/status"])
    acl.section("The agent (--mqtt_username): every request and control topic, every reply,",
                "its status and metrics.")
    acl.user(agent)
    acl.add("topic", "read", trees.requests, "", "/+")
    acl.add("topic", "read", trees.control + trees.own_requests)
    acl.add("topic", "read", trees.legacy_chat, "", "/+")
    acl.add("topic", "read", trees.legacy_sessions)
    acl.add("topic", "write", trees.replies + trees.own_replies + list(trees.legacy_chat.values()),
            "#")
    acl.add("topic", "write", trees.legacy_sessions.values())
    acl.add("topic", "readwrite", [f"{trees.status}/#"])
    if control:
        acl.section("Operators (--control_users): the control topics, and what trusted users may.")
    for name in control:
        acl.user(name)
        acl.add("topic", "write", trees.control)
        _trusted(acl, trees)
    if trusted:
        acl.section("Trusted users: the shared request topics, whose payload names any session,",
                    "and every reply.")
    for name in trusted:
        acl.user(name)
        _trusted(acl, trees)
    return "\n".join(acl.lines) + "\n"


def _trusted(acl: _Acl, trees: _Trees) -> None:
    acl.add("topic", "write", trees.requests + trees.own_requests)
    acl.add("topic", "write", trees.legacy_chat, "", "/+")
    acl.add("topic", "write", trees.legacy_sessions)
    acl.add("topic", "read", trees.replies + trees.own_replies + list(trees.legacy_chat.values()),
            "#")
    acl.add("topic", "read", trees.legacy_sessions.values())
    acl.add("topic", "read", [f"{trees.status}/#"])


def log_control_access(config: AgentConfig) -> None:
    """At start: who may use the control topics, as far as the agent can know."""
    if config.control_users:
        log.info("control topics: broker users %s only, if the broker enforces the ACL of `%s`",
                 ", ".join(config.control_users), PROG)
    else:
        log.warning("control topics (%s) are open to every client the broker lets publish "
                    "there: any client may replace prompts and clear or delete sessions; set "
                    "--control_users and install the ACL of `%s` (README: Security model)",
                    ", ".join(CONTROL), PROG)


def main(argv: Sequence[str] | None = None) -> int:
    from agent.service.settings import SettingsError, parse_settings

    own = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other argument is a vLLMDeploy.py flag (see its --help).")
    own.add_argument("--trusted_users", "--trusted-users", nargs="+", default=[],
                     metavar="USER", help="broker users that may use the shared request topics")
    args, rest = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = parse_settings(rest).agent_config()
        text = acl_text(config, args.trusted_users)
    except (SettingsError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
