"""The reaper: destroys sandboxes whose time is up, and keeps the rest honest.

The decision is a pure function of a row and the time; claiming is one SQL statement with
``FOR UPDATE SKIP LOCKED`` that also moves the row to ``destroying``, so several engine
processes reaping one database never destroy the same sandbox twice. The destroy itself is the
service's ordinary destroy job (reason ``ttl``, final state ``expired``).

Each pass, in order: settle sandboxes whose engine process died (reconcile), destroy the
expired, warn the soon-to-expire, repair running sandboxes changed by hand (drift), and every
``sweep_interval`` remove orphans; then prune rows past the retention period, and archives
past theirs (engine/hiring/archives.py). One step failing does not stop the others. Of several
engine processes on one database one does the passes (``WorkerLease.lead``); when it dies,
the next to try takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import psycopg

from engine import store
from engine.ai import store as ai_store
from engine.sandboxes.service import SandboxService
from engine.store import DestroyReason, SandboxRow
from engine.terminal import recordings

log = logging.getLogger("sandbox_engine.reaper")
Clock = Callable[[], datetime]


def should_reap(row: SandboxRow, now: datetime) -> bool:
    """Running (or lost, failed, or pooled: a pool sandbox's expiry is its maximum age) and past its
    expiry. A sandbox still being created is left to its create job (its stack is busy); it is
    reaped on the first pass after it settles."""
    return row.state in ("running", "lost", "failed", "pooled") and row.expires_at <= now


def reap_reason(row: SandboxRow) -> DestroyReason:
    """Why an expired sandbox is destroyed: its TTL ran out, or it aged out of the pool."""
    return DestroyReason.RECYCLED if row.state == "pooled" else DestroyReason.TTL


def claim_expired(
    conn: psycopg.Connection, *, now: datetime, limit: int, worker: str | None = None
) -> list[SandboxRow]:
    """Claim up to ``limit`` expired sandboxes: lock them (skipping rows another process holds),
    then mark them ``destroying`` with reason ttl (recycled for pool sandboxes), in the
    caller's transaction."""
    candidates = [
        row for row in store.lock_expired(conn, now=now, limit=limit) if should_reap(row, now)
    ]
    claimed = []
    for row in candidates:
        reason = reap_reason(row)
        moved = store.begin_destroy(conn, row.id, reason, worker=worker)
        if moved is not None:
            claimed.append(moved)
    return claimed


class Reaper:
    def __init__(
        self,
        service: SandboxService,
        *,
        interval: float,
        batch: int = 20,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.service = service
        self.interval = interval
        self.batch = batch
        self.clock = clock
        self._last_sweep: float | None = None

    async def run_once(self, *, force: bool = False) -> list[str]:
        """One pass; returns the ids of the sandboxes whose destroy it started. None while
        the engine is stopping (what it would start could not run). ``force``: even while
        another engine leads (an operator's one pass: claims never collide)."""
        settings = self.service.settings
        if self.service.stopping:
            return []
        if not force and not await asyncio.to_thread(self.service.lease.lead, "reaper"):
            return []  # another engine on this database does the pass (engine/workers.py)
        await self._step("reconcile", self.service.reconcile())
        now = self.clock()
        claimed: list[SandboxRow] = await self.service.db(
            claim_expired, now=now, limit=self.batch, worker=self.service.worker
        )
        for row in claimed:
            log.info("sandbox %s expired at %s: destroying", row.id, row.expires_at)
            self.service.start_destroy(row.id, DestroyReason(row.reason or "ttl"))
        if settings.warn_before > 0:
            before = timedelta(seconds=settings.warn_before)
            await self._step("warnings", self.service.warn_expiring(now, before))
        await self._step("drift", self.service.check_drift())
        await self._step("pool", self.service.refill_pool())
        await self._step("stack reserve", self.service.refill_reserve())
        mono = time.monotonic()
        if self._last_sweep is None or mono - self._last_sweep >= settings.sweep_interval:
            self._last_sweep = mono
            await self._step("orphan sweep", self.service.sweep_orphans())
        pruned = await self.service.db(
            store.prune_destroyed, older_than_days=settings.retention_days
        )
        if pruned:
            log.info("pruned %d sandboxes past the retention period", pruned)
        # Recordings outlive their sandbox's row: they go after a retention of their own.
        await self._step(
            "old recordings",
            self.service.db(
                recordings.prune,
                root=settings.recordings_path,
                now=now,
                retention=settings.recording_retention,
            ),
        )
        await self._step("expired archives", self.service.archiver.prune(now))
        # Reservations a gateway that died mid-answer left holding budgets.
        await self._step("stale AI reservations", self.service.db(ai_store.release_stale))
        # AI transcripts go with the terminal sessions they sit beside (recording_retention).
        await self._step(
            "old AI transcripts",
            self.service.db(ai_store.prune, now=now, retention=settings.recording_retention),
        )
        return [row.id for row in claimed]

    @staticmethod
    async def _step(name: str, work: Awaitable[object]) -> None:
        try:
            await work
        except Exception:  # the rest of the pass still runs; the step is retried next pass
            log.exception("reaper step %s failed", name)

    async def run_forever(self) -> None:
        """Once at start, then every interval, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:  # a failed pass is retried on the next one
                log.exception("reaper pass failed")
            await asyncio.sleep(self.interval)
