"""The sandbox service: rows, events and stack jobs, used by the API and the CLI alike.

Requests change rows and return at once; the stack work runs as background jobs (one task per
operation, the blocking Pulumi calls in threads). Every state change and every progress line
is an event of the sandbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors
import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from engine import archives, first_admin, store, tasks, workers
from engine.ai import store as ai_store
from engine.ai import workspace as ai_workspace
from engine.errors import ConflictError, EngineError, Interrupted, NotFoundError, describe
from engine.settings import Settings
from engine.stacks import StackManager, container_states, engine_objects, labelled_objects
from engine.store import Client, DestroyReason, SandboxRow, SandboxState
from engine.templates import Archive, Template, find, load_all
from engine.units import format_duration, parse_duration

log = logging.getLogger("sandbox_engine.service")

MAX_ENV = 50
MAX_ENV_VALUE = 4096
# A sandbox whose containers were removed by hand more often than this is failed, not repaired.
MAX_REPAIRS = 3
# Container states that need no repair ("restarting": Docker's restart policy is at work).
HEALTHY = ("running", "restarting")
# Seconds a template's pool waits after one of its creates failed.
POOL_BACKOFF = 60.0
# Pool creates one refill starts per template (the rest follow on the next passes).
POOL_BATCH = 2
# The operation an in-flight state stands for, in messages.
INTERRUPTED = {"creating": "create", "repairing": "repair", "destroying": "destroy"}


class InvalidRequest(EngineError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# Seconds a finished stack operation keeps trying to record its result in the database.
FINISH_RETRY = 300.0
# Seconds a stop waits for jobs once their Pulumi runs were cut short, and again once the jobs
# themselves were cancelled.
STOP_SETTLE = 15.0


class QuotaExceeded(EngineError):
    pass


class EngineBusy(EngineError):
    """This engine already has as many creates running or queued as it takes (503)."""


@dataclass(frozen=True)
class CreateRequest:
    template: str
    ttl: str | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    idempotency_key: str | None = None


class _Emitter:
    """Events a worker thread emits (progress lines, a task's output), written in the order
    they were emitted: each waits for the one before it, without holding up the thread."""

    def __init__(
        self, service: SandboxService, sandbox_id: str, kind: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._service, self._sandbox_id, self._kind, self._loop = service, sandbox_id, kind, loop
        self._last: concurrent.futures.Future[None] | None = None

    def __call__(self, line: str) -> None:
        self._last = asyncio.run_coroutine_threadsafe(self._write(self._last, line), self._loop)

    async def _write(self, before: concurrent.futures.Future[None] | None, line: str) -> None:
        if before is not None:
            with contextlib.suppress(Exception):  # one lost line does not stop the rest
                await asyncio.wrap_future(before)
        await self._service._event(self._sandbox_id, self._kind, line)

    async def written(self) -> None:
        """Wait until every line emitted so far is written (or failed to be)."""
        if self._last is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._last)


class SandboxService:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        stacks: StackManager,
        reads: AsyncConnectionPool,
    ) -> None:
        self.settings = settings
        self.pool = pool
        # The API's hot reads (authentication, GET one, GET list) on the event loop itself:
        # no thread hop per query.
        self.reads = reads
        self.stacks = stacks
        self._jobs: set[asyncio.Task[None]] = set()
        self._creates: dict[int, deque[float]] = defaultdict(deque)
        # Cold creates of this process running or queued for a stack thread (the bound on
        # them is max_pending_creates; pool refills are not counted, they wait their turn).
        self._pending_creates = 0
        self._reserve_lock = asyncio.Lock()
        self._stack_threads = ThreadPoolExecutor(
            max_workers=settings.max_stack_operations, thread_name_prefix="stack"
        )
        # Templates whose last pool create failed, and until when refills of it wait.
        self._pool_backoff: dict[str, float] = {}
        self.lease = workers.WorkerLease(settings.database_url.get_secret_value())
        # Where sandboxes reach the AI gateway (its actual port once it listens: 0 asks for
        # any free one), and the operator's saved Claude Code config, read once a minute.
        self.gateway_port = settings.gateway_port
        self.operator_config = ai_workspace.OperatorConfig(settings.claude_auth_volume)
        self.archiver = archives.Archiver(settings, self.db)

    async def start(self) -> None:
        """Take this process's worker lease and learn the engine's instance id."""
        await asyncio.to_thread(self.lease.acquire)
        self.stacks.instance = await self.db(store.engine_instance)

    # --- stopping --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stacks.stopping

    def begin_stop(self) -> None:
        """The engine got its stop signal (or its lifespan ends): creates are refused, no new
        stack operation starts, and one cut short from now on is left for recovery. Safe from
        a signal handler (it only sets a flag)."""
        self.stacks.begin_stop()

    async def close(self, *, wait_all: bool = False) -> None:
        """Stop: give running jobs ``stop_timeout`` seconds (``wait_all``: as long as they
        take, for a CLI command that waits for its own job), cut the Pulumi runs still going
        short (their sandboxes stay mid-operation, with this process as their worker: once
        its lease is gone, the next start's recovery finishes them), then give the lease up."""
        if wait_all:
            await self.drain()
        self.begin_stop()
        timeout = self.settings.stop_timeout
        if self._jobs and timeout > 0:
            log.info("stopping: waiting up to %.0f s for %d jobs", timeout, len(self._jobs))
            await asyncio.wait(self._jobs, timeout=timeout)
        if self._jobs:
            cut = await asyncio.to_thread(self.stacks.terminate_runs)
            log.warning(
                "stopping: %d jobs still running (%d Pulumi runs cut short); recovery at the"
                " next start finishes them",
                len(self._jobs),
                cut,
            )
            await asyncio.wait(self._jobs, timeout=STOP_SETTLE)
            for job in list(self._jobs):  # e.g. an archive still streaming: recovery redoes it
                job.cancel()
            if self._jobs:
                await asyncio.wait(self._jobs, timeout=STOP_SETTLE)
        await asyncio.to_thread(self.lease.release)
        await asyncio.to_thread(self._close_stacks)

    async def _left_for_recovery(self, sandbox_id: str, operation: str, exc: Exception) -> bool:
        """Whether a failed step was the engine's stop cutting it short; if so the sandbox is
        left as it is (mid-operation) for recovery, with an event saying so."""
        if not isinstance(exc, Interrupted) and not self.stopping:
            return False
        log.info("%s of %s left for recovery: %s", operation, sandbox_id, exc)
        with contextlib.suppress(Exception):  # the database may be going too: recovery tells
            await self._event(
                sandbox_id,
                "progress",
                f"the engine is stopping: the interrupted {operation} is settled at its next start",
            )
        return True

    @property
    def worker(self) -> str:
        return self.lease.id

    # --- database --------------------------------------------------------------------------

    async def _stack_op(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a stack operation on the stack threads: at most ``max_stack_operations`` at
        once, the rest queued without holding a thread. The event loop's default threads stay
        free for database calls and terminals however many operations are waiting. None
        starts once the engine is stopping (``Interrupted``)."""

        def run() -> Any:
            if self.stopping:
                raise Interrupted("not started: the engine is stopping")
            return fn(*args, **kwargs)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._stack_threads, run)

    def _close_stacks(self) -> None:
        self._stack_threads.shutdown(wait=True)
        self.stacks.close()

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a repository function in one transaction, off the event loop."""

        def run() -> Any:
            with self.pool.connection() as conn:  # commits on success, rolls back on error
                return fn(conn, *args, **kwargs)

        return await asyncio.to_thread(run)

    # --- reading ---------------------------------------------------------------------------

    async def get(self, client: Client, sandbox_id: str) -> SandboxRow:
        """The sandbox, if this client may see it (others' sandboxes do not exist for members)."""
        row: SandboxRow | None = await self.db(store.get_sandbox, sandbox_id)
        if row is None or (client.role != "admin" and row.owner_id != client.id):
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return row

    async def authenticate(self, key: str) -> Client | None:
        async with self.reads.connection() as conn:
            return await store.authenticate(conn, key)

    async def view(self, client: Client, sandbox_id: str) -> bytes:
        """The sandbox as the API shows it (JSON), if this client may see it."""
        owner = None if client.role == "admin" else client.id
        async with self.reads.connection() as conn:
            found = await store.sandbox_json(conn, sandbox_id, owner_id=owner)
        if found is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return found

    async def list_view(self, client: Client, *, state: str | None) -> bytes:
        """The client's sandboxes (an admin's: everyone's) as the API lists them (JSON)."""
        owner = None if client.role == "admin" else client.id
        async with self.reads.connection() as conn:
            return await store.sandboxes_json(conn, owner_id=owner, state=state)

    async def list_for(self, client: Client, *, state: str | None) -> list[SandboxRow]:
        owner = None if client.role == "admin" else client.id
        rows: list[SandboxRow] = await self.db(store.list_sandboxes, owner_id=owner, state=state)
        return rows

    async def events(self, sandbox_id: str, after: int = 0) -> list[store.Event]:
        events: list[store.Event] = await self.db(store.list_events, sandbox_id, after=after)
        return events

    # --- changing --------------------------------------------------------------------------

    async def revoke_key(self, key_id: int) -> bool:
        """Revoke an API key at once (False: no such live key); the first admin key's file
        goes with its key."""

        def apply(conn: psycopg.Connection) -> bool:
            if not store.revoke_client(conn, key_id):
                return False
            path = self.settings.state_path / first_admin.FILE_NAME
            first_admin.forget_if_revoked(conn, path, key_id)
            return True

        revoked: bool = await self.db(apply)
        return revoked

    def template(self, name: str) -> Template:
        return find(self.settings.templates_path, name)

    async def create(self, client: Client, request: CreateRequest) -> tuple[SandboxRow, bool]:
        """Record a new sandbox and start its stack; (row, created). A repeated
        Idempotency-Key returns the first sandbox with created False."""
        if request.idempotency_key:
            found = await self.db(
                store.find_idempotent, owner_id=client.id, key=request.idempotency_key
            )
            if found:
                return found, False
        try:
            template = self.template(request.template)
        except NotFoundError as exc:
            raise InvalidRequest("template", str(exc)) from exc
        ttl = template.ttl
        if request.ttl is not None:
            try:
                ttl = parse_duration(request.ttl)
            except ValueError as exc:
                raise InvalidRequest("ttl", str(exc)) from exc
            if ttl > template.max_ttl:
                raise InvalidRequest(
                    "ttl", f"is over the template's max_ttl ({format_duration(template.max_ttl)})"
                )
        if self.stopping:
            raise EngineBusy("the engine is stopping; retry shortly")
        env = request.env or {}
        if len(env) > MAX_ENV or any(len(v) > MAX_ENV_VALUE for v in env.values()):
            raise InvalidRequest("env", f"at most {MAX_ENV} variables of {MAX_ENV_VALUE} bytes")
        self._rate_limit(client)
        limit = self.settings.max_live_sandboxes_per_key

        # A create the warm pool can serve: the template keeps a pool and the request asks
        # for nothing a pool sandbox was not made with (env is baked into its containers).
        poolable = template.pool > 0 and not env

        def insert(conn: psycopg.Connection) -> tuple[SandboxRow, str]:
            # Counting and inserting in one transaction, under the client's row lock, keeps
            # concurrent creates of one key from passing the quota together.
            conn.execute("SELECT 1 FROM api_clients WHERE id = %s FOR UPDATE", (client.id,))
            live = store.count_live(conn, owner_id=client.id)
            if live >= limit:
                raise QuotaExceeded(f"this key already has {live} live sandboxes (limit {limit})")
            if poolable:
                claimed = store.claim_pooled(
                    conn,
                    template=template.name,
                    digest=template.digest,
                    owner_id=client.id,
                    ttl_seconds=int(ttl.total_seconds()),
                    idempotency_key=request.idempotency_key,
                    metadata=request.metadata,
                )
                if claimed is not None:
                    store.add_event(conn, claimed.id, "state", f"running: claimed by {client.name}")
                    return claimed, "pool"
                if full:
                    raise EngineBusy(self._busy_message())
            reserved = store.take_reserved_stack(conn)
            row = store.insert_sandbox(
                conn,
                sandbox_id=reserved or secrets.token_hex(5),
                owner_id=client.id,
                template=template.name,
                ttl_seconds=int(ttl.total_seconds()),
                idempotency_key=request.idempotency_key,
                metadata=request.metadata,
                worker=self.worker,
            )
            store.add_event(conn, row.id, "state", "creating")
            return row, "reserve" if reserved else "new"

        # A cold create takes a slot before its row exists, so a burst cannot pass the bound
        # together; a full engine can still hand out pool sandboxes (they need no stack work).
        limit_pending = self.settings.max_pending_creates
        full = self._pending_creates >= limit_pending
        if full and not poolable:
            raise EngineBusy(self._busy_message())
        if not full:
            self._pending_creates += 1
        try:
            row, source = await self.db(insert)
        except BaseException:
            if not full:
                self._pending_creates -= 1
            raise
        if source == "pool":
            if not full:
                self._pending_creates -= 1
            self._spawn(self.refill_pool(template.name))
            # Its gateway token is the claimer's: minted now, beside the answer (a claim is
            # answered in milliseconds; the token is in place a few tens of them later).
            self._spawn(self._claimed_claude(row, template))
            return row, True
        self._spawn(
            self._create_job(
                row, template, client.name, env, reserved=source == "reserve", counted=True
            )
        )
        if source == "reserve":
            self._spawn(self.refill_reserve())
        return row, True

    async def destroy(
        self, client: Client, sandbox_id: str, reason: DestroyReason = DestroyReason.REQUEST
    ) -> SandboxRow:
        await self.get(client, sandbox_id)

        def begin(conn: psycopg.Connection) -> SandboxRow:
            row = store.transition(
                conn, sandbox_id, SandboxState.DESTROYING, reason=reason.value, worker=self.worker
            )
            if row is None:
                raise ConflictError(f"sandbox {sandbox_id} cannot be destroyed in its state")
            store.add_event(conn, sandbox_id, "state", f"destroying ({reason})")
            return row

        row: SandboxRow = await self.db(begin)
        self.start_destroy(sandbox_id, reason)
        return row

    def start_destroy(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Start the destroy job of a sandbox already moved to ``destroying``."""
        self._spawn(self._destroy_job(sandbox_id, reason))

    async def extend(self, client: Client, sandbox_id: str, ttl: str) -> SandboxRow:
        row = await self.get(client, sandbox_id)
        template = self.template(row.template)
        try:
            wanted = parse_duration(ttl)
        except ValueError as exc:
            raise InvalidRequest("ttl", str(exc)) from exc
        expires = datetime.now(UTC) + wanted
        if expires > row.created_at + template.max_ttl:
            raise InvalidRequest(
                "ttl",
                "would run past the template's max_ttl of "
                f"{format_duration(template.max_ttl)} from creation",
            )

        def apply(conn: psycopg.Connection) -> SandboxRow:
            updated = store.extend(conn, sandbox_id, expires_at=expires)
            if updated is None:
                raise ConflictError(f"sandbox {sandbox_id} is not live")
            store.add_event(conn, sandbox_id, "extended", f"expires {expires:%Y-%m-%dT%H:%M:%SZ}")
            return updated

        result: SandboxRow = await self.db(apply)
        workspace = (result.outputs or {}).get("workspace")
        if result.state == SandboxState.RUNNING and workspace:
            await asyncio.to_thread(
                notify_terminal,
                str(workspace),
                f"Sandbox extended: it now expires at {expires:%H:%M:%S} UTC",
            )
        return result

    async def reconcile(self) -> list[str]:
        """Settle sandboxes an engine process left mid-operation (killed or crashed); run at
        start and on every reaper pass.

        Only sandboxes whose worker is dead are touched (``engine.workers``): a create or
        destroy another live process is running is left alone. Policy: an interrupted create
        or repair is failed and cleaned (its stack torn down, anything labelled with it
        removed); an interrupted destroy is finished, archiving first if it was killed before
        its archive was made. Either way nothing of the sandbox is
        left behind. Returns the sandbox ids settled.
        """

        def orphaned(conn: psycopg.Connection) -> list[SandboxRow]:
            taken = []
            for row in store.in_flight(conn):
                if row.worker == self.worker:
                    continue
                if row.worker is not None and workers.is_alive(conn, row.worker):
                    continue
                mine = store.take_over(conn, row.id, dead=row.worker, worker=self.worker)
                if mine is not None:
                    taken.append(mine)
            return taken

        stuck: list[SandboxRow] = await self.db(orphaned)
        for row in stuck:
            log.warning("sandbox %s was left %s by an engine process now gone", row.id, row.state)
            await self._event(
                row.id,
                "progress",
                f"recovering: its engine process stopped or died during the"
                f" {INTERRUPTED[row.state]}",
            )
            if row.state == "destroying" and row.reason is not None:
                # Killed before its archive was made: made now, while the workspace may
                # still be there (a failed one is recorded otherwise).
                why = archives.REASONS.get(row.reason)  # type: ignore[call-overload]
                if why and not await self.db(archives.has_archive, row.id, why):
                    await self._archive_before_destroy(row.id, DestroyReason(row.reason))
            try:
                await self._stack_op(self.stacks.recover, row.id)
            except Interrupted:
                return [r.id for r in stuck]  # this engine is stopping too: the next start
            except Exception as exc:
                log.warning("recovery of %s failed: %s", row.id, exc)
                left = await asyncio.to_thread(labelled_objects, row.id)
                if left or row.state != "destroying":
                    await self._force(
                        row.id,
                        SandboxState.FAILED,
                        f"recovering the interrupted {INTERRUPTED[row.state]} failed: "
                        f"{describe(exc)}" + (f" ({', '.join(left)} left)" if left else ""),
                    )
                    continue
                # The step failed, but nothing of the sandbox is left: it is destroyed.
            if row.state in ("creating", "repairing"):
                await self._force(
                    row.id,
                    SandboxState.FAILED,
                    f"the engine stopped during the {INTERRUPTED[row.state]}; cleaned up",
                )
            else:
                final = (
                    SandboxState.EXPIRED
                    if row.reason == DestroyReason.TTL
                    else SandboxState.DESTROYED
                )
                await self._finish(row.id, final)
        return [r.id for r in stuck]

    # --- expiry warnings, drift, orphans ---------------------------------------------------

    async def warn_expiring(self, now: datetime, before: timedelta) -> list[str]:
        """Warn running sandboxes that expire within ``before``: an ``expiry_warning`` event
        and a message on every terminal attached to the workspace's tmux. Each warning is
        claimed in the database, so of several engine processes one sends it."""
        rows: list[SandboxRow] = await self.db(store.claim_warnings, now=now, before=before)
        for row in rows:
            left = max(0, int((row.expires_at - now).total_seconds()))
            text = (
                f"Sandbox expires at {row.expires_at:%H:%M:%S} UTC"
                f" (in {format_duration_short(left)}): save your work"
            )
            await self._event(row.id, "expiry_warning", text)
            workspace = (row.outputs or {}).get("workspace")
            if workspace:
                await asyncio.to_thread(notify_terminal, str(workspace), text)
        return [r.id for r in rows]

    async def check_drift(self) -> list[str]:
        """Find running sandboxes with a container missing or stopped (removed by hand) and
        start their repair; a pool sandbox in that state is recycled instead (nobody uses it:
        a fresh one is cheaper and certain). Returns the sandbox ids being repaired or
        recycled."""
        rows: list[SandboxRow] = [
            row
            for state in ("running", "pooled")
            for row in await self.db(
                store.list_sandboxes, owner_id=None, state=state, limit=100_000
            )
        ]
        started: list[str] = []
        if not rows or not self.stacks.instance:
            return started
        # Rows first, then containers: a sandbox that settles in between is skipped below
        # (its state no longer allows a repair).
        everything = await asyncio.to_thread(container_states, self.stacks.instance)
        for row in rows:
            declared = (row.outputs or {}).get("containers")
            expected = [str(n) for n in declared.values()] if isinstance(declared, dict) else []
            if not expected:
                continue
            states = everything.get(row.id, {})
            if any(states.get(n) == "removing" for n in expected):
                continue  # Docker is still removing it: repair once it is gone (next pass)
            broken = [n for n in expected if states.get(n) not in HEALTHY]
            if not broken:
                continue
            what = ", ".join(f"{n} ({states.get(n, 'missing')})" for n in broken)
            if row.state == SandboxState.POOLED:
                if await self._recycle(row.id, f"not as declared: {what}"):
                    started.append(row.id)
                continue
            claimed = await self.db(
                store.transition, row.id, SandboxState.REPAIRING, worker=self.worker
            )
            if claimed is None:
                continue  # destroyed, expired or being repaired meanwhile
            await self._event(row.id, "repair", f"not as declared: {what}; repairing")
            self._spawn(self._repair_job(row.id))
            started.append(row.id)
        return started

    async def _repair_job(self, sandbox_id: str) -> None:
        """Policy: recreate what is missing (refresh + up; volumes and files are kept), at
        most MAX_REPAIRS times in a sandbox's life; past that, or if the repair fails, the
        sandbox is failed (its resources stay until its TTL or a DELETE removes them)."""
        repairs: int = await self.db(store.repairs_of, sandbox_id)
        if repairs > MAX_REPAIRS:
            await self._finish(
                sandbox_id,
                SandboxState.FAILED,
                error=f"changed behind the engine's back {repairs} times; not repaired again",
            )
            return
        try:
            outputs = await self._stack_op(
                self.stacks.repair, sandbox_id, progress=self._progress(sandbox_id)
            )
        except Exception as exc:
            if await self._left_for_recovery(sandbox_id, "repair", exc):
                return
            log.warning("repair of %s failed: %s", sandbox_id, exc)
            await self._finish(
                sandbox_id, SandboxState.FAILED, error=f"repair failed: {describe(exc)[:1900]}"
            )
            return
        row: SandboxRow | None = await self.db(store.get_sandbox, sandbox_id)
        if row is not None:
            try:  # a recreated workspace has new addresses and lost its managed settings
                await self._set_up_claude(row, self.template(row.template), outputs, first=False)
            except Exception as exc:
                log.warning("sandbox %s: Claude Code not set up again: %s", sandbox_id, exc)
        await self._finish(sandbox_id, SandboxState.RUNNING, outputs=outputs)

    # --- the warm pool -----------------------------------------------------------------------

    async def refill_pool(self, only: str | None = None) -> list[str]:
        """Bring every template's pool (or ``only`` that one's) to its size: recycle pool
        sandboxes made from an older version of the template or beyond the size, then start
        creates for what is missing (at most POOL_BATCH per template at a time; a template
        whose pool create failed waits POOL_BACKOFF seconds). Decisions are taken under a
        per-template database lock, so engine processes sharing the database do not
        overfill. Returns the ids of the pool sandboxes started."""
        if self.stopping:
            return []
        try:
            templates = load_all(self.settings.templates_path)
        except EngineError as exc:
            log.warning("warm pool: templates could not be read: %s", exc)
            return []
        known = {name: t for name, t in templates.items() if only in (None, name)}
        started: list[tuple[SandboxRow, Template]] = []
        recycle: list[tuple[str, str]] = []
        if only is None:
            # Pool sandboxes of templates that are gone (or whose pool was set to zero).
            for entry in await self.db(store.pool_entries):
                gone = entry.template not in templates or templates[entry.template].pool == 0
                if entry.state == "pooled" and gone:
                    recycle.append((entry.id, "its template no longer keeps a pool"))
        for template in known.values():
            if template.pool == 0 and only is None:
                continue
            if self._pool_backoff.get(template.name, 0.0) > time.monotonic():
                continue

            def plan(conn: psycopg.Connection, t: Template = template) -> list[SandboxRow]:
                store.lock_pool(conn, t.name)
                entries = store.pool_entries(conn, t.name)
                current = [e for e in entries if e.template_digest == t.digest]
                for e in entries:
                    if e.template_digest != t.digest and e.state == "pooled":
                        recycle.append((e.id, "made from an older version of its template"))
                ready = [e for e in current if e.state == "pooled"]
                for e in ready[: max(0, len(current) - t.pool)]:
                    recycle.append((e.id, "more than the pool's size"))
                missing = min(POOL_BATCH, t.pool - len(current))
                rows = []
                for _ in range(max(0, missing)):
                    row = store.insert_sandbox(
                        conn,
                        sandbox_id=secrets.token_hex(5),
                        owner_id=None,
                        template=t.name,
                        ttl_seconds=int(self.settings.pool_max_age),
                        idempotency_key=None,
                        worker=self.worker,
                        template_digest=t.digest,
                    )
                    store.add_event(conn, row.id, "state", "creating (warm pool)")
                    rows.append(row)
                return rows

            for row in await self.db(plan):
                started.append((row, template))
        for sid, why in recycle:
            await self._recycle(sid, why)
        for row, template in started:
            self._spawn(self._create_job(row, template, "pool", {}))
        return [row.id for row, _ in started]

    async def refill_reserve(self) -> list[str]:
        """Initialise empty stacks until the reserve holds ``stack_reserve`` of them (one at a
        time, in the background: each is a CLI run). A reserved stack whose initialising
        process died before it was ready is removed (and its stack with it). Returns the ids
        initialised."""
        if self.stopping:
            return []
        size = self.settings.stack_reserve
        for sid, ready, worker in await self.db(store.reserve_entries):
            if ready or worker == self.worker:
                continue
            alive: bool = await self.db(workers.is_alive, worker) if worker else False
            if not alive:
                with contextlib.suppress(Exception):
                    await self._stack_op(self.stacks.recover, sid)
                await self.db(store.drop_reserved, sid)
        made: list[str] = []
        if size == 0:
            return made
        async with self._reserve_lock:
            for sid in await self.db(store.plan_reserve, size=size, worker=self.worker):
                try:
                    await self._stack_op(self.stacks.reserve, sid)
                except Exception as exc:
                    log.warning("could not initialise a reserved stack: %s", exc)
                    await self.db(store.drop_reserved, sid)
                    break
                await self.db(store.reserve_ready, sid)
                made.append(sid)
        return made

    async def _recycle(self, sandbox_id: str, why: str) -> bool:
        """Destroy a pool sandbox nobody claimed (reason recycled); False when it was claimed
        or recycled meanwhile."""
        reason = DestroyReason.RECYCLED

        def begin(conn: psycopg.Connection) -> bool:
            row = store.transition(
                conn, sandbox_id, SandboxState.DESTROYING, reason=reason.value, worker=self.worker
            )
            if row is None:
                return False
            store.add_event(conn, sandbox_id, "state", f"destroying ({reason}): {why}")
            return True

        if not await self.db(begin):
            return False
        log.info("pool sandbox %s recycled: %s", sandbox_id, why)
        self.start_destroy(sandbox_id, reason)
        return True

    async def sweep_orphans(self) -> list[str]:
        """Destroy what this engine made but no live sandbox owns: ``sbx-*`` stacks with no
        row (and not in the stack reserve), and Docker objects labelled with this engine and a
        sandbox that has no row or is destroyed/expired. Stacks and objects are listed before
        rows: a row is written before its stack exists, so a sandbox being created is never
        taken for an orphan."""
        if not self.stacks.instance:
            return []
        names = [s.name for s in await asyncio.to_thread(self.stacks.list)]
        stack_ids = {n.removeprefix("sbx-") for n in names if not n.startswith("sbx-preview")}
        objects: dict[str, list[str]] = await asyncio.to_thread(
            engine_objects, self.stacks.instance
        )
        ids = sorted(stack_ids | set(objects))
        if not ids:
            return []
        states: dict[str, str] = await self.db(store.states_of, ids)
        reserved = {sid for sid, _, _ in await self.db(store.reserve_entries)}
        orphans = [
            i for i in ids if states.get(i) in (None, "destroyed", "expired") and i not in reserved
        ]
        for sid in orphans:
            what = ([f"stack sbx-{sid}"] if sid in stack_ids else []) + objects.get(sid, [])
            log.warning("orphaned (reason orphaned): %s; destroying", ", ".join(what))
            try:
                await self._stack_op(self.stacks.recover, sid)
            except Exception as exc:
                log.warning("could not remove orphan %s: %s", sid, exc)
                continue
            if sid in states:
                await self._event(sid, "orphan", f"removed (reason orphaned): {', '.join(what)}")
        return orphans

    async def _force(self, sandbox_id: str, state: SandboxState, error: str) -> None:
        def apply(conn: psycopg.Connection) -> None:
            conn.execute(
                # Recovery removed everything of the sandbox: it is gone as of now.
                "UPDATE sandboxes SET state = %s, error = %s, destroyed_at = now() WHERE id = %s",
                (state.value, error, sandbox_id),
            )
            ai_store.revoke(conn, sandbox_id)
            store.add_event(conn, sandbox_id, "state", f"{state.value}: {error}")

        await self.db(apply)

    # --- jobs ------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def drain(self) -> None:
        """Wait for running jobs (shutdown): a stack operation is never cut in half."""
        if self._jobs:
            await asyncio.wait(self._jobs)

    def _progress(self, sandbox_id: str, kind: str = "progress") -> _Emitter:
        return _Emitter(self, sandbox_id, kind, asyncio.get_running_loop())

    async def _event(self, sandbox_id: str, kind: str, message: str) -> None:
        await self.db(store.add_event, sandbox_id, kind, message)

    async def _create_job(
        self,
        row: SandboxRow,
        template: Template,
        owner: str,
        env: dict[str, str],
        *,
        reserved: bool = False,
        counted: bool = False,
    ) -> None:
        try:
            await self._run_create(row, template, owner, env, reserved=reserved)
        finally:
            if counted:
                self._pending_creates -= 1

    async def _run_create(
        self,
        row: SandboxRow,
        template: Template,
        owner: str,
        env: dict[str, str],
        *,
        reserved: bool,
    ) -> None:
        try:
            outputs = await self._stack_op(
                self.stacks.create,
                template,
                self.settings.templates_path,
                sandbox_id=row.id,
                owner=owner,
                env=env,
                progress=self._progress(row.id),
                reserved=reserved,
            )
        except Exception as exc:  # recorded on the row; the stack was torn down
            if await self._left_for_recovery(row.id, "create", exc):
                return
            log.warning("sandbox %s failed: %s", row.id, exc)
            await self._finish(row.id, SandboxState.FAILED, error=describe(exc)[:2000])
            if row.owner_id is None:  # a pool create: wait before trying this template again
                self._pool_backoff[row.template] = time.monotonic() + POOL_BACKOFF
            return
        # Seeded and set up before the sandbox is offered (a pool sandbox is claimed ready).
        seeding = self._progress(row.id, "task")
        try:
            if template.task is not None:
                await asyncio.to_thread(
                    tasks.seed,
                    template,
                    self.settings.templates_path,
                    str(outputs["workspace"]),
                    seeding,
                )
                await seeding.written()  # its last line is in the events before `running`
            await self._set_up_claude(row, template, outputs, first=True)
        except Exception as exc:
            if await self._left_for_recovery(row.id, "create", exc):
                return
            log.warning("sandbox %s: setting it up failed: %s", row.id, exc)
            try:
                await self._stack_op(self.stacks.destroy, row.id, progress=self._progress(row.id))
                error = f"{describe(exc)}; cleaned up"
            except Exception as cleanup:
                if await self._left_for_recovery(row.id, "create", cleanup):
                    return
                error = f"{describe(exc)}; the cleanup failed too: {describe(cleanup)}"
            await self._finish(row.id, SandboxState.FAILED, error=error[:2000])
            if row.owner_id is None:
                self._pool_backoff[row.template] = time.monotonic() + POOL_BACKOFF
            return
        ready = SandboxState.POOLED if row.owner_id is None else SandboxState.RUNNING
        await self._finish(row.id, ready, outputs=outputs)
        if row.owner_id is None:
            self._pool_backoff.pop(row.template, None)

    async def _claimed_claude(self, row: SandboxRow, template: Template) -> None:
        try:
            await self._set_up_claude(row, template, row.outputs or {}, first=False)
        except Exception as exc:
            log.warning("sandbox %s: Claude Code could not be set up: %s", row.id, exc)
            await self._event(row.id, "progress", f"claude: not set up: {describe(exc)}")

    async def _set_up_claude(
        self, row: SandboxRow, template: Template, outputs: dict[str, Any], *, first: bool
    ) -> None:
        """Claude Code in the workspace (engine/ai/workspace.py). ``first`` (at create): the
        first screen in the home, and for operator-login the copy of the login. With
        ``access: gateway`` and an owner (a cold create, a claim, a repair): a new token of
        this sandbox, good from its own addresses only, in root's managed settings."""
        claude = template.claude
        workspace = str(outputs.get("workspace") or "")
        if not workspace:
            return
        grant = claude.access == "gateway" and row.owner_id is not None
        token = None
        if grant:
            attrs = await asyncio.to_thread(_inspect, workspace)
            place = ai_workspace.place(attrs, str(outputs.get("network") or ""))
            token = await self.db_through_restarts(
                ai_store.mint,
                what=f"the AI gateway token of {row.id}",
                sandbox_id=row.id,
                owner_id=row.owner_id,
                template=template.name,
                model=claude.model,
                max_tokens=claude.max_tokens,
                budget_tokens=claude.budget_tokens,
                addresses=list(place.addresses),
            )
            base_url = f"http://{place.host}:{self.gateway_port}"

        def write() -> None:
            client = docker.from_env(timeout=30)
            try:
                home = saved = credentials = None
                if first:
                    home = ai_workspace.home_of(client, workspace, template.workspace.user)
                    saved = self.operator_config.config(client, template.base_image)
                    if claude.access == "operator-login":
                        credentials = ai_workspace.read_volume_file(
                            client,
                            template.base_image,
                            self.settings.claude_auth_volume,
                            ".credentials.json",
                        )
                env = (
                    ai_workspace.gateway_env(template, base_url=base_url, token=token)
                    if token
                    else None
                )
                ai_workspace.configure(
                    client,
                    workspace,
                    template,
                    env=env,
                    home=home,
                    saved=saved,
                    credentials=credentials,
                )
            finally:
                client.close()

        await asyncio.to_thread(write)
        if grant:
            await self.db_through_restarts(
                store.add_event,
                row.id,
                "progress",
                f"claude: through the AI gateway, budget {claude.budget_tokens:,} tokens"
                + (f", model {claude.model}" if claude.model else ""),
                what=f"an event of {row.id}",
            )

    async def _destroy_job(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Archive, destroy the stack; when the destroy fails, clean up what is left directly
        (``StackManager.recover``: the stack's lock and pending steps dropped, the stack
        destroyed again, labelled objects removed). A destroy that ends with nothing of the
        sandbox left is ``destroyed`` (or ``expired``), whatever failed on the way; one the
        engine's stop cuts short stays ``destroying`` for recovery."""
        await self._archive_before_destroy(sandbox_id, reason)
        try:
            await self._stack_op(
                self.stacks.destroy, sandbox_id, progress=self._progress(sandbox_id)
            )
        except NotFoundError:
            pass  # no stack (a create that failed): nothing to destroy
        except Exception as exc:
            if await self._left_for_recovery(sandbox_id, "destroy", exc):
                return
            log.warning("destroy of %s failed: %s; cleaning up directly", sandbox_id, exc)
            await self._event(sandbox_id, "progress", f"{describe(exc)}; cleaning up directly")
            try:
                await self._stack_op(self.stacks.recover, sandbox_id)
            except Exception as cleanup:
                if await self._left_for_recovery(sandbox_id, "destroy", cleanup):
                    return
                left = await asyncio.to_thread(labelled_objects, sandbox_id)
                if left:
                    error = (
                        f"destroy: {describe(exc)}; cleaning up after it failed too:"
                        f" {describe(cleanup)} ({', '.join(left)} left)"
                    )
                    await self._finish(sandbox_id, SandboxState.FAILED, error=error[:2000])
                    return
        final = SandboxState.EXPIRED if reason == DestroyReason.TTL else SandboxState.DESTROYED
        await self._finish(sandbox_id, final)

    async def _archive_before_destroy(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Archive the workspace of a sandbox someone owns before its stack goes (the state
        stays ``destroying``); bounded (engine/archives.py), and never stops the destroy."""
        why = archives.REASONS.get(reason)
        row: SandboxRow | None = await self.db(store.get_sandbox, sandbox_id)
        if why is None or row is None or row.owner_id is None:
            return
        try:
            await self.archiver.archive(row, why, self._archive_spec(row.template))
        except Exception:
            log.exception("archive of %s before its destroy", sandbox_id)

    def _archive_spec(self, template: str) -> Archive:
        """The template's archive section; the defaults when the template is gone meanwhile."""
        try:
            return self.template(template).archive
        except EngineError:
            return Archive()

    async def submit(self, sandbox_id: str, *, by: str) -> dict[str, Any]:
        """The candidate hands in: archive now (reason submitted), an event, a line on the
        workspace's terminals, then a destroy when the template's ``submit.destroy`` says so.
        Returns {archive, destroyed}. Once per sandbox: a second submit, even at the same
        time, waits for the first one's report and returns it."""
        if not await self.db(archives.claim_submit, sandbox_id, by=by):
            return await self._submit_report(sandbox_id)
        try:
            row: SandboxRow = await self.db(store.get_sandbox, sandbox_id)
            try:
                template: Template | None = self.template(row.template)
            except EngineError:
                template = None
            spec = template.archive if template else Archive()
            made = await self.archiver.archive(row, "submitted", spec)
            await self._event(sandbox_id, "submit", f"submitted by {by}")
            destroy = bool(template and template.submit.destroy)
            if destroy:
                destroy = await self._destroy_submitted(sandbox_id)
            report = {"archive": made.public(), "destroyed": destroy}
            await self.db(archives.finish_submit, sandbox_id, report)
        except BaseException:
            await self.db(archives.drop_submit, sandbox_id)
            raise
        workspace = (row.outputs or {}).get("workspace")
        if workspace:
            text = (
                f"Submitted: {made.files} files archived"
                if made.error is None
                else f"Submitted, but the archive failed: {made.error}"
            ) + ("; the workspace is being removed" if destroy else "")
            await asyncio.to_thread(notify_terminal, str(workspace), text)
        return report

    async def _submit_report(self, sandbox_id: str) -> dict[str, Any]:
        """The report of the submit another call started (waited for while it archives)."""
        deadline = time.monotonic() + self.settings.archive_timeout + archives.DOCKER_TIMEOUT * 2
        while True:
            claimed, report = await self.db(archives.submit_report, sandbox_id)
            if report is not None:
                return dict(report)
            if not claimed or time.monotonic() > deadline:
                raise ConflictError(f"the submit of sandbox {sandbox_id} did not finish; retry")
            await asyncio.sleep(0.5)

    async def _destroy_submitted(self, sandbox_id: str) -> bool:
        """Start the destroy a template's ``submit.destroy`` asks for (reason submitted: the
        destroy does not archive again); False when the sandbox is no longer running."""
        reason = DestroyReason.SUBMITTED

        def begin(conn: psycopg.Connection) -> bool:
            row = store.transition(
                conn, sandbox_id, SandboxState.DESTROYING, reason=reason.value, worker=self.worker
            )
            if row is not None:
                store.add_event(conn, sandbox_id, "state", f"destroying ({reason})")
            return row is not None

        if not await self.db(begin):
            return False
        self.start_destroy(sandbox_id, reason)
        return True

    async def _finish(
        self,
        sandbox_id: str,
        state: SandboxState,
        *,
        outputs: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        def apply(conn: psycopg.Connection) -> None:
            row = store.transition(conn, sandbox_id, state, outputs=outputs, error=error)
            if row is None:  # not a legal step from the row's state: record, change nothing
                store.add_event(conn, sandbox_id, "progress", f"ignored transition to {state}")
                return
            store.add_event(
                conn, sandbox_id, "state", state.value + (f": {error}" if error else "")
            )

        # The stack work is done and cannot be asked again: its result is kept trying through
        # a database restart, or the row would stay mid-operation.
        await self.db_through_restarts(apply, what=f"recording {sandbox_id} as {state.value}")

    async def db_through_restarts(self, fn: Any, *args: Any, what: str, **kwargs: Any) -> Any:
        """``db``, tried again through a database restart (for FINISH_RETRY seconds): for the
        writes of work already done that cannot be asked again (a stack operation's result, a
        sandbox's setup after its containers exist)."""
        deadline = time.monotonic() + FINISH_RETRY
        delay = 0.5
        while True:
            try:
                return await self.db(fn, *args, **kwargs)
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: %s; retrying", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _busy_message(self) -> str:
        return (
            f"the engine is busy: {self._pending_creates} creates running or queued "
            f"(limit {self.settings.max_pending_creates}); retry shortly"
        )

    def _rate_limit(self, client: Client) -> None:
        window = self._creates[client.id]
        now = time.monotonic()
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.settings.creates_per_minute:
            raise QuotaExceeded(f"more than {self.settings.creates_per_minute} creates a minute")
        window.append(now)


def _inspect(container: str) -> dict[str, Any]:
    client = docker.from_env(timeout=30)
    try:
        attrs: dict[str, Any] = client.api.inspect_container(container)
        return attrs
    finally:
        client.close()


def format_duration_short(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


# Shows a message on every tmux client of the workspace (the browser terminals), for 15 s.
_TMUX_NOTICE = (
    'for c in $(tmux list-clients -F "#{client_name}" 2>/dev/null); do'
    ' tmux display-message -d 15000 -c "$c" "$1"; done'
)


def notify_terminal(workspace: str, message: str) -> bool:
    """Best effort: a line on the terminals attached to the workspace. False when it could
    not be shown (no container, no tmux server: nobody is attached)."""
    client = docker.from_env(timeout=30)
    try:
        container = client.containers.get(workspace)
        user = (container.attrs.get("Config") or {}).get("User") or "root"
        result = container.exec_run(
            ["sh", "-c", _TMUX_NOTICE, "sh", message.replace("#", "##")], user=user
        )
        return bool(result.exit_code == 0)
    except docker.errors.DockerException as exc:
        log.info("no terminal notice for %s: %s", workspace, exc)
        return False
    finally:
        client.close()
