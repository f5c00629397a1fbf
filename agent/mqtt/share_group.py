"""Several agents in one MQTT shared subscription group (``--share_group NAME``).

Request topics (``P/user_input``, ``maze/state``, the legacy chat topics and
``llama/session``) are subscribed as ``$share/NAME/<topic>``: the broker hands
each request to one agent of the group. Control topics (``P/template``,
``P/clear_history``, ``P/delete_session``) stay plain, so every agent gets them:
a template without a session sets that agent's default prompt, each agent marks
its own turns in flight as stale, and the maze hint state lives per agent. The
session changes they make are idempotent, so a shared store sees the same
result however many agents carry them out (a maze client gets one
acknowledgement per agent).
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.mqtt.topics import WILDCARDS, Topics

SHARE = "$share"


def share_group_problem(group: str) -> str | None:
    """Why ``group`` cannot name a share group, or None."""
    if not group or any(c in group for c in (*WILDCARDS, "/")):
        return (f"share_group must be one topic level, not empty, without '/', '+', '#' or NUL: "
                f"{group!r}")
    return None


def is_shared(topics: Topics, topic_filter: str) -> bool:
    """True for a request topic (one agent of the group answers), False for a control topic."""
    return topics.parse_control(topic_filter) is None


def shared_subscriptions(
    subscriptions: Sequence[tuple[str, int]], topics: Topics, group: str | None,
) -> list[tuple[str, int]]:
    """``subscriptions`` with each request topic under ``$share/<group>/``; as is for None."""
    if group is None:
        return list(subscriptions)
    problem = share_group_problem(group)
    if problem:
        raise ValueError(problem)
    return [(f"{SHARE}/{group}/{t}" if is_shared(topics, t) else t, qos) for t, qos in subscriptions]
