"""The settings checks that need the MQTT side's rules or the disk: run when settings are
checked (``Settings.agent_config``) and when an agent is built, before the model loads."""

from __future__ import annotations

from agent.mqtt.share_group import share_group_problem
from agent.mqtt.status import agent_id_problem, status_prefix_problem
from agent.mqtt.tls import check_tls
from agent.service.config import AgentConfig


def check_agent_config(config: AgentConfig) -> None:
    """ValueError naming the flag: a status prefix, agent id or share group that cannot be a
    topic level, TLS files that cannot be read or are not PEM."""
    problem = status_prefix_problem(config.status_prefix) or (
        None if config.agent_id is None else agent_id_problem(config.agent_id))
    if problem:
        raise ValueError(problem)
    if config.share_group is not None:
        problem = share_group_problem(config.share_group)
        if problem:
            raise ValueError(problem)
    check_tls(config)  # certificate and key files readable and PEM
