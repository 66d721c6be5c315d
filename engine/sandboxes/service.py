"""The sandbox service: what the API and the CLI call. A facade over the parts, each with its
dependencies passed in:

- ``Jobs`` (jobs.py): the database, the stack threads, background jobs and the stop;
- ``Creates`` (creates.py): requests checked and bounded, rows, the create job;
- ``Lifecycle`` (lifecycle.py): more time, expiry warnings, submit, destroy;
- ``Pool`` (pool.py): the warm pool and the stack reserve;
- ``Recovery`` (recovery.py): reconcile, drift and repair, the orphan sweep;
- ``ClaudeSetup`` (engine/ai/setup.py): Claude Code in a sandbox handed out;
- the backend (engine/backend): what Pulumi does not do to a sandbox's containers.

Requests change rows and return at once; the stack work runs as background jobs.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from engine import first_admin, store, workers
from engine.ai.setup import ClaudeSetup
from engine.backend import Backend
from engine.egress.setup import EgressSetup
from engine.errors import NotFoundError
from engine.hiring import archives
from engine.model.templates import Template
from engine.sandboxes.creates import (
    CreateRequest,
    Creates,
    EngineBusy,
    InvalidRequest,
    QuotaExceeded,
)
from engine.sandboxes.jobs import Jobs
from engine.sandboxes.lifecycle import Lifecycle
from engine.sandboxes.pool import Pool
from engine.sandboxes.recovery import Recovery
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import Client, DestroyReason, SandboxRow
from engine.terminal.recordings import Viewer
from engine.terminal.session import TerminalSession

__all__ = ["CreateRequest", "EngineBusy", "InvalidRequest", "QuotaExceeded", "SandboxService"]

log = logging.getLogger("sandbox_engine.service")


class SandboxService:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        stacks: StackManager,
        reads: AsyncConnectionPool,
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        # The API's hot reads (authentication, GET one, GET list) on the event loop itself:
        # no thread hop per query.
        self.reads = reads
        self.stacks = stacks
        self.backend = backend or stacks.backend
        self.lease = workers.WorkerLease(settings.database_url.get_secret_value())
        self.jobs = Jobs(settings, pool, stacks, self.lease)
        self.archiver = archives.Archiver(settings, self.jobs.db, self.backend)
        self.claude = ClaudeSetup(settings, self.jobs, self.backend)
        self.egress = EgressSetup(settings, self.jobs, self.backend)
        self.creates = Creates(settings, self.jobs, stacks, self.backend, self.claude, self.egress)
        self.lifecycle = Lifecycle(settings, self.jobs, stacks, self.backend, self.archiver)
        self.warm = Pool(settings, self.jobs, stacks, self.creates, self.lifecycle)
        self.recovery = Recovery(
            self.jobs, stacks, self.backend, self.lifecycle, self.warm, self.claude, self.egress
        )

    async def start(self) -> None:
        """Take this process's worker lease and learn the engine's instance id."""
        await asyncio.to_thread(self.lease.acquire)
        self.stacks.instance = await self.db(store.engine_instance)
        await self.recovery.remount_disks()  # after a reboot, before any repair

    @property
    def worker(self) -> str:
        return self.jobs.worker

    @property
    def gateway_port(self) -> int:
        """The port sandboxes reach the AI gateway on (set once it listens)."""
        return self.claude.gateway_port

    @gateway_port.setter
    def gateway_port(self, port: int) -> None:
        self.claude.gateway_port = port

    # --- the process -----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.jobs.stopping

    def begin_stop(self) -> None:
        """The engine got its stop signal: creates are refused, no new stack operation
        starts, one cut short from now on is left for recovery (signal-handler safe)."""
        self.jobs.begin_stop()

    async def close(self, *, wait_all: bool = False) -> None:
        await self.jobs.close(wait_all=wait_all)

    async def drain(self) -> None:
        await self.jobs.drain()

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a repository function in one transaction, off the event loop."""
        return await self.jobs.db(fn, *args, **kwargs)

    def template(self, name: str) -> Template:
        return self.jobs.template(name)

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

    async def create(self, client: Client, request: CreateRequest) -> tuple[SandboxRow, bool]:
        """Record a new sandbox and start its stack; (row, created). A repeated
        Idempotency-Key returns the first sandbox with created False. A claim refills the
        pool it came from; a reserved stack taken refills the reserve."""
        row, created, source = await self.creates.create(client, request)
        if source == "pool":
            self.jobs.spawn(self.warm.refill_pool(row.template))
        elif source == "reserve":
            self.jobs.spawn(self.warm.refill_reserve())
        return row, created

    async def destroy(
        self, client: Client, sandbox_id: str, reason: DestroyReason = DestroyReason.REQUEST
    ) -> SandboxRow:
        await self.get(client, sandbox_id)
        return await self.lifecycle.destroy(sandbox_id, reason)

    def start_destroy(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Start the destroy job of a sandbox already moved to ``destroying``."""
        self.lifecycle.start_destroy(sandbox_id, reason)

    async def extend(self, client: Client, sandbox_id: str, ttl: str) -> SandboxRow:
        return await self.lifecycle.extend(await self.get(client, sandbox_id), ttl)

    async def submit(self, sandbox_id: str, *, by: str) -> dict[str, Any]:
        return await self.lifecycle.submit(sandbox_id, by=by)

    def terminal(self, row: SandboxRow, viewer: Viewer, *, watch: bool) -> TerminalSession:
        """A terminal session on the sandbox's shell (engine/terminal/session.py); the
        candidate's ``submit`` typed in it submits for them."""

        async def submit(sandbox_id: str) -> object:
            return await self.submit(sandbox_id, by="shell")

        return TerminalSession(
            backend=self.backend,
            db=self.db,
            submit=submit,
            row=row,
            template=self.template(row.template),
            viewer=viewer,
            watch=watch,
            recordings_path=self.settings.recordings_path,
            idle_after=self.settings.idle_after,
        )

    # --- the reaper's passes ---------------------------------------------------------------

    async def warn_expiring(self, now: datetime, before: timedelta) -> list[str]:
        return await self.lifecycle.warn_expiring(now, before)

    async def reconcile(self) -> list[str]:
        return await self.recovery.reconcile()

    async def check_drift(self) -> list[str]:
        return await self.recovery.check_drift()

    async def sweep_orphans(self) -> list[str]:
        return await self.recovery.sweep_orphans()

    async def refill_pool(self, only: str | None = None) -> list[str]:
        return await self.warm.refill_pool(only)

    async def refill_reserve(self) -> list[str]:
        return await self.warm.refill_reserve()
