"""One log call, one log line: text a client chose cannot forge a line of the agent's log.

Request ids, session ids, client ids, topics and templates come from any broker or
HTTP client and reach log messages through ``%s``. A newline in one would start a
line of the client's choosing in the log (journald too splits stderr at newlines),
an escape sequence would rewrite the operator's terminal. ``OneLineFormatter``
escapes every control character of the formatted message, so the guard holds for
every log call, those written later included, wherever the agent's logging is set
up (vLLMDeploy.py for the main log, agent.core.debug_log for ``--debug_log``). A
traceback (``exc_text``, ``stack_info``) is the agent's own text and stays
multi-line. The main log also bounds a message's length: a megabyte id logged once
would be a megabyte line.
"""

from __future__ import annotations

import logging
import re

# A log message longer than this is cut (the main log): some 100 ids or topics at their bounds.
MAX_MESSAGE_CHARS = 8192
# C0 and C1 controls, DEL, and the separators that str.splitlines and some viewers break at.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str, max_chars: int | None = MAX_MESSAGE_CHARS) -> str:
    """``text`` with its control characters escaped (a newline shows as ``\\n``), cut to
    ``max_chars`` (None: not cut) with the number of characters left out said."""
    if max_chars is not None and len(text) > max_chars:
        text = f"{text[:max_chars]}... ({len(text) - max_chars} more characters)"
    return _UNSAFE.sub(_escaped, text)


class OneLineFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose message part is always one line of bounded length."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None,
                 max_chars: int | None = MAX_MESSAGE_CHARS) -> None:
        super().__init__(fmt, datefmt)
        self.max_chars = max_chars

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        # Formatter.format appends the traceback after this: it keeps its own lines.
        return one_line(super().formatMessage(record), self.max_chars)
