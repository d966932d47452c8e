"""Test helpers: run an app on an ephemeral loopback port in a background thread; poll."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI

from picochat.server.app import bind

MODEL = "fake"  # the name the test servers serve


@contextmanager
def live_server(app: FastAPI, *, wait_ready: bool = True) -> Iterator[str]:
    """Yield the base URL while uvicorn serves ``app``; with ``wait_ready``, once /health is 200."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        while not server.started:
            time.sleep(0.01)
        while wait_ready and httpx.get(url + "/health").status_code != 200:
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def wait_for(condition, what: str, limit_s: float = 20.0) -> None:
    """Poll until ``condition()``; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def open_request(url: str, body: dict) -> socket.socket:
    """Send a POST by hand, so the test can hang up whenever it likes."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock
