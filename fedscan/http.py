"""Run a FastAPI app with uvicorn on a background thread of a process (coordinator, agent)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


class BackgroundServer:
    """A uvicorn server for a FastAPI app on a daemon thread."""
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"http-{port}", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 15.0) -> None:
        """Start serving; ``RuntimeError`` if it is not up within ``timeout`` s."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
