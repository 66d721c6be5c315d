"""A terminal session: one connection to a sandbox's shell, as an engine object.

The shell lives in tmux session ``main`` of the workspace: a dropped connection reconnects to
the same shell with its scrollback, and several viewers can attach at once. A session starts
its tmux client through the backend (``start_shell``), records what passes (asciicast,
engine/terminal/recordings.py) when the template records, writes the ``terminal`` events
(connected, idle periods, disconnected), recognises the workspace's ``submit`` command in the
output, and at its end hangs its tmux client up. A watcher's session (``watch``) attaches
read-only with ``ignore-size``: its input is dropped, its size never changes the candidate's
window, it is not recorded and never submits.

The transport (api/terminal.py) only moves bytes: ``read()`` the shell's output, ``write()``
typed input, ``control()`` a text frame (a resize), ``close()``. Nothing here calls back up.

The handshake, before tmux (``start_shell``): the shell prints its pid, which then becomes
the tmux client's; when the connection ends, that client is sent SIGHUP — an exec stays running
when its stream closes, and a client left attached keeps costing tmux rendering work and a
share of the sandbox's process limit. The shell waits for a line from the engine before
printing the pid (output that arrives with Docker's HTTP upgrade answer is swallowed by the
HTTP client's buffer) and for another once the engine has it before starting tmux (tmux flushes
the terminal's untransmitted output as it attaches); the engine then waits for tmux's first
output before it passes on what the user types. A handshake left unanswered ends the shell
after 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import psycopg

from engine import store
from engine.backend import Backend, BackendError
from engine.errors import EngineError
from engine.model.templates import Template
from engine.store import SandboxRow
from engine.terminal import recordings
from engine.terminal.recordings import Activity, Recorder, Viewer

log = logging.getLogger("sandbox_engine.terminal")

_HANDSHAKE = 'read -r -t 60 _ && echo "$$" && read -r -t 60 _ && '
# Attach to (or start) the session; the newest client's size wins, so a resize applies at once.
# Passthrough lets the workspace's `submit` command reach the engine through tmux (the sequence
# arrives unwrapped on the output stream).
# The session's server (and so every shell of it) starts under the image's seccomp filter,
# sandbox-confine (images/workspace-base/confine.c), where the image has it.
TMUX_COMMAND = "$(command -v sandbox-confine) tmux"
TMUX = [
    "bash",
    "-c",
    _HANDSHAKE + f"exec {TMUX_COMMAND} new-session -A -s main \\; set-option -g window-size"
    " latest \\; set-option -g allow-passthrough on",
]
# A watcher: the same session (started if there is none yet), attached read-only and with
# ignore-size, so its size never sets the window's.
WATCH = [
    "bash",
    "-c",
    _HANDSHAKE + f"{{ {TMUX_COMMAND} new-session -d -s main 2>/dev/null;"
    " exec tmux attach-session -t main -f read-only,ignore-size"
    " \\; set-option -g window-size latest \\; set-option -g allow-passthrough on; }",
]
HANDSHAKE_TIMEOUT = 30  # seconds the engine waits for the shell's pid
MAX_SIZE = 1000  # columns or rows a resize may set; larger ones are ignored
ENVIRONMENT = {"TERM": "xterm-256color", "LANG": "en_US.UTF-8"}


class NotRunning(EngineError):
    """The sandbox's shell cannot be reached (the workspace is not running, or its shell did
    not start)."""


class RecordingUnavailable(EngineError):
    """The session must be recorded and its recording cannot be written."""


class Exec(NamedTuple):
    """A started terminal exec: its id, its stream, the pid of its tmux client in the
    container ("" when the handshake failed), the output that followed the pid, and what to
    call once the stream is closed."""

    id: str
    sock: socket.socket
    pid: str
    rest: bytes
    release: Callable[[], None]


def start_shell(
    backend: Backend, container: str, user: str, workdir: str, command: list[str] = TMUX
) -> Exec:
    """Start ``command`` (TMUX or WATCH) with a TTY and go through its handshake: blocking,
    for a worker thread."""
    started = backend.interactive(
        container, command, user=user, workdir=workdir, environment=ENVIRONMENT
    )
    sock = started.sock
    pid, rest = "", b""
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.sendall(b"\n")  # the backend's answer is read: the shell may print its pid
        pid, rest = read_pid(sock)
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
        log.info("terminal handshake in %s failed: %s", container[:12], exc)
    return Exec(started.exec_id, sock, pid, rest, started.release)


def read_pid(sock: socket.socket) -> tuple[str, bytes]:
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


Db = Callable[..., Awaitable[Any]]
Submit = Callable[[str], Awaitable[object]]


class TerminalSession:
    """One terminal connection (module docstring). ``db`` runs a repository function in a
    transaction; ``submit(sandbox_id)`` is the candidate's submit from the shell."""

    def __init__(
        self,
        *,
        backend: Backend,
        db: Db,
        submit: Submit,
        row: SandboxRow,
        template: Template,
        viewer: Viewer,
        watch: bool,
        recordings_path: Any,
        idle_after: float,
    ) -> None:
        self.backend, self.db, self._submit_to = backend, db, submit
        self.row, self.template, self.viewer, self.watch = row, template, viewer, watch
        self.workspace = str((row.outputs or {}).get("workspace") or "")
        self.activity = Activity(idle_after, time.time())
        self.recorder: Recorder | None = None
        self.recording_id = ""
        if template.recording.enabled and not watch:
            self.recording_id = secrets.token_hex(8)
            self.recorder = Recorder(
                recordings.recording_path(recordings_path, row.id, self.recording_id),
                title=f"{row.id} ({viewer.label})",
                record_input=template.recording.input,
            )
        self._exec: Exec | None = None
        self._tail = b""
        self._tasks: set[asyncio.Task[None]] = set()
        self._opened = False

    # --- the connection ---------------------------------------------------------------------

    async def open(self) -> bytes:
        """Start the shell's tmux client and the recording, write ``connected``; returns the
        shell's first output. NotRunning when the shell cannot be reached, RecordingUnavailable
        when the session must be recorded and cannot be (it must not go on unrecorded)."""
        if self.row.state != "running" or not self.workspace:
            raise NotRunning(f"the sandbox is {self.row.state}")
        ws = self.template.workspace
        try:
            self._exec = await asyncio.to_thread(
                start_shell,
                self.backend,
                self.workspace,
                ws.user,
                ws.workdir,
                WATCH if self.watch else TMUX,
            )
        except BackendError as exc:
            raise NotRunning(f"the workspace is not running: {exc}"[:120]) from exc
        if not self._exec.pid:  # its tmux client could not be hung up later: not started
            log.warning("terminal of %s: no pid from the shell; closed", self.row.id)
            raise NotRunning("the workspace's shell did not start")
        self._exec.sock.setblocking(False)
        await self._begin()
        rest = self._exec.rest
        if rest:
            self._output(rest)
        return rest

    async def read(self) -> bytes:
        """The shell's next output (b"" once it ended)."""
        assert self._exec is not None
        data = await asyncio.get_running_loop().sock_recv(self._exec.sock, 65536)
        if data:
            self._output(data)
        return data

    async def write(self, data: bytes) -> None:
        """What the user typed (a watcher's is dropped)."""
        assert self._exec is not None
        if self.watch:
            return
        self._input(data)
        await asyncio.get_running_loop().sock_sendall(self._exec.sock, data)

    async def control(self, text: str) -> None:
        """A text frame: ``{"type": "resize", "cols": C, "rows": R}``, or typed text."""
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # "[[[[…" nests past the parser's stack
            await self.write(text.encode())
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
                if self.recorder is not None:
                    self.recorder.resize(cols, rows, time.time())
                assert self._exec is not None
                await asyncio.to_thread(self.backend.resize, self._exec.id, cols=cols, rows=rows)

    async def close(self) -> None:
        """End the connection: its tmux client hung up, the recording finished, the idle
        period it ends in and ``disconnected`` written."""
        if self._exec is not None:
            with contextlib.suppress(OSError):
                self._exec.sock.shutdown(socket.SHUT_RDWR)
            self._exec.sock.close()
            if self._exec.pid:
                await asyncio.to_thread(self._hang_up, self._exec.pid)
            self._exec.release()
        await self._end()

    def _hang_up(self, pid: str) -> None:
        """Best effort: end this connection's tmux client (the session and its shell live
        on). As the workspace's user: with every capability dropped, only it may signal its
        own."""
        try:
            self.backend.run(
                self.workspace, ["kill", "-HUP", pid], user=self.template.workspace.user
            )
        except BackendError as exc:  # a gone container, a stopped daemon: nothing to end
            log.info("terminal client %s in %s not hung up: %s", pid, self.workspace[:12], exc)

    # --- what it records -------------------------------------------------------------------

    async def _begin(self) -> None:
        recorder = self.recorder

        def begin(conn: psycopg.Connection) -> None:
            if recorder is not None:
                recordings.open_recording(
                    conn,
                    self.recording_id,
                    sandbox_id=self.row.id,
                    owner_id=self.row.owner_id,
                    viewer=self.viewer,
                    has_input=recorder.record_input,
                )
            message = recordings.connect_message(self.viewer, watch=self.watch)
            store.add_event(conn, self.row.id, "terminal", message)

        if recorder is not None:
            try:
                recorder.start()
            except OSError as exc:
                raise RecordingUnavailable(f"{recorder.path}: {exc.strerror or exc}") from exc
        await self.db(begin)
        self._opened = True

    def _output(self, data: bytes) -> None:
        now = time.time()
        self._active(now)
        if self.recorder is not None:
            self.recorder.output(data, now)
        if not self.watch:
            found, self._tail = recordings.find_submits(self._tail, data)
            for _ in range(found):
                self._later(self._submit())

    def _input(self, data: bytes) -> None:
        now = time.time()
        self._active(now)
        if self.recorder is not None:
            self.recorder.input(data, now)

    async def _end(self) -> None:
        now = time.time()
        recorder, size = self.recorder, 0
        if recorder is not None:
            size = await recorder.close(now)
        if not self._opened:  # refused as it opened: nothing was recorded of it
            return
        idle = self.activity.closing(now)

        def end(conn: psycopg.Connection) -> None:
            if recorder is not None:
                recordings.close_recording(
                    conn,
                    self.recording_id,
                    width=recorder.width,
                    height=recorder.height,
                    size=size,
                )
            if idle is not None:
                store.add_event(conn, self.row.id, "terminal", recordings.idle_message(*idle))
            message = recordings.disconnect_message(
                self.viewer, now - self.activity.started, watch=self.watch
            )
            store.add_event(conn, self.row.id, "terminal", message)

        if self._tasks:
            await asyncio.wait(self._tasks)
        try:
            await self.db(end)
        except psycopg.Error:  # the connection is over either way; the file is complete
            log.exception("terminal session of %s: its end was not recorded", self.row.id)

    def _active(self, now: float) -> None:
        idle = self.activity.touch(now)
        if idle is not None:
            message = recordings.idle_message(*idle)
            self._later(self.db(store.add_event, self.row.id, "terminal", message))

    def _later(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except Exception:  # an event or a submit lost is logged; the terminal goes on
            log.exception("terminal session of %s: background work failed", self.row.id)

    async def _submit(self) -> None:
        log.info("sandbox %s: submit from the shell", self.row.id)
        await self._submit_to(self.row.id)
