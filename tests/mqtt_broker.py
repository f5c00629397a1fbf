"""Start a private Mosquitto on a free local port for a test; never the system one on 1883."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).is_file()


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen
    workdir: Path
    users: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stops and starts the same broker (same port, same config), e.g. to test reconnects."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        self.process = _launch(self.workdir, self.port)


def _launch(workdir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(workdir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise RuntimeError("mosquitto did not accept connections within 10 s")


def start_broker(
    users: dict[str, str] | None = None, port: int | None = None, attempts: int = 3,
    listener_options: Sequence[str] = (),
    persistence: bool = False,
) -> Broker:
    """A running broker; with ``users``, anonymous access is off and a password file is used.

    ``port`` picks the port (a test that starts the agent before its broker); else a free one.
    ``listener_options``: lines for the listener, e.g. ``certfile ...`` for TLS.
    ``persistence``: sessions, queued messages and retained ones survive ``restart()``
    (saved when mosquitto stops on SIGTERM).
    """
    if users and not MOSQUITTO_PASSWD:
        raise RuntimeError("mosquitto_passwd is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="mosquitto-test-"))
    last: Exception | None = None
    for _ in range(attempts):  # a free port may be taken before mosquitto binds it
        listen_port = port or free_port()
        lines = [
            f"listener {listen_port} 127.0.0.1",
            *listener_options,
            *(["persistence true", f"persistence_location {workdir}/"] if persistence
              else ["persistence false"]),
            f"user {getpass.getuser()}",  # as root, mosquitto would drop to a user that cannot read our files
            f"log_dest file {workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if users:
            passwd = workdir / "passwd"
            passwd.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        (workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        try:
            process = _launch(workdir, listen_port)
        except RuntimeError as exc:
            last = exc
            continue
        return Broker("127.0.0.1", listen_port, process, workdir, dict(users or {}))
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"could not start mosquitto: {last}")
