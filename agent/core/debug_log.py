"""Prompts and replies, kept out of the main log: only ``--debug_log FILE`` writes them.

They hold patient text, so they never go to the main log at any level: the
``vllm_deploy.debug`` logger does not propagate, and without ``--debug_log`` it
has no handler that writes anywhere. With it, a size-capped file (one backup,
``FILE.1``) keeps the old server's debug_info.log behaviour.
"""

from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler
from pathlib import Path

DEBUG_LOGGER = "vllm_deploy.debug"

debug_log = logging.getLogger(DEBUG_LOGGER)
debug_log.propagate = False
debug_log.addHandler(logging.NullHandler())  # no "last resort" handler to stderr
debug_log.setLevel(logging.CRITICAL + 1)  # off until enable_debug_log


def enable_debug_log(path: str, max_bytes: int) -> logging.Handler:
    """Writes every prompt and reply to ``path``, rotated at ``max_bytes`` (one backup);
    ValueError naming --debug_log when the file cannot be opened."""
    file = Path(path).expanduser()
    try:
        handler = RotatingFileHandler(file, maxBytes=max_bytes, backupCount=1, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--debug_log {path}: cannot be opened ({exc.strerror or exc})") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    debug_log.addHandler(handler)
    debug_log.setLevel(logging.DEBUG)
    return handler


def disable_debug_log(handler: logging.Handler) -> None:
    """Undoes ``enable_debug_log`` (tests, a second agent in one process)."""
    debug_log.removeHandler(handler)
    handler.close()
    if not any(isinstance(h, RotatingFileHandler) for h in debug_log.handlers):
        debug_log.setLevel(logging.CRITICAL + 1)
