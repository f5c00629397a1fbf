"""The one table of settings: every flag of ``vLLMDeploy.py``, its type, default and target.

argparse, the environment lookup, YAML validation, ``--help`` and the README's flag
table are all derived from ``FLAGS``; add a setting here and nowhere else. This module
imports no torch (``vLLMDeploy.py`` pins devices before torch is imported).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "VLLM_DEPLOY_"
KINDS = ("str", "int", "float", "bool", "list", "strs")
TARGETS = ("engine", "agent", "launcher")
README_BEGIN, README_END = "<!-- flag-table:begin -->", "<!-- flag-table:end -->"


@dataclass(frozen=True)
class Flag:
    name: str  # underscore spelling; "--name" and "--name-with-dashes" both work
    kind: str  # one of KINDS; "list": names separated by spaces or commas; "strs": texts
    # (repeat the flag, or separate them by commas in the environment)
    default: Any
    help: str
    target: str  # engine (EngineConfig), agent (AgentConfig) or launcher (vLLMDeploy.py)
    group: str
    choices: tuple[str, ...] = ()
    optional: bool = False  # may be unset: "none" (or empty) on the command line / env
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False  # never logged, never printed
    in_yaml: bool = True  # may be a key of a --config file
    metavar: str | None = None

    def __post_init__(self) -> None:
        assert self.kind in KINDS and self.target in TARGETS, self

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def options(self) -> list[str]:
        dashed = "--" + self.name.replace("_", "-")
        return ["--" + self.name] + ([dashed] if dashed != "--" + self.name else [])

    @property
    def negations(self) -> list[str]:
        """Spellings that turn a bool flag off (``--noX`` is what the old script's fire took)."""
        if self.kind != "bool":
            return []
        dashed = self.name.replace("_", "-")
        return list(dict.fromkeys(
            [f"--no-{self.name}", f"--no-{dashed}", f"--no_{self.name}", f"--no{self.name}"]
        ))


def _f(name: str, kind: str, default: Any, target: str, group: str, help: str, **kw: Any) -> Flag:
    return Flag(name=name, kind=kind, default=default, help=help, target=target, group=group, **kw)


P, M, D, G, S, Q, L = ("projects", "model", "device and memory", "generation",
                       "sessions and limits", "MQTT", "launcher")

FLAGS: tuple[Flag, ...] = (
    _f("projects", "list", ("general",), "agent", P,
       "projects to serve, space- or comma-separated (`maze driving`, `maze,driving`); "
       "a name without a file in projects/ gets the generic assistant", metavar="NAME"),
    # model
    _f("model", "str", "Qwen/QwQ-32B", "launcher", M,
       "local model folder (with config.json), a GGUF file (or a folder holding one), "
       "Hugging Face / ModelScope id, or alias such as qwq-32b", metavar="PATH_OR_ID"),
    _f("model_provider", "str", "huggingface", "launcher", M,
       "where model ids are looked up and downloaded from",
       choices=("huggingface", "modelscope")),
    _f("model_cache_dir", "str", None, "launcher", M,
       "model cache folder (Hugging Face cache layout); unset: the hub's own default "
       "(HF_HUB_CACHE, ~/.cache/huggingface/hub)", optional=True, metavar="DIR"),
    _f("model_revision", "str", None, "launcher", M,
       "branch, tag or commit of the model id; unset: main", optional=True),
    _f("auto_download", "bool", False, "launcher", M,
       "download the model when it is not in the cache (otherwise that is an error)"),
    _f("quantization", "str", None, "engine", M,
       "weight quantization; unset, none or auto: what the checkpoint's config says (plain "
       "weights when it says nothing); awq, gptq, squeezellm: a pre-quantized checkpoint of "
       "that format; fp8, int8, bitsandbytes: a pre-quantized checkpoint, or quantize a "
       "plain fp16/bf16 model while loading it", optional=True,
       choices=("none", "auto", "awq", "gptq", "squeezellm", "fp8", "int8", "bitsandbytes",
                "compressed-tensors")),
    _f("bnb_quant_type", "str", "nf4", "engine", M,
       "how --quantization bitsandbytes quantizes a plain model while loading it: 4-bit nf4 "
       "or fp4, or 8-bit int8 (LLM.int8); a pre-quantized bitsandbytes checkpoint keeps its own",
       choices=("nf4", "fp4", "int8")),
    _f("dtype", "str", "auto", "engine", M,
       "compute dtype; auto: the checkpoint's fp16/bf16 on a GPU; on the CPU float32 (exact), "
       "but bfloat16 for AWQ/GPTQ/GGUF-block weights where the CPU has AVX512-BF16 (their "
       "int kernels' dtype)",
       choices=("auto", "float32", "float16", "bfloat16")),
    _f("max_model_len", "int", 4096, "engine", M,
       "longest sequence (prompt + reply) in tokens; the default is lowered to the model's own "
       "limit where that is smaller, a value given is not; none: the model's own limit",
       optional=True, minimum=16),
    _f("seed", "int", 0, "engine", M, "random seed of the sampler", minimum=0),
    # device and memory
    _f("device", "str", "auto", "engine", D, "where the model runs; auto: CUDA when present",
       choices=("auto", "cuda", "cpu")),
    _f("visible_devices", "str", None, "launcher", D,
       "GPU indices to use, e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES before torch starts)",
       optional=True, metavar="IDS"),
    _f("tensor_parallel_size", "int", 1, "launcher", D,
       "GPUs one model is split over; this engine runs a model on one GPU: 1", minimum=1),
    _f("gpu_memory_utilization", "float", 0.9, "engine", D,
       "fraction of the GPU's memory this process may use (weights + KV cache)", minimum=0.01,
       maximum=1),
    _f("cpu_memory_utilization", "float", 0.5, "engine", D,
       "fraction of the memory psutil reports available after loading that the KV cache may "
       "use on the CPU", minimum=0.01, maximum=1),
    _f("kv_cache_dtype", "str", "auto", "engine", D,
       "KV cache dtype; auto: the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2 halve the "
       "cache's bytes per token, so twice the tokens fit",
       choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2")),
    _f("block_size", "int", 16, "engine", D, "tokens per KV-cache block (8, 16, 32, 64 or 128)",
       minimum=8, maximum=128),
    _f("num_kv_blocks", "int", None, "engine", D,
       "KV-cache blocks to allocate, overriding the memory plan (it must still hold one "
       "sequence of --max_model_len); unset: as many as the memory budget allows",
       optional=True, minimum=1),
    _f("enable_prefix_caching", "bool", True, "engine", D,
       "reuse the KV of a cached prompt prefix (a session's earlier turns, a shared system "
       "prompt) instead of recomputing it"),
    _f("max_num_seqs", "int", 32, "engine", D, "sequences in one batch", minimum=1),
    _f("enforce_eager", "bool", False, "engine", D,
       "run every step eagerly; otherwise decode steps on a GPU replay CUDA graphs captured "
       "for batch sizes 1, 2, 4, 8, then every 16 up to --max_num_seqs, and on the CPU in "
       "bfloat16/float16 run one torch.compile graph of the model, compiled at start-up "
       "(tens of seconds; needs a C++ compiler, else eager)"),
    _f("max_num_batched_tokens", "int", 4096, "engine", D,
       "tokens in one forward pass (long prompts are prefilled in chunks)", minimum=16),
    # generation
    _f("temperature", "float", 0.6, "agent", G,
       "default sampling temperature (0: greedy); a request may set its own", minimum=0,
       maximum=2),
    _f("top_p", "float", 0.9, "agent", G, "default nucleus sampling top-p", minimum=0,
       maximum=1),
    _f("max_tokens", "int", 512, "agent", G,
       "tokens in one reply when the request asks for no number (maxTokens, max_tokens)",
       minimum=1),
    _f("max_tokens_limit", "int", None, "agent", G,
       "most tokens a request may ask for in one reply; a larger maxTokens / max_tokens is "
       "lowered to it (the JSON envelope says so); unset: --max_tokens", optional=True,
       minimum=1),
    _f("max_history_tokens", "int", 3000, "agent", G,
       "most prompt tokens (system prompt + history + new turn); oldest turns go first",
       minimum=1),
    _f("skip_thinking", "bool", True, "agent", G,
       "remove <think>...</think> reasoning from replies"),
    # sessions and limits
    _f("max_concurrent_sessions", "int", 100, "agent", S,
       "sessions kept; above it the least recently used goes", minimum=1),
    _f("session_timeout", "float", 3600.0, "agent", S,
       "seconds an idle session is kept", minimum=0),
    _f("max_requests_per_session", "int", 20, "agent", S,
       "requests one session may send per --rate_limit_window", minimum=1),
    _f("max_requests_per_client", "int", 120, "agent", S,
       "requests one client may send per --rate_limit_window over all its sessions (the "
       "client: the reply topic's client level, else `clientId`; requests with neither "
       "share one allowance per project)", minimum=1),
    _f("rate_limit_window", "float", 60.0, "agent", S, "rate-limit window in seconds", minimum=0),
    _f("state_rate_limit", "int", 20, "agent", S,
       "game states (maze/state) one session may send per second, counted instead of "
       "--max_requests_per_session (20: a 100 ms tick, with room for its jitter); while a "
       "state is being answered, a newer one waits in its place and replaces any that "
       "waited", minimum=1),
    _f("max_queue", "int", 256, "agent", S,
       "accepted but unanswered requests; above it a request gets the overload reply",
       minimum=1),
    _f("max_payload_bytes", "int", 1_000_000, "agent", S,
       "largest request payload accepted", minimum=1),
    _f("request_timeout", "float", 100.0, "agent", S,
       "seconds before a request still unanswered gets an error reply (a request's "
       "`timeoutS` may ask for less); keep it below the clients' own waits", minimum=0),
    _f("num_workers", "int", 4, "agent", S,
       "threads that prepare prompts and publish replies", minimum=1),
    _f("session_store", "str", "memory", "agent", S,
       "where session histories live: memory (this process), or redis://HOST:PORT/DB to "
       "share them between agents", metavar="URL"),
    _f("shutdown_timeout", "float", 30.0, "agent", S,
       "on SIGTERM/SIGINT, seconds to finish the requests in flight before the rest are "
       "answered with an error; a second signal exits at once", minimum=0),
    # MQTT
    _f("mqtt_broker", "str", "localhost", "agent", Q, "broker host name or address",
       metavar="HOST"),
    _f("mqtt_port", "int", 1883, "agent", Q, "broker port", minimum=1),
    _f("mqtt_username", "str", None, "agent", Q, "broker user name", optional=True),
    _f("mqtt_password", "str", None, "agent", Q,
       "broker password; visible in `ps` on the command line: prefer --mqtt_password_file "
       "or the environment", optional=True, secret=True),
    _f("mqtt_password_file", "str", None, "launcher", Q,
       "file whose first line is the broker password", optional=True, metavar="FILE"),
    _f("mqtt_protocol", "str", "5", "agent", Q, "MQTT protocol version",
       choices=("3.1.1", "5")),
    _f("mqtt_keepalive", "int", 60, "agent", Q, "MQTT keep-alive in seconds", minimum=1),
    _f("connect_timeout", "float", 30.0, "agent", Q,
       "seconds to wait for the broker at start-up; later reconnections go on in the "
       "background", minimum=0),
    _f("reconnect_max_delay", "float", 30.0, "agent", Q,
       "longest wait between reconnection attempts (seconds)", minimum=0.1),
    _f("client_id", "str", None, "agent", Q,
       "MQTT client id; unset: derived from --agent_id, so a restarted agent resumes its "
       "persistent session", optional=True),
    _f("session_expiry", "int", 86400, "agent", Q,
       "seconds the broker keeps this agent's session (subscriptions and queued QoS 1 "
       "requests) while it is disconnected", minimum=0),
    _f("mqtt_tls", "bool", False, "agent", Q,
       "connect to the broker over TLS (certificate verification on)"),
    _f("mqtt_ca_certs", "str", None, "agent", Q,
       "CA certificate file (PEM) that signed the broker's certificate; unset: the system's "
       "CAs; like the other TLS flags it needs --mqtt_tls (an error without it)", optional=True,
       metavar="FILE"),
    _f("mqtt_certfile", "str", None, "agent", Q,
       "client certificate file (PEM) for brokers that require one; its key in the same file "
       "or in --mqtt_keyfile (unencrypted)", optional=True,
       metavar="FILE"),
    _f("mqtt_keyfile", "str", None, "agent", Q,
       "private key file (PEM) of --mqtt_certfile", optional=True, metavar="FILE"),
    _f("mqtt_tls_insecure", "bool", False, "agent", Q,
       "TLS without verifying the broker's certificate and host name (testing only; logs a "
       "warning)"),
    _f("share_group", "str", None, "agent", Q,
       "subscribe through the shared subscription $share/NAME/<project>/user_input, so that "
       "several agents split the requests (use a shared --session_store)", optional=True,
       metavar="NAME"),
    _f("control_users", "list", (), "agent", Q,
       "broker users that may publish on the control topics (P/template, P/clear_history, "
       "P/delete_session); the broker enforces it with the ACL that `python -m "
       "agent.service.mosquitto_acl` prints (README: Security model); empty: a WARNING at "
       "start, the control topics are as open as the broker leaves them", metavar="USER"),
    _f("topic_prefix", "str", "", "agent", Q,
       "prefix of every project topic, e.g. clinic1/ (default: none)", metavar="PREFIX"),
    _f("legacy_topics", "bool", False, "agent", Q,
       "also serve the older game clients' plain-text topics llama/user_input[/<sid>], "
       "llama/driving/user_input[/<sid>], llama/session and llama/driving/session "
       "(PROTOCOL.md part B)"),
    _f("legacy_project", "str", "general", "agent", Q,
       "project whose prompt, rules and sessions serve llama/user_input/<sid>",
       metavar="NAME"),
    _f("legacy_driving_project", "str", "driving", "agent", Q,
       "project whose prompt, rules and sessions serve llama/driving/user_input/<sid>",
       metavar="NAME"),
    # status and metrics (PROTOCOL.md part C)
    _f("status_prefix", "str", "vllm_deploy", "agent", "status and metrics",
       "first level(s) of the retained status topic <status_prefix>/<agent_id>/status (also "
       "the Last Will) and of .../metrics", metavar="PREFIX"),
    _f("agent_id", "str", None, "agent", "status and metrics",
       "this agent's name in the status and metrics topics; unset: the host name, with "
       "characters other than letters, digits, '_', '.' and '-' turned into '-'",
       optional=True, metavar="NAME"),
    _f("stats_interval", "float", 60.0, "agent", "status and metrics",
       "seconds between metrics messages on <status_prefix>/<agent_id>/metrics and the "
       "stats log line; 0: none", minimum=0),
    _f("metrics_port", "int", None, "agent", "status and metrics",
       "serve Prometheus metrics on http://0.0.0.0:PORT/metrics (needs `pip install "
       "prometheus-client`); 0: any free port (logged); unset: off", optional=True, minimum=0,
       maximum=65535, metavar="PORT"),
    # the OpenAI-compatible HTTP API
    _f("http_port", "int", None, "agent", "OpenAI-compatible HTTP API",
       "serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, "
       "/health, /metrics) on this port; 0: any free port (logged); unset: off",
       optional=True, minimum=0, maximum=65535, metavar="PORT"),
    _f("http_host", "str", "127.0.0.1", "agent", "OpenAI-compatible HTTP API",
       "address the HTTP API listens on; another than a loopback one needs --api_key",
       metavar="HOST"),
    _f("served_model_name", "str", None, "agent", "OpenAI-compatible HTTP API",
       "the model's id in the HTTP API; unset: the last part of --model", optional=True,
       metavar="NAME"),
    _f("api_key", "strs", (), "agent", "OpenAI-compatible HTTP API",
       "key an HTTP client must send as `Authorization: Bearer KEY`; repeat the flag for "
       "several (the environment: separated by commas); none: no key asked (loopback only)",
       secret=True, metavar="KEY"),
    _f("api_key_file", "str", None, "launcher", "OpenAI-compatible HTTP API",
       "file of API keys, one a line (added to --api_key)", optional=True, metavar="FILE"),
    _f("http_ssl_certfile", "str", None, "agent", "OpenAI-compatible HTTP API",
       "certificate (PEM) to serve HTTPS with; its key in --http_ssl_keyfile", optional=True,
       metavar="FILE"),
    _f("http_ssl_keyfile", "str", None, "agent", "OpenAI-compatible HTTP API",
       "private key (PEM) of --http_ssl_certfile", optional=True, metavar="FILE"),
    _f("http_cors_origins", "strs", (), "agent", "OpenAI-compatible HTTP API",
       "origins browsers may call the HTTP API from (e.g. https://portal.lab.example); repeat "
       "the flag for several; none: no cross-origin calls", metavar="ORIGIN"),
    # launcher
    _f("config", "str", None, "launcher", L,
       "YAML file of settings (keys are flag names); command line > environment > YAML "
       "> defaults", optional=True, in_yaml=False, metavar="FILE.yaml"),
    _f("log_level", "str", "INFO", "launcher", L, "logging level",
       choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _f("debug_log", "str", None, "launcher", L,
       "also write every prompt and reply to FILE (the old debug_info.log); they hold "
       "patient text, so this is off unless asked for", optional=True, metavar="FILE"),
    _f("debug_log_max_bytes", "int", 10_000_000, "launcher", L,
       "size at which --debug_log is rotated (one backup, FILE.1)", minimum=1000),
)

BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}
assert len(BY_NAME) == len(FLAGS), "duplicate flag names"


def format_default(flag: Flag) -> str:
    """The default as a user would type it."""
    value = flag.default
    if value is None:
        return "unset"
    if flag.kind == "bool":
        return "true" if value else "false"
    if flag.kind in ("list", "strs"):
        return " ".join(value) if value else "none"
    return '""' if value == "" else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """The README's flag table, generated from FLAGS (``python -m agent.service.settings --markdown``)."""
    rows = ["| flag | default | environment | meaning |", "| --- | --- | --- | --- |"]
    for flag in FLAGS:
        meaning = flag.help
        if flag.choices:
            meaning += f" ({' / '.join(flag.choices)})"
        if flag.kind == "bool":
            meaning += f"; `--{flag.name} false` or `--no-{flag.name}` turns it off"
        rows.append(
            f"| `--{flag.name}` | `{_cell(format_default(flag))}` | `{flag.env}` | {_cell(meaning)} |"
        )
    return "\n".join(rows) + "\n"


def readme_table(readme: str) -> str | None:
    """The flag table between the README's markers, or None without markers."""
    if README_BEGIN not in readme or README_END not in readme:
        return None
    return readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"


def default_yaml() -> str:
    """configs/default.yaml: every YAML key with its default, commented out."""
    import yaml

    lines = ["# Every setting of vLLMDeploy.py with its built-in default, for --config FILE.yaml.",
             "# Generated by `python -m agent.service.settings --default-yaml`; do not edit by hand.",
             "# Keys are flag names; uncomment and change what you need. Precedence:",
             "# command line > environment (VLLM_DEPLOY_<NAME>) > this file > defaults."]
    group = None
    for flag in FLAGS:
        if not flag.in_yaml:
            continue
        if flag.group != group:
            group = flag.group
            lines += ["", f"# ---- {group}"]
        value = list(flag.default) if isinstance(flag.default, tuple) else flag.default
        dumped = yaml.safe_dump(value, default_flow_style=True, width=1000)
        choices = f" ({' / '.join(flag.choices)})" if flag.choices else ""
        lines += [f"# {line}" for line in textwrap.wrap(flag.help + choices, 96)]
        lines.append(f"# {flag.name}: {dumped.removesuffix(chr(10) + '...' + chr(10)).strip()}")
    return "\n".join(lines) + "\n"
