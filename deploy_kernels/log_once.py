"""Which path a kernel or quantization method takes, and each fallback (a GPU without FP8, a
shape a kernel cannot take), logged once per process rather than at every call."""

from __future__ import annotations

import logging

log = logging.getLogger("deploy_kernels.fallback")

_LOGGED: set[str] = set()


def log_once(
    logger: logging.Logger, key: str, message: str, *args: object, level: int = logging.INFO
) -> None:
    """One log line per ``key`` in this process."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, message, *args)


def log_fallback_once(key: str, message: str, *args: object) -> None:
    """One warning per fallback kind."""
    log_once(log, key, message, *args, level=logging.WARNING)
