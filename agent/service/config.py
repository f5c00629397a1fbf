"""The agent's settings, built once from the command line / environment / YAML.

Only the checks of values here; those that need the MQTT side's rules or the disk (TLS files)
are ``agent.service.checks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.settings import CoreSettings
from projects import validate_project_name


def broker_user_problem(name: str) -> str | None:
    """Why ``name`` cannot be a broker user of the ACL (agent.service.mosquitto_acl), or None:
    its %u patterns make the name one topic level, and a line of the ACL file ends at a space."""
    if not name or not name.isprintable() or any(c in name for c in " /+#%"):
        return (f"broker user name {name!r} must be one topic level: not empty, no '/', '+', "
                "'#', '%', space or control character")
    return None


@dataclass(frozen=True)
class AgentConfig:
    projects: tuple[str, ...] = ("general",)
    # broker
    mqtt_broker: str = "localhost"
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_protocol: str = "5"  # "3.1.1" or "5"
    mqtt_keepalive: int = 60
    client_id: str | None = None  # None: derived from agent_id (a stable, persistent session)
    session_expiry: int = 86400  # seconds the broker keeps our session while we are away
    mqtt_tls: bool = False
    mqtt_ca_certs: str | None = None
    mqtt_certfile: str | None = None
    mqtt_keyfile: str | None = None
    mqtt_tls_insecure: bool = False
    share_group: str | None = None  # $share/<group>/<project>/user_input
    topic_prefix: str = ""  # e.g. "clinic1/": every project topic starts with it
    control_users: tuple[str, ...] = ()  # broker users allowed on the control topics (ACL)
    connect_timeout: float = 30.0  # start() waits this long for connect + subscribe
    reconnect_max_delay: float = 30.0  # cap of the exponential reconnect backoff (s)
    # generation defaults (a request or a project may narrow them)
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256  # a reply's length unless a request asks for another
    max_tokens_limit: int | None = None  # most a request may ask for; None: max_tokens
    max_history_tokens: int = 2000
    skip_thinking: bool = True
    # sessions and limits
    max_concurrent_sessions: int = 100
    session_timeout: float = 3600.0
    max_requests_per_session: int = 20
    max_requests_per_client: int = 120
    rate_limit_window: float = 60.0
    state_rate_limit: int = 20  # game states (maze/state) per second per session
    max_queue: int = 256  # accepted but unanswered requests; above: "Server is overloaded"
    max_payload_bytes: int = 1_000_000
    request_timeout: float = 100.0  # a reply (maybe an error) before clients give up (45-120 s)
    num_workers: int = 4  # threads that prepare prompts and publish replies
    session_store: str = "memory"  # or redis://host:port/db
    shutdown_timeout: float = 30.0  # SIGTERM: finish in-flight requests within this
    # plain-text topics of the older game clients (PROTOCOL.md part B): off unless asked for
    legacy_topics: bool = False
    legacy_project: str = "general"  # whose prompt serves llama/user_input/<sid>
    legacy_driving_project: str = "driving"  # ... and llama/driving/user_input/<sid>
    # status and metrics topics (PROTOCOL.md part C): <status_prefix>/<agent_id>/status|metrics
    status_prefix: str = "vllm_deploy"
    agent_id: str | None = None  # None: the host name, made one topic level
    stats_interval: float = 60.0  # seconds between metrics messages / log lines; 0: none
    metrics_port: int | None = None  # Prometheus endpoint on this port; None: off
    # the OpenAI-compatible HTTP API (agent/http/)
    http_port: int | None = None  # None: off
    http_host: str = "127.0.0.1"
    served_model_name: str | None = None  # None: the model folder's or id's last part
    api_key: tuple[str, ...] = field(default=(), repr=False)  # Bearer keys; (): none asked
    http_ssl_certfile: str | None = None
    http_ssl_keyfile: str | None = None
    http_cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.projects:
            raise ValueError("at least one project is needed (--projects)")
        if self.mqtt_protocol not in ("3.1.1", "5"):
            raise ValueError(f"mqtt_protocol must be '3.1.1' or '5', got {self.mqtt_protocol!r}")
        for name in ("max_tokens", "max_history_tokens", "max_concurrent_sessions",
                     "max_requests_per_session", "max_requests_per_client", "state_rate_limit",
                     "max_queue", "max_payload_bytes", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("session_timeout", "rate_limit_window", "request_timeout", "reconnect_max_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < self.max_tokens:
            raise ValueError(f"max_tokens_limit ({self.max_tokens_limit}) must be >= max_tokens "
                             f"({self.max_tokens}), the length of a reply that asks for none")
        if self.stats_interval < 0:
            raise ValueError(f"stats_interval must be >= 0, got {self.stats_interval}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.connect_timeout < 0:
            raise ValueError(f"connect_timeout must be >= 0, got {self.connect_timeout}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in 0..65535, got {self.http_port}")
        for user in self.control_users:
            problem = broker_user_problem(user)
            if problem:
                raise ValueError(f"control_users: {problem}")
        validate_project_name(self.legacy_project)
        validate_project_name(self.legacy_driving_project)

    def core_settings(self) -> CoreSettings:
        """What the conversation core needs of these."""
        return CoreSettings(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
            max_tokens_limit=self.max_tokens_limit,
            max_history_tokens=self.max_history_tokens, skip_thinking=self.skip_thinking,
            max_requests_per_session=self.max_requests_per_session,
            max_requests_per_client=self.max_requests_per_client,
            rate_limit_window=self.rate_limit_window, max_queue=self.max_queue,
            request_timeout=self.request_timeout, num_workers=self.num_workers,
        )
