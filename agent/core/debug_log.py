"""Prompts and replies, kept out of the main log: only ``--debug_log FILE`` writes them.

They hold patient text, so they never go to the main log at any level: the
``vllm_deploy.debug`` logger does not propagate, and without ``--debug_log`` it
has no handler that writes anywhere. With it, a size-capped file (one backup,
``FILE.1``) keeps the old server's debug_info.log behaviour. The file is the
agent user's alone (mode 0600, its backup too, whatever the umask), and each
record is one line: a session id cannot forge one (agent.core.log_format).
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO

from agent.core.log_format import OneLineFormatter

DEBUG_LOGGER = "vllm_deploy.debug"

debug_log = logging.getLogger(DEBUG_LOGGER)
debug_log.propagate = False
debug_log.addHandler(logging.NullHandler())  # no "last resort" handler to stderr
debug_log.setLevel(logging.CRITICAL + 1)  # off until enable_debug_log
PRIVATE = 0o600


class PrivateRotatingFileHandler(RotatingFileHandler):
    """A RotatingFileHandler whose file is created (and reopened after each rotation) with
    mode 0600: prompts are not for the other users of the machine. The backup is the
    renamed file, so it keeps the mode. A file left by an older version is made 0600."""

    def _open(self) -> IO[str]:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE)
        try:
            os.fchmod(fd, PRIVATE)  # an existing file keeps its mode through O_CREAT
            return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115
        except BaseException:
            os.close(fd)
            raise


def enable_debug_log(path: str, max_bytes: int) -> logging.Handler:
    """Writes every prompt and reply to ``path``, rotated at ``max_bytes`` (one backup);
    ValueError naming --debug_log when the file cannot be opened."""
    file = Path(path).expanduser()
    try:
        handler = PrivateRotatingFileHandler(file, maxBytes=max_bytes, backupCount=1,
                                             encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--debug_log {path}: cannot be opened ({exc.strerror or exc})") from None
    # not cut: the prompts and replies are what the file is for, and it rotates by size
    handler.setFormatter(OneLineFormatter("%(asctime)s %(message)s", max_chars=None))
    debug_log.addHandler(handler)
    debug_log.setLevel(logging.DEBUG)
    return handler


def disable_debug_log(handler: logging.Handler) -> None:
    """Undoes ``enable_debug_log`` (tests, a second agent in one process)."""
    debug_log.removeHandler(handler)
    handler.close()
    if not any(isinstance(h, RotatingFileHandler) for h in debug_log.handlers):
        debug_log.setLevel(logging.CRITICAL + 1)
