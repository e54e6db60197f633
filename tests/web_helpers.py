"""A real jetpipe web server (uvicorn on a free port, in a thread of the test process) for API and browser
tests."""

from __future__ import annotations

import threading
import time

import uvicorn

from pipeline.devstack import free_port
from pipeline.web.app import create_app

#: Tokens the web tests configure: name -> (role, token).
TOKENS = {"ada": ("operator", "operator-token-0123456789"), "vic": ("viewer", "viewer-token-0123456789"),
          "svc": ("service", "service-token-0123456789")}
TOKENS_SETTING = ",".join(f"{name}:{role}:{token}" for name, (role, token) in TOKENS.items())


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


class WebServer:
    def __init__(self, settings, runtime):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings, runtime=runtime), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="web-test-server", daemon=True)

    def start(self) -> WebServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the web server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
