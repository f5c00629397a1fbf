"""uvicorn serving the HTTP door's app from a thread of the agent's process."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None) -> None:
        self._config = uvicorn.Config(
            app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
            log_level="warning", access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=5,
            log_config=None)  # uvicorn's lines through the agent's handler: escaped, one line each
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.scheme = "https" if ssl_certfile else "http"

    @property
    def port(self) -> int | None:
        servers = getattr(self._server, "servers", None)
        if not servers:
            return None
        return servers[0].sockets[0].getsockname()[1]

    def start(self, timeout: float = 15.0) -> None:
        """Returns once listening; ValueError if the port cannot be taken."""
        self._thread = threading.Thread(target=self._server.run, name="agent-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ValueError(f"--http_port {self._config.port}: the HTTP API could not "
                                 f"listen on {self._config.host}")
            time.sleep(0.02)
        log.info("OpenAI-compatible API on %s://%s:%d/v1", self.scheme, self._config.host,
                 self.port)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)
