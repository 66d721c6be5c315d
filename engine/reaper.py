"""The reaper: destroys sandboxes whose time is up.

The decision is a pure function of a row and the time; claiming is one SQL statement with
``FOR UPDATE SKIP LOCKED`` that also moves the row to ``destroying``, so several engine
processes reaping one database never destroy the same sandbox twice. The destroy itself is the
service's ordinary destroy job (reason ``ttl``, final state ``expired``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
from psycopg.rows import class_row

from engine import store
from engine.service import SandboxService
from engine.store import DestroyReason, SandboxRow

log = logging.getLogger("sandbox_engine.reaper")
Clock = Callable[[], datetime]


def should_reap(row: SandboxRow, now: datetime) -> bool:
    """Running (or failed) and past its expiry. A sandbox still being created is left to its
    create job (its stack is busy); it is reaped on the first pass after it settles."""
    return row.state in ("running", "failed") and row.expires_at <= now


def claim_expired(conn: psycopg.Connection, *, now: datetime, limit: int) -> list[SandboxRow]:
    """Claim up to ``limit`` expired sandboxes: lock them (skipping rows another process holds),
    then mark them ``destroying`` with reason ttl, in the caller's transaction."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "SELECT id, owner_id, template, state, reason, created_at, expires_at, destroyed_at,"
            " outputs, error, metadata FROM sandboxes"
            " WHERE state IN ('running', 'failed') AND expires_at <= %s"
            " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, limit),
        )
        candidates = [row for row in cur.fetchall() if should_reap(row, now)]
    claimed = []
    for row in candidates:
        moved = store.transition(
            conn, row.id, store.SandboxState.DESTROYING, reason=DestroyReason.TTL.value
        )
        if moved is not None:
            store.add_event(conn, row.id, "state", "destroying (ttl)")
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

    async def run_once(self) -> list[str]:
        """Claim what has expired and start its destroy jobs; return the sandbox ids."""
        now = self.clock()
        claimed: list[SandboxRow] = await self.service.db(claim_expired, now=now, limit=self.batch)
        for row in claimed:
            log.info("sandbox %s expired at %s: destroying", row.id, row.expires_at)
            self.service.start_destroy(row.id, DestroyReason.TTL)
        pruned = await self.service.db(
            store.prune_destroyed, older_than_days=self.service.settings.retention_days
        )
        if pruned:
            log.info("pruned %d sandboxes past the retention period", pruned)
        return [row.id for row in claimed]

    async def run_forever(self) -> None:
        """Once at start, then every interval, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:  # a failed pass is retried on the next one
                log.exception("reaper pass failed")
            await asyncio.sleep(self.interval)
