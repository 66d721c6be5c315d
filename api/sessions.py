"""What the terminal bridge reports a session's bytes to: its recording, its activity events
and the shell's submit. The byte path touches memory only; the database is written when the
session opens and closes, when an idle period ends, and for a submit."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import psycopg

from engine import recordings, store
from engine.recordings import Activity, Recorder, Viewer
from engine.service import SandboxService
from engine.store import SandboxRow
from engine.templates import Recording

log = logging.getLogger("sandbox_engine.terminal")


class RecordingUnavailable(Exception):
    """The session must be recorded and its recording cannot be written."""


class Session:
    """One terminal connection. A watcher's is not recorded and never submits."""

    def __init__(
        self,
        service: SandboxService,
        row: SandboxRow,
        viewer: Viewer,
        recording: Recording,
        *,
        watch: bool,
    ) -> None:
        self.service = service
        self.row = row
        self.viewer = viewer
        self.watch = watch
        now = time.time()
        self.activity = Activity(service.settings.idle_after, now)
        self.recorder: Recorder | None = None
        self.recording_id = ""
        if recording.enabled and not watch:
            self.recording_id = secrets.token_hex(8)
            self.recorder = Recorder(
                recordings.recording_path(
                    service.settings.recordings_path, row.id, self.recording_id
                ),
                title=f"{row.id} ({viewer.label})",
                record_input=recording.input,
            )
        self._tail = b""
        self._tasks: set[asyncio.Task[None]] = set()
        self._opened = False

    async def open(self) -> None:
        """Start the recording (file and row) and write the ``connected`` event. Raises
        RecordingUnavailable when the recording's file cannot be made (the session must not
        go on unrecorded)."""
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
        await self.service.db(begin)
        self._opened = True

    def output(self, data: bytes) -> None:
        now = time.time()
        self._active(now)
        if self.recorder is not None:
            self.recorder.output(data, now)
        if not self.watch:
            found, self._tail = recordings.find_submits(self._tail, data)
            for _ in range(found):
                self._later(self._submit())

    def input(self, data: bytes) -> None:
        now = time.time()
        self._active(now)
        if self.recorder is not None:
            self.recorder.input(data, now)

    def resize(self, cols: int, rows: int) -> None:
        if self.recorder is not None:
            self.recorder.resize(cols, rows, time.time())

    async def close(self) -> None:
        """Finish the recording and write the idle period it ends in and ``disconnected``."""
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
            await self.service.db(end)
        except psycopg.Error:  # the connection is over either way; the file is complete
            log.exception("terminal session of %s: its end was not recorded", self.row.id)

    def _active(self, now: float) -> None:
        idle = self.activity.touch(now)
        if idle is not None:
            message = recordings.idle_message(*idle)
            self._later(self.service.db(store.add_event, self.row.id, "terminal", message))

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
        await self.service.submit(self.row.id, by="shell")
