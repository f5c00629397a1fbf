"""The settings checks that need the MQTT side's rules or the disk: run when settings are
checked (``Settings.agent_config``) and when an agent is built, before the model loads."""

from __future__ import annotations

import ipaddress
import ssl

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
    check_http(config)


def check_http(config: AgentConfig) -> None:
    """The HTTP API: a key wherever more than this machine can reach it; HTTPS files readable."""
    if config.http_port is None:
        return
    if not config.api_key and not _loopback(config.http_host):
        raise ValueError(f"--http_host {config.http_host} lets other machines reach the HTTP API: "
                         "give --api_key (or --api_key_file), or listen on 127.0.0.1")
    if (config.http_ssl_certfile is None) != (config.http_ssl_keyfile is None):
        raise ValueError("--http_ssl_certfile and --http_ssl_keyfile go together")
    cert, key = config.http_ssl_certfile, config.http_ssl_keyfile
    if cert is None:
        return
    flags = f"--http_ssl_certfile {cert} and --http_ssl_keyfile {key}"
    try:  # as uvicorn will load them: a mismatched key fails here too, not in its thread
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(f"{flags}: not a PEM certificate and its private key "
                         f"({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"{flags}: cannot be read ({exc.strerror or exc})") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
