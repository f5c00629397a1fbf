"""The sd_notify protocol, our own small implementation (no libsystemd, no extra package).

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: an ``AF_UNIX``
datagram socket, a file path or, starting with ``@``, a name in the abstract
namespace. Each notification is one datagram of ``KEY=VALUE`` lines
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). With
``WatchdogSec=`` set, ``$WATCHDOG_USEC`` holds the limit and a healthy
service pings at half of it. Without ``$NOTIFY_SOCKET`` (not under systemd)
every call is a no-op, and no call ever raises into the caller: a service
must not fail because its supervisor cannot be told something.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

MAX_STATUS_CHARS = 200  # systemctl status shows one line; keep it short


def socket_address(value: str | None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as an ``AF_UNIX`` address: a path, or abstract (``@name`` ->
    ``b"\\0name"``); None where it is unset, empty, or not a Unix socket (e.g. ``vsock:``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET %r is not a Unix socket path; systemd notifications are off", value)
    return None


def watchdog_limit(env: Mapping[str, str]) -> float | None:
    """Seconds of ``$WATCHDOG_USEC`` when the watchdog is meant for this process (``$WATCHDOG_PID``
    unset or ours, as sd_watchdog_enabled() checks); None when off or malformed."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None
    return value / 1e6 if value > 0 else None


class SdNotify:
    """Sends notifications to ``$NOTIFY_SOCKET``; ``enabled`` is False without one.

    Thread-safe; one socket is opened on first use and reused.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET"))
        self.watchdog_limit = watchdog_limit(env) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False  # warn once, not at every watchdog ping

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the limit); None when there is no watchdog."""
        return None if self.watchdog_limit is None else self.watchdog_limit / 2

    def notify(self, **fields: object) -> bool:
        """Sends ``KEY=value`` lines, e.g. ``notify(ready=1, status="serving")``; True if sent.

        Keys are upper-cased; a value may not contain a newline (it is replaced by a space).
        """
        if self.address is None or not fields:
            return False
        lines = [f"{key.upper()}={' '.join(str(value).splitlines())}" for key, value in fields.items()]
        return self._send("\n".join(lines).encode("utf-8", "replace"))

    def ready(self, status: str | None = None) -> bool:
        return self.notify(ready=1, **({} if status is None else {"status": _short(status)}))

    def status(self, text: str) -> bool:
        return self.notify(status=_short(text))

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(stopping=1, **({} if status is None else {"status": _short(status)}))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, data: bytes) -> bool:
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)  # type: ignore[arg-type]
            self._failed = False
            return True
        except Exception as exc:  # never into the caller: the service keeps serving
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            self._failed = True
            return False


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_STATUS_CHARS else text[: MAX_STATUS_CHARS - 3] + "..."
