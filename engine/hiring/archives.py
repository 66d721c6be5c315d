"""Workspace archives: what a candidate left in the workspace, kept after the sandbox is gone.

Before a sandbox is destroyed (expired, deleted) and on submit, the template's
``archive.paths`` are streamed out of the workspace container (Docker's archive endpoint, one
tar per path) and re-packed, member by member, into one ``.tar.gz`` in ``archives_dir``: no
archive is ever held in memory, owners and modes are kept, names are made absolute. The
candidate's AI transcript (engine/ai) goes in beside them, as ``sandbox-engine/ai-transcript.json``.
A git repository found under the paths adds a summary: its log and its diff
against the first commit, uncommitted and untracked files included, run as the workspace user.

An archive never blocks a destroy for long: it is tried ``archive_attempts`` times (1 s, 2 s…
between attempts) within ``archive_timeout`` seconds, plus at most one Docker call's timeout;
then the failure is recorded (a row with ``error``, an ``archive failed`` event) and the
destroy goes on. A workspace container that is already gone fails at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import io
import logging
import posixpath
import secrets
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from engine import store
from engine.ai import store as ai_store
from engine.backend import Backend, BackendError, ContainerGone
from engine.errors import ConflictError, NotFoundError
from engine.model.templates import Archive
from engine.settings import Settings
from engine.store import DestroyReason, SandboxRow

log = logging.getLogger("sandbox_engine.archives")

# The archive reason of a destroy; destroys not listed are not archived (a pool sandbox's
# recycling, an orphan's removal, a submit that archived already).
REASONS = {DestroyReason.TTL: "expired", DestroyReason.REQUEST: "deleted"}
# The candidate's AI transcript in the archive (usage and every exchange, as the API gives it).
TRANSCRIPT_MEMBER = "sandbox-engine/ai-transcript.json"
GIT_MAX = 256 * 1024  # bytes of git summary kept per repository
MAX_REPOS = 5
CHUNK = 1 << 20
DOCKER_TIMEOUT = 30.0  # seconds one Docker call may take

# Log and diff of the repository in $1 against its first commit, with what is not committed:
# everything in the work tree (ignored files aside) is added to a throwaway index, never to
# the candidate's own.
_GIT_SUMMARY = r"""
cd "$1" || exit 3
export GIT_PAGER=cat GIT_OPTIONAL_LOCKS=0
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
{
  echo "== $1"
  echo "-- git log --oneline"
  git log --oneline --no-color -n 500
  first=$(git rev-list --max-parents=0 HEAD 2>/dev/null | tail -n 1)
  [ -n "$first" ] || first=$(git hash-object -t tree /dev/null)
  echo "-- git status --short"
  git status --short
  echo "-- git diff $first (uncommitted changes included)"
  GIT_INDEX_FILE="$tmp/index" git add -A >/dev/null
  GIT_INDEX_FILE="$tmp/index" git diff --cached --no-color "$first"
} 2>&1 | head -c "$2"
"""


class WorkspaceGone(Exception):
    """The workspace container does not exist: no attempt can succeed."""


@dataclass(frozen=True)
class ArchiveRow:
    id: int
    sandbox_id: str
    owner_id: int | None
    reason: str
    created_at: datetime
    file: str | None
    bytes: int
    files: int
    sha256: str | None
    git: str | None
    notes: str | None
    error: str | None
    expires_at: datetime

    def public(self) -> dict[str, Any]:
        """As the API shows it (api.schemas.ArchivePublic)."""
        return {
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "bytes": self.bytes,
            "files": self.files,
            "sha256": self.sha256,
            "git": self.git,
            "notes": self.notes,
            "error": self.error,
            "download": (
                f"/api/v1/sandboxes/{self.sandbox_id}/archives/{self.id}" if self.file else None
            ),
        }

    def summary(self) -> str:
        """The event line: what was archived, or why not."""
        if self.error:
            return f"archive failed: {self.error}"
        line = f"archived: {self.files} files, {format_size(self.bytes)} ({self.reason})"
        return line + (f"; {self.notes}" if self.notes else "")


@dataclass(frozen=True)
class Packed:
    bytes: int
    files: int
    sha256: str
    repos: tuple[str, ...]  # work trees of git repositories found in the archive
    notes: tuple[str, ...]


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KiB"
    return f"{size / 1024 / 1024:.1f} MiB"


class _Chunks:
    """A readable file over Docker's chunk iterator, for tarfile's stream mode; raises past the
    deadline, so a slow stream cannot hold the destroy — but not while ``holding`` (a member
    being copied into the archive, at most the cap's size, is finished so the archive stays
    whole)."""

    def __init__(self, chunks: Iterator[bytes], deadline: float) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._deadline = deadline
        self.holding = False

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            if not self.holding and time.monotonic() > self._deadline:
                raise TimeoutError("the archive took longer than archive_timeout")
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self._buffer += chunk
        cut = len(self._buffer) if size < 0 else size
        data, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return data


class _Hashing:
    """Writes through to a file, counting and hashing what passes."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)


class _Budget:
    """The cap on the bytes of files one archive holds: members that do not fit are left out
    and counted, the largest named."""

    NAMED = 10  # left-out files named in the notes, largest first
    HEADER = 1536  # bytes a member's headers may take in the tar, counted against the cap

    def __init__(self, cap: int) -> None:
        self.left = cap
        self.cap = cap
        self.skipped = 0
        self.skipped_bytes = 0
        self._largest: list[tuple[int, str]] = []
        self._left_out: set[str] = set()  # files left out, for the hard links to them

    def take(self, member: tarfile.TarInfo, name: str, link: str | None) -> bool:
        """Whether the member ``name`` fits (and is counted), or is left out (as is a hard
        link whose file, ``link``, was); both are absolute names."""
        need = self.HEADER + (member.size if member.isreg() else 0)
        if need <= self.left and link not in self._left_out:
            self.left -= need
            return True
        self.skipped += 1
        self.skipped_bytes += member.size
        if member.isreg():
            self._left_out.add(name)
        said = "a hard link to a file left out" if member.islnk() else format_size(member.size)
        heapq.heappush(self._largest, (member.size, f"{name} ({said})"))
        if len(self._largest) > self.NAMED:
            heapq.heappop(self._largest)
        return False

    def note(self) -> str | None:
        if not self.skipped:
            return None
        named = ", ".join(text for _, text in sorted(self._largest, reverse=True))
        more = self.skipped - len(self._largest)
        return (
            f"left out past the {format_size(self.cap)} cap: {self.skipped} entries,"
            f" {format_size(self.skipped_bytes)}: {named}" + (f" and {more} more" if more else "")
        )


def pack(
    backend: Backend,
    workspace: str,
    paths: tuple[str, ...],
    dest: Path,
    *,
    deadline: float,
    max_bytes: int,
    extra: dict[str, bytes] | None = None,
) -> Packed:
    """Stream ``paths`` out of the container into ``dest`` (a .tar.gz), with ``extra`` files
    (name: content) of the engine's beside them; files past ``max_bytes`` are left out, and
    at ``deadline`` what was packed is kept — either way the notes say so. Blocking: run it
    in a thread. Raises WorkspaceGone when the container does not exist."""
    files = 0
    repos: list[str] = []
    notes: list[str] = []
    budget = _Budget(max_bytes)
    with dest.open("wb") as raw:
        out = _Hashing(raw)
        with tarfile.open(fileobj=out, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for extra_name, content in (extra or {}).items():
                info = tarfile.TarInfo(extra_name)
                info.size, info.mode, info.mtime = len(content), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(content))
            for number, path in enumerate(paths):
                try:
                    stream = backend.get_files(workspace, path, chunk_size=CHUNK)
                except ContainerGone:
                    raise WorkspaceGone(f"the workspace container {workspace} is gone") from None
                if stream is None:
                    notes.append(f"{path} does not exist")
                    continue
                try:
                    files += _copy(tar, stream, path, deadline, budget, repos)
                except _TimeUp as exc:
                    files += exc.added
                    rest = ", ".join(paths[number + 1 :])
                    cut = f"cut at the time bound (SANDBOX_ARCHIVE_TIMEOUT) in {exc}"
                    notes.append(cut + (f"; not read: {rest}" if rest else ""))
                    break
    if note := budget.note():
        notes.insert(0, note)
    return Packed(out.size, files, out.sha.hexdigest(), tuple(repos), tuple(notes))


class _TimeUp(Exception):
    """The archive's time bound came while a path was being read: where, and how many
    regular files of it were added before."""

    def __init__(self, where: str, added: int) -> None:
        super().__init__(where)
        self.added = added


def _copy(
    tar: tarfile.TarFile,
    stream: Iterator[bytes],
    path: str,
    deadline: float,
    budget: _Budget,
    repos: list[str],
) -> int:
    """The members of one path's tar stream added to ``tar`` as far as the budget allows;
    returns how many regular files were added. Raises _TimeUp at the deadline (what was added
    stays, the stream is closed)."""
    prefix = posixpath.dirname(path.rstrip("/")).lstrip("/")
    added = 0
    where = path
    try:
        chunks = _Chunks(stream, deadline)
        with tarfile.open(fileobj=chunks, mode="r|") as src:  # type: ignore[call-overload]
            for member in src:
                name = posixpath.join(prefix, member.name)
                where = "/" + name
                if time.monotonic() > deadline:
                    raise _TimeUp(where, added)
                # Hard links name a member of the same tar.
                link = posixpath.join(prefix, member.linkname) if member.islnk() else None
                if not budget.take(member, where, link and "/" + link):
                    continue
                if member.isdir() and posixpath.basename(name) == ".git":
                    repos.append(posixpath.dirname(where))
                data = src.extractfile(member) if member.isreg() else None
                member.name = name
                if link is not None:
                    member.linkname = link
                chunks.holding = True
                try:
                    tar.addfile(member, data)
                finally:
                    chunks.holding = False
                added += member.isreg()
    except TimeoutError:  # the stream, between members or in one left out
        raise _TimeUp(where, added) from None
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return added


def git_summary(backend: Backend, workspace: str, repos: tuple[str, ...]) -> str:
    """Log and diff of each repository (the first MAX_REPOS), run as the container's user.
    Best effort: a failure is written into the summary instead."""
    parts: list[str] = []
    try:
        user = backend.user_of(workspace)
        for repo in repos[:MAX_REPOS]:
            ran = backend.run(
                workspace, ["sh", "-c", _GIT_SUMMARY, "sh", repo, str(GIT_MAX)], user=user
            )
            text = ran.text
            if len(ran.output) >= GIT_MAX:
                text += f"\n… (cut at {GIT_MAX // 1024} KiB)"
            parts.append(text.rstrip("\n"))
    except BackendError as exc:
        parts.append(f"could not run git in the workspace: {exc}")
    if len(repos) > MAX_REPOS:
        parts.append(f"({len(repos) - MAX_REPOS} more repositories not summarised)")
    return "\n\n".join(parts)


# --- rows --------------------------------------------------------------------------------------


def insert_archive(
    conn: psycopg.Connection,
    *,
    sandbox: SandboxRow,
    reason: str,
    retention: timedelta,
    file: str | None,
    packed: Packed | None,
    git: str | None,
    error: str | None,
) -> ArchiveRow:
    """Record an archive (or a failed one) and its event, in the caller's transaction."""
    with conn.cursor(row_factory=class_row(ArchiveRow)) as cur:
        cur.execute(
            "INSERT INTO archives (sandbox_id, owner_id, reason, file, bytes, files, sha256, git,"
            " notes, error, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " now() + %s) RETURNING id, sandbox_id, owner_id, reason, created_at, file, bytes,"
            " files, sha256, git, notes, error, expires_at",
            (
                sandbox.id,
                sandbox.owner_id,
                reason,
                file,
                packed.bytes if packed else 0,
                packed.files if packed else 0,
                packed.sha256 if packed else None,
                git,
                "; ".join(packed.notes) if packed and packed.notes else None,
                error,
                retention,
            ),
        )
        row = cur.fetchone()
    assert row is not None
    store.add_event(conn, sandbox.id, "archive", row.summary())
    return row


def list_archives(
    conn: psycopg.Connection, sandbox_id: str, *, owner_id: int | None
) -> list[ArchiveRow]:
    """The sandbox's archives, oldest first (``owner_id``: only that key's; None: any)."""
    with conn.cursor(row_factory=class_row(ArchiveRow)) as cur:
        cur.execute(
            "SELECT id, sandbox_id, owner_id, reason, created_at, file, bytes, files, sha256, git,"
            " notes, error, expires_at FROM archives"
            " WHERE sandbox_id = %s AND (%s::bigint IS NULL OR owner_id = %s) ORDER BY id",
            (sandbox_id, owner_id, owner_id),
        )
        return cur.fetchall()


def has_archive(conn: psycopg.Connection, sandbox_id: str, reason: str) -> bool:
    """Whether the sandbox already has an archive (made or failed) for ``reason``."""
    found = conn.execute(
        "SELECT 1 FROM archives WHERE sandbox_id = %s AND reason = %s LIMIT 1", (sandbox_id, reason)
    ).fetchone()
    return found is not None


def take_expired(conn: psycopg.Connection, *, now: datetime, limit: int = 500) -> list[str | None]:
    """Delete up to ``limit`` archives past their expiry; returns their file names (None for
    failed archives). Rows another transaction holds are skipped (several reapers)."""
    rows = conn.execute(
        "DELETE FROM archives WHERE id IN (SELECT id FROM archives WHERE expires_at <= %s"
        " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING file",
        (now, limit),
    ).fetchall()
    return [r[0] for r in rows]


def claim_submit(conn: psycopg.Connection, sandbox_id: str, *, by: str) -> bool:
    """Claim the sandbox's one submit: True for the first caller. A running sandbox only;
    the row lock on the sandbox orders two submits arriving at once."""
    state = conn.execute(
        "SELECT state FROM sandboxes WHERE id = %s FOR UPDATE", (sandbox_id,)
    ).fetchone()
    if state is None:
        raise NotFoundError(f"no sandbox {sandbox_id!r}")
    done = conn.execute("SELECT 1 FROM submissions WHERE sandbox_id = %s", (sandbox_id,)).fetchone()
    if done:
        return False
    if state[0] != "running":
        raise ConflictError(f"sandbox {sandbox_id} is {state[0]}: only a running one is submitted")
    conn.execute("INSERT INTO submissions (sandbox_id, by_whom) VALUES (%s, %s)", (sandbox_id, by))
    return True


def finish_submit(conn: psycopg.Connection, sandbox_id: str, report: dict[str, Any]) -> None:
    conn.execute(
        "UPDATE submissions SET report = %s WHERE sandbox_id = %s", (Jsonb(report), sandbox_id)
    )


def drop_submit(conn: psycopg.Connection, sandbox_id: str) -> None:
    """Forget a submit that broke before its report (it may be tried again)."""
    conn.execute("DELETE FROM submissions WHERE sandbox_id = %s AND report IS NULL", (sandbox_id,))


def submit_report(conn: psycopg.Connection, sandbox_id: str) -> tuple[bool, dict[str, Any] | None]:
    """(claimed, report): whether a submit exists, and its report once it is done."""
    row = conn.execute(
        "SELECT report FROM submissions WHERE sandbox_id = %s", (sandbox_id,)
    ).fetchone()
    return (row is not None, row[0] if row else None)


# --- making them -------------------------------------------------------------------------------

Db = Callable[..., Awaitable[Any]]


class Archiver:
    """Makes, records and expires archives; ``db`` runs a repository function in a
    transaction (SandboxService.db)."""

    def __init__(self, settings: Settings, db: Db, backend: Backend) -> None:
        self.settings = settings
        self.folder = settings.archives_path
        self.db = db
        self.backend = backend

    def path(self, row: ArchiveRow) -> Path:
        if row.file is None:
            raise NotFoundError(f"archive {row.id} failed: there is no file")
        return self.folder / row.file

    async def archive(self, sandbox: SandboxRow, reason: str, spec: Archive) -> ArchiveRow:
        """Archive the sandbox's workspace, retrying within the bound; the row records the
        result either way (never raises for the archive itself)."""
        settings = self.settings
        deadline = time.monotonic() + settings.archive_timeout
        workspace = str((sandbox.outputs or {}).get("workspace") or "")
        name = f"{sandbox.id}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}.tar.gz"
        dest = self.folder / name
        transcript: bytes | None = await self.db(ai_store.document, sandbox.id)
        extra = {TRANSCRIPT_MEMBER: transcript} if transcript else None
        packed, error = await self._pack(sandbox.id, workspace, spec, dest, deadline, extra)
        git = None
        if packed is not None and packed.repos:
            git = await asyncio.to_thread(git_summary, self.backend, workspace, packed.repos)
        retention = spec.retention or settings.archive_retention
        try:
            row: ArchiveRow = await self.db(
                insert_archive,
                sandbox=sandbox,
                reason=reason,
                retention=retention,
                file=name if packed else None,
                packed=packed,
                git=git,
                error=error,
            )
        except BaseException:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        return row

    async def _pack(
        self,
        sandbox_id: str,
        workspace: str,
        spec: Archive,
        dest: Path,
        deadline: float,
        extra: dict[str, bytes] | None,
    ) -> tuple[Packed | None, str | None]:
        """The workspace packed into ``dest``, tried again with a growing delay while the bound
        allows: what was packed, or why nothing was."""
        settings = self.settings
        error: str | None = None
        retried = 0
        delay = 1.0
        cap = min(spec.max_bytes or settings.archive_max_bytes, settings.archive_max_bytes)
        for attempt in range(1, settings.archive_attempts + 1):
            part = dest.with_name(dest.name + ".part")
            try:
                if not workspace:
                    raise WorkspaceGone("the sandbox has no workspace container")
                await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
                packed = await asyncio.to_thread(
                    pack,
                    self.backend,
                    workspace,
                    spec.paths,
                    part,
                    deadline=deadline,
                    max_bytes=cap,
                    extra=extra,
                )
                await asyncio.to_thread(part.rename, dest)
                return packed, None
            except WorkspaceGone as exc:
                error = str(exc)
                break
            except Exception as exc:  # Docker, the stream, the disk: tried again, within bounds
                error = f"{type(exc).__name__}: {exc}"[:1000]
                log.warning("archive of %s, attempt %d: %s", sandbox_id, attempt, error)
                if attempt == settings.archive_attempts or time.monotonic() + delay > deadline:
                    break
                retried = attempt
                await asyncio.sleep(delay)
                delay *= 2
            finally:
                await asyncio.to_thread(part.unlink, missing_ok=True)
        return None, f"{error} (after {retried + 1} attempts)" if retried else error

    async def prune(self, now: datetime) -> int:
        """Delete archives past their expiry, rows then files; returns how many."""
        files: list[str | None] = await self.db(take_expired, now=now)
        for file in files:
            if file:
                try:
                    await asyncio.to_thread((self.folder / file).unlink, missing_ok=True)
                except OSError as exc:
                    log.warning("could not delete expired archive %s: %s", file, exc)
        return len(files)
