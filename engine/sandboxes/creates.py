"""Creating sandboxes: the request checked and bounded, the row recorded (or a warm-pool
sandbox claimed), then the create job — the stack brought up, the task seeded, Claude Code set
up — before the sandbox is offered.

Bounds: a key's live sandboxes (``max_live_sandboxes_per_key``, counted and inserted under the
key's row lock), its creates a minute (``creates_per_minute``), and this engine's cold creates
running or queued (``max_pending_creates``: past it 503, though a pool sandbox is still handed
out: it needs no stack work).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from engine import store
from engine.ai.setup import ClaudeSetup
from engine.backend import Backend
from engine.egress.setup import EgressSetup
from engine.errors import EngineError, NotFoundError, describe
from engine.hiring import tasks
from engine.model.templates import Template
from engine.sandboxes.jobs import Jobs
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import Client, SandboxRow, SandboxState
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


class EngineBusy(EngineError):
    """This engine already has as many creates running or queued as it takes (503)."""


@dataclass(frozen=True)
class CreateRequest:
    template: str
    ttl: str | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    idempotency_key: str | None = None


# Where a new sandbox came from: a warm pool's claim, a reserved stack, or a new one.
Source = str


class Creates:
    def __init__(
        self,
        settings: Settings,
        jobs: Jobs,
        stacks: StackManager,
        backend: Backend,
        claude: ClaudeSetup,
        egress: EgressSetup,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.stacks = stacks
        self.backend = backend
        self.claude = claude
        self.egress = egress
        self._creates: dict[int, deque[float]] = defaultdict(deque)
        # Cold creates of this process running or queued for a stack thread (the bound on
        # them is max_pending_creates; pool refills are not counted, they wait their turn).
        self._pending = 0
        self._runtimes: frozenset[str] = frozenset()  # dockerd's, as last asked

    async def create(
        self, client: Client, request: CreateRequest
    ) -> tuple[SandboxRow, bool, Source]:
        """Record a new sandbox and start its stack: (row, created, source). A repeated
        Idempotency-Key returns the first sandbox with created False."""
        if request.idempotency_key:
            found = await self.jobs.db(
                store.find_idempotent, owner_id=client.id, key=request.idempotency_key
            )
            if found:
                return found, False, "idempotent"
        template, ttl_seconds, env = self._checked(request)
        self._check_backend(template)
        await self._check_runtime(template)
        self._rate_limit(client)
        # A create the warm pool can serve: the template keeps a pool and the request asks
        # for nothing a pool sandbox was not made with (env is baked into its containers).
        poolable = template.pool > 0 and not env
        # A cold create takes a slot before its row exists, so a burst cannot pass the bound
        # together; a full engine can still hand out pool sandboxes (they need no stack work).
        full = self._pending >= self.settings.max_pending_creates
        if full and not poolable:
            raise EngineBusy(self._busy_message())
        if not full:
            self._pending += 1
        insert = self._insert(client, request, template, ttl_seconds, poolable=poolable, full=full)
        try:
            row, source = await self.jobs.db(insert)
        except BaseException:
            if not full:
                self._pending -= 1
            raise
        if source == "pool":
            if not full:
                self._pending -= 1
            # Its gateway token is the claimer's: minted now, beside the answer (a claim is
            # answered in milliseconds; the token is in place a few tens of them later).
            self.jobs.spawn(self.claude.claimed(row, template))
            return row, True, source
        self.jobs.spawn(
            self.job(row, template, client.name, env, reserved=source == "reserve", counted=True)
        )
        return row, True, source

    def _check_backend(self, template: Template) -> None:
        """What a swarm does not do yet is refused before anything is made (docs/cluster.md):
        egress rules (the firewall that enforces them runs on the engine's host, not on the
        nodes), and published ports where the swarm has no edge (SANDBOX_SWARM_EDGE)."""
        if self.settings.backend != "swarm":
            return
        if template.egress != "open":
            raise InvalidRequest(
                "template",
                f"{template.name!r} has egress rules (network.egress {template.egress}), which"
                " a swarm backend does not enforce yet: use a template with egress open there"
                " (docs/cluster.md)",
            )
        if any(e.public for e in template.expose) and not self.settings.swarm_edge:
            raise InvalidRequest(
                "template",
                f"{template.name!r} publishes ports, and this swarm has no edge to route them"
                " (SANDBOX_SWARM_EDGE, docs/cluster.md)",
            )

    async def _check_runtime(self, template: Template) -> None:
        """A template whose runtime dockerd does not have is refused before anything is made
        (dockerd is asked again each time until it has it: registering it needs no restart
        of the engine)."""
        runtime = template.runtime or self.settings.runtime
        if runtime == "runc" or runtime in self._runtimes:
            return
        self._runtimes = frozenset(await asyncio.to_thread(self.backend.runtimes))
        if runtime not in self._runtimes:
            raise InvalidRequest(
                "template",
                f"{template.name!r} runs under the {runtime} runtime, which dockerd does not"
                " have: the operator registers it (make setup; docs/security.md, gVisor)",
            )

    def _checked(self, request: CreateRequest) -> tuple[Template, int, dict[str, str]]:
        """The request's template, TTL (seconds) and env, each checked (InvalidRequest names
        the field); EngineBusy while the engine stops."""
        try:
            template = self.jobs.template(request.template)
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
        if self.jobs.stopping:
            raise EngineBusy("the engine is stopping; retry shortly")
        env = request.env or {}
        if len(env) > MAX_ENV or any(len(v) > MAX_ENV_VALUE for v in env.values()):
            raise InvalidRequest("env", f"at most {MAX_ENV} variables of {MAX_ENV_VALUE} bytes")
        return template, int(ttl.total_seconds()), env

    def _insert(
        self,
        client: Client,
        request: CreateRequest,
        template: Template,
        ttl_seconds: int,
        *,
        poolable: bool,
        full: bool,
    ) -> Callable[[psycopg.Connection], tuple[SandboxRow, Source]]:
        limit = self.settings.max_live_sandboxes_per_key

        def insert(conn: psycopg.Connection) -> tuple[SandboxRow, Source]:
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
                    ttl_seconds=ttl_seconds,
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
                ttl_seconds=ttl_seconds,
                idempotency_key=request.idempotency_key,
                metadata=request.metadata,
                worker=self.jobs.worker,
            )
            store.add_event(conn, row.id, "state", "creating")
            return row, "reserve" if reserved else "new"

        return insert

    # --- the job -------------------------------------------------------------------------------

    async def job(
        self,
        row: SandboxRow,
        template: Template,
        owner: str,
        env: dict[str, str],
        *,
        reserved: bool = False,
        counted: bool = False,
        done: Callable[[bool], None] | None = None,
    ) -> None:
        """The create job: the stack, the task, Claude Code; then ``running`` (``pooled`` for a
        pool sandbox). ``done(ok)`` is told how it ended (the pool's back-off)."""
        try:
            ok = await self._run(row, template, owner, env, reserved=reserved)
        finally:
            if counted:
                self._pending -= 1
        if done is not None and ok is not None:
            done(ok)

    async def _run(
        self,
        row: SandboxRow,
        template: Template,
        owner: str,
        env: dict[str, str],
        *,
        reserved: bool,
    ) -> bool | None:
        """True when the sandbox is ready, False when it failed, None when the engine's stop
        cut it short (left for recovery)."""
        try:
            outputs = await self.jobs.stack_op(
                self.stacks.create,
                template,
                self.settings.templates_path,
                sandbox_id=row.id,
                owner=owner,
                env=env,
                progress=self.jobs.progress(row.id),
                reserved=reserved,
            )
        except Exception as exc:  # recorded on the row; the stack was torn down
            if await self.jobs.left_for_recovery(row.id, "create", exc):
                return None
            log.warning("sandbox %s failed: %s", row.id, exc)
            await self.jobs.finish(row.id, SandboxState.FAILED, error=describe(exc)[:2000])
            return False
        # Seeded and set up before the sandbox is offered (a pool sandbox is claimed ready).
        seeding = self.jobs.progress(row.id, "task")
        try:
            # Its egress rules first: the task's commands may install packages.
            await self.egress.apply(row, template, outputs)
            if template.task is not None:
                await asyncio.to_thread(
                    tasks.seed,
                    self.backend,
                    template,
                    self.settings.templates_path,
                    str(outputs["workspace"]),
                    seeding,
                )
                await seeding.written()  # its last line is in the events before `running`
            await self.claude.set_up(row, template, outputs, first=True)
        except Exception as exc:
            if await self.jobs.left_for_recovery(row.id, "create", exc):
                return None
            return False if await self._undo(row, exc) else None
        ready = SandboxState.POOLED if row.owner_id is None else SandboxState.RUNNING
        await self.jobs.finish(row.id, ready, outputs=outputs)
        return True

    async def _undo(self, row: SandboxRow, exc: Exception) -> bool:
        """A sandbox whose setup failed after its stack came up: torn down, failed (False: the
        engine's stop cut the teardown short, recovery finishes it)."""
        log.warning("sandbox %s: setting it up failed: %s", row.id, exc)
        try:
            await self.jobs.stack_op(
                self.stacks.destroy, row.id, progress=self.jobs.progress(row.id)
            )
            error = f"{describe(exc)}; cleaned up"
        except Exception as cleanup:
            if await self.jobs.left_for_recovery(row.id, "create", cleanup):
                return False
            error = f"{describe(exc)}; the cleanup failed too: {describe(cleanup)}"
        await self.jobs.finish(row.id, SandboxState.FAILED, error=error[:2000])
        return True

    # --- bounds --------------------------------------------------------------------------------

    def _busy_message(self) -> str:
        return (
            f"the engine is busy: {self._pending} creates running or queued "
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
