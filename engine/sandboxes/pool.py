"""The warm pool and the stack reserve: sandboxes and empty stacks made ahead, so a create is a
claim (milliseconds) or skips ``stack init``; pool sandboxes nobody claimed are recycled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

import psycopg

from engine import store, workers
from engine.errors import EngineError
from engine.model.templates import Template, load_all
from engine.sandboxes.creates import Creates
from engine.sandboxes.jobs import Jobs
from engine.sandboxes.lifecycle import Lifecycle
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import DestroyReason, SandboxRow

log = logging.getLogger("sandbox_engine.service")

# Seconds a template's pool waits after one of its creates failed.
POOL_BACKOFF = 60.0
# Pool creates one refill starts per template (the rest follow on the next passes).
POOL_BATCH = 2


class Pool:
    def __init__(
        self,
        settings: Settings,
        jobs: Jobs,
        stacks: StackManager,
        creates: Creates,
        lifecycle: Lifecycle,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.stacks = stacks
        self.creates = creates
        self.lifecycle = lifecycle
        # Templates whose last pool create failed, and until when refills of it wait.
        self._backoff: dict[str, float] = {}
        self._reserve_lock = asyncio.Lock()

    def _told(self, template: Template) -> Callable[[bool], None]:
        """What a pool create of ``template`` tells when it ends: a failure makes this
        template's refills wait POOL_BACKOFF seconds."""

        def done(ok: bool) -> None:
            if ok:
                self._backoff.pop(template.name, None)
            else:
                self._backoff[template.name] = time.monotonic() + POOL_BACKOFF

        return done

    async def refill_pool(self, only: str | None = None) -> list[str]:
        """Bring every template's pool (or ``only`` that one's) to its size: recycle pool
        sandboxes made from an older version of the template or beyond the size, then start
        creates for what is missing (at most POOL_BATCH per template at a time; a template
        whose pool create failed waits POOL_BACKOFF seconds). Decisions are taken under a
        per-template database lock, so engine processes sharing the database do not
        overfill. Returns the ids of the pool sandboxes started."""
        if self.jobs.stopping:
            return []
        try:
            templates = load_all(self.settings.templates_path)
        except EngineError as exc:
            log.warning("warm pool: templates could not be read: %s", exc)
            return []
        known = {name: t for name, t in templates.items() if only in (None, name)}
        recycle: list[tuple[str, str]] = []
        if only is None:
            # Pool sandboxes of templates that are gone (or whose pool was set to zero).
            for entry in await self.jobs.db(store.pool_entries):
                gone = entry.template not in templates or templates[entry.template].pool == 0
                if entry.state == "pooled" and gone:
                    recycle.append((entry.id, "its template no longer keeps a pool"))
        started: list[tuple[SandboxRow, Template]] = []
        for template in known.values():
            if template.pool == 0 and only is None:
                continue
            if self._backoff.get(template.name, 0.0) > time.monotonic():
                continue
            for row in await self.jobs.db(self._plan, template, recycle):
                started.append((row, template))
        for sid, why in recycle:
            await self.recycle(sid, why)
        for row, template in started:
            self.jobs.spawn(self.creates.job(row, template, "pool", {}, done=self._told(template)))
        return [row.id for row, _ in started]

    def _plan(
        self, conn: psycopg.Connection, t: Template, recycle: list[tuple[str, str]]
    ) -> list[SandboxRow]:
        """Under the template's pool lock: what to recycle (into ``recycle``) and the rows of
        the pool sandboxes to make."""
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
                worker=self.jobs.worker,
                template_digest=t.digest,
            )
            store.add_event(conn, row.id, "state", "creating (warm pool)")
            rows.append(row)
        return rows

    async def refill_reserve(self) -> list[str]:
        """Initialise empty stacks until the reserve holds ``stack_reserve`` of them (one at a
        time, in the background: each is a CLI run). A reserved stack whose initialising
        process died before it was ready is removed (and its stack with it). Returns the ids
        initialised."""
        jobs = self.jobs
        if jobs.stopping:
            return []
        size = self.settings.stack_reserve
        for sid, ready, worker in await jobs.db(store.reserve_entries):
            if ready or worker == jobs.worker:
                continue
            alive: bool = await jobs.db(workers.is_alive, worker) if worker else False
            if not alive:
                with contextlib.suppress(Exception):
                    await jobs.stack_op(self.stacks.recover, sid)
                await jobs.db(store.drop_reserved, sid)
        made: list[str] = []
        if size == 0:
            return made
        async with self._reserve_lock:
            for sid in await jobs.db(store.plan_reserve, size=size, worker=jobs.worker):
                try:
                    await jobs.stack_op(self.stacks.reserve, sid)
                except Exception as exc:
                    log.warning("could not initialise a reserved stack: %s", exc)
                    await jobs.db(store.drop_reserved, sid)
                    break
                await jobs.db(store.reserve_ready, sid)
                made.append(sid)
        return made

    async def recycle(self, sandbox_id: str, why: str) -> bool:
        """Destroy a pool sandbox nobody claimed (reason recycled); False when it was claimed
        or recycled meanwhile."""
        reason = DestroyReason.RECYCLED

        def begin(conn: psycopg.Connection) -> bool:
            row = store.begin_destroy(conn, sandbox_id, reason, worker=self.jobs.worker, why=why)
            return row is not None

        if not await self.jobs.db(begin):
            return False
        log.info("pool sandbox %s recycled: %s", sandbox_id, why)
        self.lifecycle.start_destroy(sandbox_id, reason)
        return True
