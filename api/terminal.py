"""The terminal WebSocket: browser frames ⇄ a terminal session of the engine
(engine/terminal/session.py: the shell's tmux client, recording, activity, submit, hang-up).

Binary frames carry terminal bytes both ways; a text frame ``{"type": "resize", "cols": C,
"rows": R}`` resizes. With ``?mode=watch`` (a member's or an admin's key, never a candidate's
token) the client attaches read-only. This module authenticates, turns frames into calls on
the session and its output into frames, and nothing else. Close codes: 4401 unauthorized,
4403 a candidate's token asked to watch, 4404 no such sandbox, 4409 not running, 4429 too
many authentication failures from the address (api/failures.py), 1009 a frame over
MAX_FRAME, 1011 a recorded session whose recording cannot be written.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.deps import (
    TooManyFailures,
    Unauthorized,
    check_failures,
    count_failure,
    presented_key,
    request_client,
)
from engine import store, tokens
from engine.errors import NotFoundError
from engine.sandboxes.service import SandboxService
from engine.terminal.recordings import Viewer
from engine.terminal.session import NotRunning, RecordingUnavailable, TerminalSession

router = APIRouter(tags=["terminal"])
CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_NOT_RUNNING = 4401, 4403, 4404, 4409
CLOSE_TOO_MANY_FAILURES = 4429
CLOSE_TOO_BIG = 1009  # RFC 6455: a message too big to process
CLOSE_INTERNAL = 1011  # RFC 6455: the server cannot go on (a recording that cannot be written)
# The largest frame taken from a client: a paste is kilobytes. The server (engine/cli.py
# `serve`) refuses bigger ones before buffering them; this check holds under any server.
MAX_FRAME = 64 * 1024
_LOG = logging.getLogger(__name__)


async def _authorize(
    ws: WebSocket, service: SandboxService, sandbox_id: str, token: str | None
) -> tuple[store.SandboxRow, Viewer] | None:
    try:
        if token and token.startswith(tokens.PREFIX):
            check_failures(ws)
            try:
                presented_key(ws, token)  # a header beside the token: refused unless the same
            except Unauthorized:
                count_failure(ws)
                raise
            if tokens.verify(ws.app.state.secret_key, token) != sandbox_id:
                count_failure(ws)
                await ws.close(CLOSE_UNAUTHORIZED, "the access token does not open this sandbox")
                return None
            row: store.SandboxRow | None = await service.db(store.get_sandbox, sandbox_id)
            if row is None:
                await ws.close(CLOSE_NOT_FOUND, "no such sandbox")
                return None
            return row, Viewer("candidate", "candidate")
        client = await request_client(ws, token)
    except TooManyFailures as exc:
        await ws.close(CLOSE_TOO_MANY_FAILURES, exc.detail)
        return None
    except Unauthorized as exc:
        default = exc.detail == Unauthorized().detail
        reason = "a valid API key or access token is required" if default else exc.detail
        await ws.close(CLOSE_UNAUTHORIZED, reason)
        return None
    try:
        return await service.get(client, sandbox_id), Viewer(client.role, client.name)
    except NotFoundError:
        await ws.close(CLOSE_NOT_FOUND, "no such sandbox")
        return None


@router.websocket("/api/v1/ws/terminal/{sandbox_id}")
async def terminal(
    ws: WebSocket, sandbox_id: str, token: str | None = None, mode: Literal["watch"] | None = None
) -> None:
    service: SandboxService = ws.app.state.service
    # Accept first: a refusal is then a close with a code the client can read, not a bare 403.
    await ws.accept()
    authorized = await _authorize(ws, service, sandbox_id, token)
    if authorized is None:
        return
    row, viewer = authorized
    watch = mode == "watch"
    if watch and viewer.role == "candidate":
        await ws.close(CLOSE_FORBIDDEN, "a candidate's link cannot watch")
        return
    if row.state != "running" or not (row.outputs or {}).get("workspace"):
        await ws.close(CLOSE_NOT_RUNNING, f"the sandbox is {row.state}")
        return
    session = service.terminal(row, viewer, watch=watch)
    try:
        try:
            first = await session.open()
        except NotRunning as exc:
            await ws.close(CLOSE_NOT_RUNNING, str(exc))
            return
        except RecordingUnavailable as exc:  # the operator's problem, said plainly to the user
            _LOG.error("terminal of %s refused: its recording cannot be written: %s", row.id, exc)
            await ws.close(
                CLOSE_INTERNAL, "this session is recorded and its recording cannot be written"
            )
            return
        if first:
            await ws.send_bytes(first)
        await _pump(ws, session)
    except (OSError, WebSocketDisconnect):
        pass
    finally:
        await session.close()


async def _pump(ws: WebSocket, session: TerminalSession) -> None:
    """Two pumps, on the event loop itself (no thread per read or write); when either side
    ends, the other is stopped."""

    async def from_shell() -> None:
        while True:
            data = await session.read()
            if not data:
                await ws.close(1000, "the shell ended")
                return
            await ws.send_bytes(data)

    async def to_shell() -> None:
        while True:
            message: Any = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if len(message.get("bytes") or message.get("text") or "") > MAX_FRAME:
                await ws.close(CLOSE_TOO_BIG, f"frames are limited to {MAX_FRAME} bytes")
                return
            if message.get("bytes"):
                await session.write(message["bytes"])
            elif message.get("text"):
                await session.control(message["text"])

    tasks = [asyncio.create_task(from_shell()), asyncio.create_task(to_shell())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
