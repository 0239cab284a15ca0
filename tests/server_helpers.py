"""A real uvicorn server on 127.0.0.1 in a background thread, for the serving tests."""
import socket
import threading
import time

import httpx
import uvicorn

from lumen.serve import create_app


class RunningServer:
    """uvicorn serving create_app(engine, **limits) on a free port until stop()."""

    def __init__(self, engine, model_name="default", **limits):
        self.app = create_app(engine, model_name=model_name, **limits)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 60 s")
            time.sleep(0.02)

    @property
    def batcher(self):
        return self.app.state.batcher

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 120, **kw})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
