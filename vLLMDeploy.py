#!/usr/bin/env python3
"""Serve one LLM to several projects over MQTT, on our own engine.

Same flags as the old vLLM-based script (plus new ones); ``--help`` lists them.
Order matters here: settings are parsed and ``CUDA_VISIBLE_DEVICES`` is set
before torch is imported anywhere, so torch only ever sees the chosen GPUs.
A user error prints one line ``error: ...`` and exits with code 2.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.core.log_format import OneLineFormatter
from agent.service.settings import Settings, SettingsError, parse_settings

if TYPE_CHECKING:
    from projects import ProjectSpec

log = logging.getLogger("vllm_deploy")
USER_ERROR = 2
_DEVICE_ID = re.compile(r"^(\d+|GPU-[0-9A-Fa-f\-]+|MIG-[\w\-/]+)$")


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def setup_logging(level: str) -> None:
    """The main log, on stderr (the journal under systemd): one line per log call, whatever
    a client put in an id or topic (agent.core.log_format)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)


def start_debug_log(settings: Settings) -> None:
    """--debug_log FILE: prompts and replies to FILE only (agent.core.debug_log), never the main log."""
    if settings.debug_log is None:
        return
    from agent.core.debug_log import enable_debug_log

    enable_debug_log(settings.debug_log, settings.debug_log_max_bytes)
    log.info("writing prompts and replies to %s (--debug_log)", settings.debug_log)


def visible_device_ids(value: str) -> list[str]:
    ids = [part.strip() for part in value.split(",") if part.strip()]
    bad = [i for i in ids if not _DEVICE_ID.match(i)]
    if not ids or bad:
        raise UserError(f"--visible_devices {value!r}: give GPU indices separated by commas, e.g. 0 or 0,1")
    return ids


def pin_devices(settings: Settings) -> None:
    """Set CUDA_VISIBLE_DEVICES from --visible_devices; must run before torch is imported."""
    if "torch" in sys.modules:  # an internal invariant: the launcher imports torch later
        raise RuntimeError("torch was imported before the visible devices were set")
    if settings.visible_devices is None:
        return
    if settings.device == "cpu":
        log.warning("--visible_devices %s is ignored with --device cpu", settings.visible_devices)
        return
    ids = visible_device_ids(settings.visible_devices)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # indices as nvidia-smi shows them
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    log.info("CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])


def check_devices(settings: Settings) -> None:
    """Fail at start, not at the first request, when the asked-for GPUs are not there."""
    if settings.device == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings.visible_devices is not None:
        wanted = len(visible_device_ids(settings.visible_devices))
        if count == 0:
            raise UserError(
                f"--visible_devices {settings.visible_devices}: no such CUDA GPU on this machine "
                "(torch sees none); check the indices with nvidia-smi, or use --device cpu"
            )
        if count < wanted:
            raise UserError(
                f"--visible_devices {settings.visible_devices}: asks for {wanted} GPUs but only "
                f"{count} of them exist; check the indices with nvidia-smi"
            )
        if wanted > 1:
            log.warning("%d GPUs visible: this engine uses the first one only", wanted)
    elif settings.device == "cuda" and count == 0:
        raise UserError("--device cuda: no CUDA GPU is available (torch sees none); "
                        "use --device cpu or --device auto")


def load_projects(names: Sequence[str]) -> dict[str, ProjectSpec]:
    from projects import load_project

    return {name: load_project(name) for name in names}


def start(settings: Settings) -> None:
    from agent.service.notifier import ServiceNotifier
    from engine import create_engine
    from engine.model_source import resolve_model

    # Under systemd (Type=notify): STATUS= lines while loading, READY=1 once subscribed.
    service = ServiceNotifier()
    service.start()
    service.loading(f"loading model {settings.model}")
    check_devices(settings)  # before a download that may take an hour
    if settings.metrics_port is not None:  # ... and before loading the model
        from agent.service.prometheus import require_prometheus

        require_prometheus()
    model_path = resolve_model(
        settings.model,
        provider=settings.model_provider,
        cache_dir=settings.model_cache_dir,
        revision=settings.model_revision,
        auto_download=settings.auto_download,
    )
    from agent.mqtt.status import AgentInfo
    from agent.service.app import Agent, served_projects

    agent_config = settings.agent_config()
    projects = load_projects(served_projects(agent_config))
    from agent.service.session_store import open_store

    store = open_store(agent_config)  # a bad URL or unreachable Redis fails before the model loads
    # each project's KV share (its YAML's kv_share) sizes its token budget from the start
    engine_config = settings.engine_config(
        str(model_path), project_shares={name: p.kv_share for name, p in projects.items()}
    )
    log.info("loading %s on device %s for projects %s", model_path, settings.device,
             ", ".join(projects))
    engine = create_engine(engine_config)
    info = AgentInfo(model=settings.model, quantization=engine.quantization)
    agent = Agent(agent_config, engine, projects, store=store, info=info, service=service)
    freeze_start_up_objects()
    agent.run_forever()


def freeze_start_up_objects() -> None:
    """Takes what start-up built (torch, transformers, the model: some 10^5 objects that live
    until exit) out of the cyclic garbage collector's reach. A full collection scans every
    tracked object while holding the GIL: over these, ~0.3 s with no reply sent and no
    engine step (docs/BENCHMARKS.md); after this, only objects made while serving."""
    gc.collect()
    gc.freeze()
    log.debug("%d start-up objects exempt from garbage collection", gc.get_freeze_count())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    setup_logging(settings.log_level)
    for note in settings.notices:
        log.warning("%s", note)
    for line in settings.describe():
        log.debug("setting %s", line)
    try:
        start_debug_log(settings)
        pin_devices(settings)
        start(settings)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except Exception as exc:
        message = _user_message(exc)
        if message is None:
            raise
        log.debug("details of the error", exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR
    return 0


def _user_message(exc: Exception) -> str | None:
    """The one-line message of an error a user can fix; None for a bug (traceback)."""
    from agent.mqtt.client import MqttConnectError
    from engine.api import EngineError

    if isinstance(exc, (UserError, EngineError, MqttConnectError, ValueError)):
        return " ".join(str(exc).split())
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return ("out of memory while loading the model: lower --max_model_len, --max_num_seqs "
                "or --gpu_memory_utilization, or use a smaller model")
    return None


if __name__ == "__main__":
    sys.exit(main())
