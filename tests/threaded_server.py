"""An ASGI app served by uvicorn in a daemon thread, on a socket bound before the server
starts: the port is held from the moment it is chosen, so no other test process can take it
between the choice and the server's bind."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def threaded_server(
    app: Any,
    host: str = "127.0.0.1",
    *,
    start_timeout: float = 60,
    stop_timeout: float = 600,
    what: str = "the server",
    **config: Any,
) -> Iterator[int]:
    """Serve ``app`` on a free port of ``host`` for the block; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout)
        sock.close()
