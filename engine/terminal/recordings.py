"""Terminal sessions: their recordings (asciicast v2), their activity, and the shell's submit.

A recorded session is one file, ``<recordings_dir>/<sandbox_id>/<id>.cast``: a header line,
then ``[seconds, code, text]`` lines — ``"o"`` output, ``"i"`` input (when the template records
it), ``"r"`` a resize to ``"COLSxROWS"``. Events are kept in memory and appended to the file
once a second and on close: the byte path costs no system call, and a crash loses at most a
second. A row in ``recordings`` describes the session (who, when, size); it outlives the
sandbox's row, and the reaper deletes both after ``recording_retention``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import psycopg
from psycopg.rows import class_row

from engine.units import format_duration_short

FLUSH_EVERY = 1.0  # seconds between appends to a recording's file
# The size a session starts at before its client's first resize (tmux's own default).
DEFAULT_SIZE = (80, 24)
# What the workspace's `submit` command prints (through tmux's passthrough, which unwraps it).
SUBMIT = b"\x1b]1337;SandboxSubmit\x07"
_SELECT = (
    "SELECT id, sandbox_id, owner_id, role, client, started_at, ended_at, width, height, bytes,"
    " has_input FROM recordings"
)


@dataclass(frozen=True)
class Viewer:
    """Who opened a terminal: ``role`` candidate, member or admin; ``name`` the key's name."""

    role: str
    name: str

    @property
    def label(self) -> str:
        return "candidate" if self.role == "candidate" else self.name


@dataclass(frozen=True)
class RecordingRow:
    id: str
    sandbox_id: str
    owner_id: int | None
    role: str
    client: str
    started_at: datetime
    ended_at: datetime | None
    width: int
    height: int
    bytes: int
    has_input: bool


def recording_path(root: Path, sandbox_id: str, recording_id: str) -> Path:
    return root / sandbox_id / f"{recording_id}.cast"


class Recorder:
    """One session's asciicast file. Terminal bytes are decoded with incremental UTF-8
    decoders (one per direction: a character may be split across two chunks)."""

    def __init__(
        self, path: Path, *, title: str, record_input: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.title = title
        self.record_input = record_input
        self.started = clock()
        self.width, self.height = DEFAULT_SIZE
        self._lines: list[str] = []
        self._decoders = {
            code: codecs.getincrementaldecoder("utf-8")("replace") for code in ("o", "i")
        }
        self._file: BinaryIO | None = None
        self._header_written = False
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("xb")
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    def output(self, data: bytes, now: float) -> None:
        self._event(now, "o", self._decoders["o"].decode(data))

    def input(self, data: bytes, now: float) -> None:
        if self.record_input:
            self._event(now, "i", self._decoders["i"].decode(data))

    def resize(self, cols: int, rows: int, now: float) -> None:
        if not self._header_written:  # the header carries the size the client settled on
            self.width, self.height = cols, rows
        self._event(now, "r", f"{cols}x{rows}")

    def _event(self, now: float, code: str, text: str) -> None:
        if text:
            line = json.dumps([round(now - self.started, 6), code, text], ensure_ascii=False)
            self._lines.append(line)

    def flush(self) -> None:
        """Append what was recorded since the last flush (the header first, once)."""
        if self._file is None:
            return
        if not self._header_written:
            header = {
                "version": 2,
                "width": self.width,
                "height": self.height,
                "timestamp": int(self.started),
                "title": self.title,
                "env": {"TERM": "xterm-256color", "SHELL": "/bin/bash"},
            }
            self._lines.insert(0, json.dumps(header))
            self._header_written = True
        if self._lines:
            lines, self._lines = self._lines, []
            self._file.write(("\n".join(lines) + "\n").encode())
            self._file.flush()

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self.flush()

    async def close(self, now: float) -> int:
        """Write the rest and close the file; returns its size in bytes."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for code, decoder in self._decoders.items():
            self._event(now, code, decoder.decode(b"", final=True))
        self.flush()
        if self._file is None:
            return 0
        size = self._file.tell()
        self._file.close()
        self._file = None
        return size


class Activity:
    """When a session last had input or output, and the idle periods (``idle_after`` seconds
    or more of neither) that end as it goes on or closes. Pure: the caller passes the time."""

    def __init__(self, idle_after: float, now: float) -> None:
        self.idle_after = idle_after
        self.started = now
        self.last = now

    def touch(self, now: float) -> tuple[float, float] | None:
        """Activity at ``now``: returns the idle period it ends, if there was one."""
        gap = (self.last, now) if now - self.last >= self.idle_after else None
        self.last = now
        return gap

    def closing(self, now: float) -> tuple[float, float] | None:
        """The idle period the session closes in, if it does."""
        return (self.last, now) if now - self.last >= self.idle_after else None


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M")


def idle_message(start: float, end: float) -> str:
    """``idle 7 min: 12:01\u201312:08 UTC`` (an en dash between the times)."""
    span = f"{_clock(start)}\u2013{_clock(end)}"
    return f"idle {format_duration_short(int(end - start))}: {span} UTC"


def connect_message(viewer: Viewer, *, watch: bool) -> str:
    return f"connected: {viewer.label}" + (" (watch)" if watch else "")


def disconnect_message(viewer: Viewer, seconds: float, *, watch: bool) -> str:
    who = viewer.label + (" (watch)" if watch else "")
    return f"disconnected: {who} after {format_duration_short(int(seconds))}"


def find_submits(tail: bytes, data: bytes) -> tuple[int, bytes]:
    """How many submit sequences ``data`` completes, given the ``tail`` kept from the chunks
    before it; returns that and the tail to keep. The tail is one byte shorter than the
    sequence, so it never holds a whole one (nor is one counted twice: the sequence has ESC
    only at its start, so a counted one cannot overlap the next)."""
    buffer = tail + data
    return buffer.count(SUBMIT), buffer[-(len(SUBMIT) - 1) :]


# --- rows ------------------------------------------------------------------------------------


def open_recording(
    conn: psycopg.Connection,
    recording_id: str,
    *,
    sandbox_id: str,
    owner_id: int | None,
    viewer: Viewer,
    has_input: bool,
) -> None:
    conn.execute(
        "INSERT INTO recordings (id, sandbox_id, owner_id, role, client, width, height,"
        " has_input) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (recording_id, sandbox_id, owner_id, viewer.role, viewer.name, *DEFAULT_SIZE, has_input),
    )


def close_recording(
    conn: psycopg.Connection, recording_id: str, *, width: int, height: int, size: int
) -> None:
    conn.execute(
        "UPDATE recordings SET ended_at = now(), width = %s, height = %s, bytes = %s WHERE id = %s",
        (width, height, size, recording_id),
    )


def list_recordings(
    conn: psycopg.Connection, sandbox_id: str, *, owner_id: int | None
) -> list[RecordingRow]:
    """The sandbox's recordings, newest first; ``owner_id`` None: anyone's (an admin)."""
    with conn.cursor(row_factory=class_row(RecordingRow)) as cur:
        cur.execute(
            _SELECT + " WHERE sandbox_id = %s AND (%s::bigint IS NULL OR owner_id = %s)"
            " ORDER BY started_at DESC, id",
            (sandbox_id, owner_id, owner_id),
        )
        return cur.fetchall()


def past_retention(row: RecordingRow, now: datetime, retention: timedelta) -> bool:
    """Kept ``retention`` from its session's end; a session that never ended (its engine
    process died) counts from its start."""
    return (row.ended_at or row.started_at) <= now - retention


def prune(
    conn: psycopg.Connection, *, root: Path, now: datetime, retention: timedelta, limit: int = 500
) -> int:
    """Delete up to ``limit`` recordings past their retention, rows and files; returns how
    many. A file already gone is no error."""
    with conn.cursor(row_factory=class_row(RecordingRow)) as cur:
        # Started before the cutoff: a superset of those ended before it (the index's column).
        cur.execute(
            _SELECT + " WHERE started_at <= %s ORDER BY started_at LIMIT %s",
            (now - retention, limit),
        )
        doomed = [row for row in cur.fetchall() if past_retention(row, now, retention)]
    if not doomed:
        return 0
    conn.execute("DELETE FROM recordings WHERE id = ANY(%s)", ([row.id for row in doomed],))
    for row in doomed:
        path = recording_path(root, row.sandbox_id, row.id)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the sandbox's folder, once empty
            path.parent.rmdir()
    return len(doomed)
