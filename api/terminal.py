"""The terminal WebSocket: browser ⇄ ``docker exec`` (TTY) into the workspace's tmux session.

Binary frames carry terminal bytes both ways; a text frame ``{"type": "resize", "cols": C,
"rows": R}`` resizes. The shell lives in tmux session ``main``: a dropped connection
reconnects to the same shell with its scrollback, and several viewers can attach at once.
With ``?mode=watch`` (a member's or an admin's key, never a candidate's token) the client
attaches read-only: it sees the session, its input frames are dropped, and its size never
changes the candidate's window. Every other session of a sandbox whose template records is
recorded (engine/recordings.py); each writes ``terminal`` events (connected, disconnected, idle
periods). Close codes: 4401 unauthorized, 4403 a candidate's token asked to watch, 4404 no such
sandbox, 4409 not running, 4429 too many authentication failures from the address
(api/failures.py), 1011 a recorded session whose recording cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any, Literal, NamedTuple

import docker
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.deps import (
    TooManyFailures,
    Unauthorized,
    check_failures,
    count_failure,
    presented_key,
    request_client,
)
from api.sessions import RecordingUnavailable, Session
from engine import store, tokens
from engine.errors import NotFoundError
from engine.recordings import Viewer
from engine.service import SandboxService

router = APIRouter(tags=["terminal"])
CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_NOT_RUNNING = 4401, 4403, 4404, 4409
CLOSE_TOO_MANY_FAILURES = 4429
CLOSE_TOO_BIG = 1009  # RFC 6455: a message too big to process
CLOSE_INTERNAL = 1011  # RFC 6455: the server cannot go on (a recording that cannot be written)
# The largest frame taken from a client: a paste is kilobytes. The server (engine/cli.py
# `serve`) refuses bigger ones before buffering them; this check holds under any server.
MAX_FRAME = 64 * 1024
MAX_SIZE = 1000  # columns or rows a resize may set; larger ones are ignored
# Attach to (or start) the session; the newest client's size wins, so a resize applies at once.
# Passthrough lets the workspace's `submit` command reach the engine through tmux (the sequence
# arrives unwrapped on the output stream). Before tmux, a handshake (start_exec): the shell
# prints its pid, which then becomes the tmux client's; when the connection ends, that client
# is sent SIGHUP — Docker leaves an exec running when its stream closes, and a client left
# attached keeps costing tmux rendering work and a share of the sandbox's process limit.
# The shell waits for a line from the engine before printing the pid (output that arrives
# with Docker's HTTP upgrade answer is swallowed by the HTTP client's buffer) and for another
# once the engine has it before starting tmux (tmux flushes the terminal's untransmitted
# output as it attaches); the engine then waits for tmux's first output before it passes on
# what the user types. A handshake left unanswered ends the shell after 60 s.
_HANDSHAKE = 'read -r -t 60 _ && echo "$$" && read -r -t 60 _ && '
TMUX = [
    "bash",
    "-c",
    _HANDSHAKE + "exec tmux new-session -A -s main \\; set-option -g window-size latest"
    " \\; set-option -g allow-passthrough on",
]
# A watcher: the same session (started if there is none yet), attached read-only and with
# ignore-size, so its size never sets the window's.
WATCH = [
    "bash",
    "-c",
    _HANDSHAKE + "{ tmux new-session -d -s main 2>/dev/null;"
    " exec tmux attach-session -t main -f read-only,ignore-size"
    " \\; set-option -g window-size latest \\; set-option -g allow-passthrough on; }",
]
HANDSHAKE_TIMEOUT = 30  # seconds the engine waits for the shell's pid
_LOG = logging.getLogger(__name__)


class Exec(NamedTuple):
    """A started terminal exec: its id, its stream, the pid of its tmux client in the
    container ("" when the handshake failed) and the output that followed the pid."""

    id: str
    sock: socket.socket
    pid: str
    rest: bytes


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
    workspace = (row.outputs or {}).get("workspace")
    if row.state != "running" or not workspace:
        await ws.close(CLOSE_NOT_RUNNING, f"the sandbox is {row.state}")
        return
    template = service.template(row.template)
    user, workdir = template.workspace.user, template.workspace.workdir
    client = docker.from_env(timeout=30)
    try:
        started = await asyncio.to_thread(
            start_exec, client, str(workspace), user, workdir, WATCH if watch else TMUX
        )
    except docker.errors.APIError as exc:
        await ws.close(CLOSE_NOT_RUNNING, f"the workspace is not running: {exc.explanation}"[:120])
        client.close()
        return
    exec_id, sock, pid, rest = started
    if not pid:  # the tmux client could not be hung up later: it is not started
        _LOG.warning("terminal of %s: no pid from the shell; closed", sandbox_id)
        sock.close()
        client.close()
        await ws.close(CLOSE_NOT_RUNNING, "the workspace's shell did not start")
        return
    session = Session(service, row, viewer, template.recording, watch=watch)
    try:
        sock.setblocking(False)
        try:
            await session.open()
        except RecordingUnavailable as exc:  # the operator's problem, said plainly to the user
            _LOG.error(
                "terminal of %s refused: its recording cannot be written: %s", sandbox_id, exc
            )
            await ws.close(
                CLOSE_INTERNAL, "this session is recorded and its recording cannot be written"
            )
            return
        if rest:
            session.output(rest)
            await ws.send_bytes(rest)
        await _bridge(ws, client, exec_id, sock, session)
    except (OSError, WebSocketDisconnect):
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        await asyncio.to_thread(_hang_up, client, str(workspace), user, pid)
        client.close()
        await session.close()


def start_exec(
    client: docker.DockerClient,
    container: str,
    user: str,
    workdir: str,
    command: list[str] = TMUX,
) -> Exec:
    """Start ``command`` (TMUX or WATCH) with a TTY and go through its handshake: blocking,
    for a worker thread."""
    api = client.api
    exec_id: str = api.exec_create(
        container,
        command,
        stdin=True,
        tty=True,
        user=user,
        workdir=workdir,
        environment={"TERM": "xterm-256color", "LANG": "en_US.UTF-8"},
    )["Id"]
    raw = api.exec_start(exec_id, tty=True, socket=True)
    sock: socket.socket = getattr(raw, "_sock", raw)
    pid, rest = "", b""
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.sendall(b"\n")  # Docker's answer is read: the shell may print its pid
        pid, rest = _read_pid(sock)
        if pid:
            sock.sendall(b"\n")  # the pid is here: tmux may start
            # Its first output (escape sequences) comes once it has set the terminal up: what
            # the user types from then on reaches tmux, none of it the shell before it.
            while b"\x1b" not in rest and len(rest) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
    except OSError as exc:  # a timeout included
        _LOG.info("terminal handshake in %s failed: %s", container[:12], exc)
    return Exec(exec_id, sock, pid, rest)


def _read_pid(sock: socket.socket) -> tuple[str, bytes]:
    """The first line the shell prints after the terminal's echo of the engine's newline: its
    pid. Returns it ("" if the line is not one) and whatever came after it."""
    data = b""
    while True:
        line, newline, rest = data.lstrip(b"\r\n").partition(b"\n")
        if newline or len(data) >= 64:
            pid = line.strip().decode(errors="replace")
            return (pid if newline and pid.isdigit() else ""), rest if newline else data
        chunk = sock.recv(64)
        if not chunk:
            return "", data
        data += chunk


def _hang_up(client: docker.DockerClient, container: str, user: str, pid: str) -> None:
    """Best effort: end this connection's tmux client (the session and its shell live on).
    As the workspace's user: with every capability dropped, only it may signal its own."""
    try:
        exec_id = client.api.exec_create(container, ["kill", "-HUP", pid], user=user)["Id"]
        client.api.exec_start(exec_id)
    except Exception as exc:  # a gone container, a stopped dockerd, a timeout: nothing to end
        _LOG.info("terminal client %s in %s not hung up: %s", pid, container[:12], exc)


async def _bridge(
    ws: WebSocket, client: docker.DockerClient, exec_id: str, sock: socket.socket, session: Session
) -> None:
    """Two pumps over the exec's socket, on the event loop itself (no thread per read or
    write); when either side ends, the other is stopped. A watcher's input is dropped."""
    loop = asyncio.get_running_loop()

    async def from_shell() -> None:
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                await ws.close(1000, "the shell ended")
                return
            session.output(data)
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
                if not session.watch:
                    session.input(message["bytes"])
                    await loop.sock_sendall(sock, message["bytes"])
            elif message.get("text"):
                await _control(client, exec_id, sock, message["text"], session)

    tasks = [asyncio.create_task(from_shell()), asyncio.create_task(to_shell())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _control(
    client: docker.DockerClient, exec_id: str, sock: socket.socket, text: str, session: Session
) -> None:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):  # "[[[[…" nests past the parser's stack
        if not session.watch:  # typed input
            session.input(text.encode())
            await asyncio.get_running_loop().sock_sendall(sock, text.encode())
        return
    if isinstance(message, dict) and message.get("type") == "resize":
        cols, rows = message.get("cols"), message.get("rows")
        if (
            type(cols) is int  # not a float, nor a bool (an int to isinstance)
            and type(rows) is int
            and 0 < cols <= MAX_SIZE
            and 0 < rows <= MAX_SIZE
        ):
            # A watcher's resize sizes its own client only (attached with ignore-size).
            session.resize(cols, rows)
            await asyncio.to_thread(client.api.exec_resize, exec_id, height=rows, width=cols)
