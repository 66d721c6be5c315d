"""The sandbox service: rows, events and stack jobs, used by the API and the CLI alike.

Requests change rows and return at once; the stack work runs as background jobs (one task per
operation, the blocking Pulumi calls in threads). Every state change and every progress line
is an event of the sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from engine import store
from engine.errors import ConflictError, EngineError, NotFoundError
from engine.settings import Settings
from engine.stacks import StackManager
from engine.store import Client, DestroyReason, SandboxRow, SandboxState
from engine.templates import Template, find
from engine.units import format_duration, parse_duration

log = logging.getLogger("sandbox_engine.service")

MAX_ENV = 50
MAX_ENV_VALUE = 4096


class InvalidRequest(EngineError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QuotaExceeded(EngineError):
    pass


@dataclass(frozen=True)
class CreateRequest:
    template: str
    ttl: str | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    idempotency_key: str | None = None


class SandboxService:
    def __init__(self, settings: Settings, pool: ConnectionPool, stacks: StackManager) -> None:
        self.settings = settings
        self.pool = pool
        self.stacks = stacks
        self._jobs: set[asyncio.Task[None]] = set()
        self._creates: dict[int, deque[float]] = defaultdict(deque)

    # --- database --------------------------------------------------------------------------

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

    async def list_for(self, client: Client, *, state: str | None) -> list[SandboxRow]:
        owner = None if client.role == "admin" else client.id
        rows: list[SandboxRow] = await self.db(store.list_sandboxes, owner_id=owner, state=state)
        return rows

    async def events(self, sandbox_id: str, after: int = 0) -> list[store.Event]:
        events: list[store.Event] = await self.db(store.list_events, sandbox_id, after=after)
        return events

    # --- changing --------------------------------------------------------------------------

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
        env = request.env or {}
        if len(env) > MAX_ENV or any(len(v) > MAX_ENV_VALUE for v in env.values()):
            raise InvalidRequest("env", f"at most {MAX_ENV} variables of {MAX_ENV_VALUE} bytes")
        self._rate_limit(client)
        limit = self.settings.max_live_sandboxes_per_key

        def insert(conn: psycopg.Connection) -> SandboxRow:
            # Counting and inserting in one transaction, under the client's row lock, keeps
            # concurrent creates of one key from passing the quota together.
            conn.execute("SELECT 1 FROM api_clients WHERE id = %s FOR UPDATE", (client.id,))
            live = store.count_live(conn, owner_id=client.id)
            if live >= limit:
                raise QuotaExceeded(f"this key already has {live} live sandboxes (limit {limit})")
            row = store.insert_sandbox(
                conn,
                sandbox_id=secrets.token_hex(5),
                owner_id=client.id,
                template=template.name,
                ttl_seconds=int(ttl.total_seconds()),
                idempotency_key=request.idempotency_key,
                metadata=request.metadata,
            )
            store.add_event(conn, row.id, "state", "creating")
            return row

        row = await self.db(insert)
        self._spawn(self._create_job(row, template, client.name, env))
        return row, True

    async def destroy(
        self, client: Client, sandbox_id: str, reason: DestroyReason = DestroyReason.REQUEST
    ) -> SandboxRow:
        await self.get(client, sandbox_id)

        def begin(conn: psycopg.Connection) -> SandboxRow:
            row = store.transition(conn, sandbox_id, SandboxState.DESTROYING, reason=reason.value)
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
        return result

    async def reconcile(self) -> list[str]:
        """At start: settle sandboxes an engine left mid-operation (killed or crashed).

        Policy: an interrupted create is failed and cleaned (its stack torn down, anything
        labelled with it removed); an interrupted destroy is finished. Either way nothing of
        the sandbox is left behind. Returns the sandbox ids settled.
        """
        rows: list[SandboxRow] = await self.db(
            store.list_sandboxes, owner_id=None, state=None, limit=100_000
        )
        stuck = [r for r in rows if r.state in ("creating", "destroying")]
        for row in stuck:
            await self._event(row.id, "progress", "recovering after an engine restart")
            try:
                await asyncio.to_thread(self.stacks.recover, row.id)
            except Exception as exc:
                log.warning("recovery of %s failed: %s", row.id, exc)
                await self._force(row.id, SandboxState.FAILED, f"recovery failed: {exc}")
                continue
            if row.state == "creating":
                await self._force(
                    row.id, SandboxState.FAILED, "the engine stopped during the create; cleaned up"
                )
            else:
                final = (
                    SandboxState.EXPIRED
                    if row.reason == DestroyReason.TTL
                    else SandboxState.DESTROYED
                )
                await self._finish(row.id, final)
        return [r.id for r in stuck]

    async def _force(self, sandbox_id: str, state: SandboxState, error: str) -> None:
        def apply(conn: psycopg.Connection) -> None:
            conn.execute(
                # Recovery removed everything of the sandbox: it is gone as of now.
                "UPDATE sandboxes SET state = %s, error = %s, destroyed_at = now() WHERE id = %s",
                (state.value, error, sandbox_id),
            )
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

    def _progress(self, sandbox_id: str) -> Any:
        loop = asyncio.get_running_loop()

        def emit(line: str) -> None:
            asyncio.run_coroutine_threadsafe(self._event(sandbox_id, "progress", line), loop)

        return emit

    async def _event(self, sandbox_id: str, kind: str, message: str) -> None:
        await self.db(store.add_event, sandbox_id, kind, message)

    async def _create_job(
        self, row: SandboxRow, template: Template, owner: str, env: dict[str, str]
    ) -> None:
        try:
            outputs = await asyncio.to_thread(
                self.stacks.create,
                template,
                self.settings.templates_path,
                sandbox_id=row.id,
                owner=owner,
                env=env,
                progress=self._progress(row.id),
            )
        except Exception as exc:  # recorded on the row; the stack was torn down
            log.warning("sandbox %s failed: %s", row.id, exc)
            await self._finish(row.id, SandboxState.FAILED, error=str(exc)[:2000])
            return
        await self._finish(row.id, SandboxState.RUNNING, outputs=outputs)

    async def _destroy_job(self, sandbox_id: str, reason: DestroyReason) -> None:
        try:
            await asyncio.to_thread(
                self.stacks.destroy, sandbox_id, progress=self._progress(sandbox_id)
            )
        except NotFoundError:
            pass  # no stack (a create that failed): nothing to destroy
        except Exception as exc:
            log.warning("destroy of %s failed: %s", sandbox_id, exc)
            await self._finish(sandbox_id, SandboxState.FAILED, error=str(exc)[:2000])
            return
        final = SandboxState.EXPIRED if reason == DestroyReason.TTL else SandboxState.DESTROYED
        await self._finish(sandbox_id, final)

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

        await self.db(apply)

    def _rate_limit(self, client: Client) -> None:
        window = self._creates[client.id]
        now = time.monotonic()
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.settings.creates_per_minute:
            raise QuotaExceeded(f"more than {self.settings.creates_per_minute} creates a minute")
        window.append(now)
