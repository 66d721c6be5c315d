"""A real uvicorn server in a thread, for tests over HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
import websockets

from api.app import create_app
from engine.settings import Settings


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="info",
            log_config=None,  # records reach the root logger (and the tests' caplog)
            ws="websockets-sansio",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=600)


class Terminal:
    """A WebSocket terminal client: type, read until some text shows, resize."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen = b""

    async def type(self, text: str) -> None:
        await self.ws.send(text.encode())

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def expect(self, needle: str, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while needle.encode() not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen; last output: {self.seen[-400:]!r}")
            message = await asyncio.wait_for(self.ws.recv(), left)
            self.seen += message if isinstance(message, bytes) else message.encode()


async def close_code(url: str) -> int:
    """Connect and return the close code the server ends with."""
    try:
        async with websockets.connect(url) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006
    return 1000
