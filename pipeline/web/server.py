"""The web application served from a thread of the current process (the demo, and tests)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from pipeline.infra.runtime import Runtime
from pipeline.settings import Settings
from pipeline.web.app import create_app


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class BackgroundWebServer:
    """uvicorn on 127.0.0.1, on `port` (0: PIPELINE_WEB_PORT if free, else any free port)."""

    def __init__(self, settings: Settings, runtime: Runtime, *, port: int = 0):
        if not port:
            port = settings.web_port if _port_free(settings.web_port) else 0
        if not port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(settings, runtime=runtime), host="127.0.0.1", port=port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="jetpipe-web", daemon=True)

    def start(self, timeout_s: float = 20) -> BackgroundWebServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the web server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
