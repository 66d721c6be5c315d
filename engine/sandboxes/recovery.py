"""Recovery: sandboxes an engine process left mid-operation are settled, sandboxes changed
behind the engine's back are repaired, and what no live sandbox owns is swept away.

Run at start and on every reaper pass. Only sandboxes whose worker is dead are settled
(``engine.workers``): a create or destroy another live process is running is left alone.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg

from engine import store, workers
from engine.ai.setup import ClaudeSetup
from engine.backend import DRAINED, NODE_LOST, Backend
from engine.egress.setup import EgressSetup
from engine.errors import Interrupted, describe
from engine.hiring import archives
from engine.sandboxes.jobs import Jobs
from engine.sandboxes.lifecycle import Lifecycle
from engine.sandboxes.pool import Pool
from engine.sandboxes.stacks import StackManager
from engine.store import DestroyReason, SandboxRow, SandboxState

log = logging.getLogger("sandbox_engine.service")

# A sandbox whose containers were removed by hand more often than this is failed, not repaired.
MAX_REPAIRS = 3
# Container states that need no repair ("restarting": Docker's restart policy is at work).
HEALTHY = ("running", "restarting")
# The operation an in-flight state stands for, in messages.
INTERRUPTED = {"creating": "create", "repairing": "repair", "destroying": "destroy"}


class Recovery:
    def __init__(
        self,
        jobs: Jobs,
        stacks: StackManager,
        backend: Backend,
        lifecycle: Lifecycle,
        pool: Pool,
        claude: ClaudeSetup,
        egress: EgressSetup,
    ) -> None:
        self.egress = egress
        self.jobs = jobs
        self.stacks = stacks
        self.backend = backend
        self.lifecycle = lifecycle
        self.pool = pool
        self.claude = claude

    # --- what a dead engine process left --------------------------------------------------

    async def reconcile(self) -> list[str]:
        """Settle sandboxes an engine process left mid-operation (killed, crashed, or
        stopped with work in flight). Policy: an interrupted create or repair is failed and
        cleaned (its stack torn down, anything labelled with it removed); an interrupted
        destroy is finished, archiving first if it was killed before its archive was made.
        Either way nothing of the sandbox is left behind. Returns the sandbox ids settled."""
        jobs = self.jobs

        def orphaned(conn: psycopg.Connection) -> list[SandboxRow]:
            taken = []
            for row in store.in_flight(conn):
                if row.worker == jobs.worker:
                    continue
                if row.worker is not None and workers.is_alive(conn, row.worker):
                    continue
                mine = store.take_over(conn, row.id, dead=row.worker, worker=jobs.worker)
                if mine is not None:
                    taken.append(mine)
            return taken

        stuck: list[SandboxRow] = await jobs.db(orphaned)
        for row in stuck:
            if not await self._settle(row):
                break  # this engine is stopping too: the next start
        return [r.id for r in stuck]

    async def _settle(self, row: SandboxRow) -> bool:
        """One sandbox of a dead worker, to its end state; False when this engine's own stop
        cut it short."""
        jobs, operation = self.jobs, INTERRUPTED[row.state]
        log.warning("sandbox %s was left %s by an engine process now gone", row.id, row.state)
        await jobs.event(
            row.id,
            "progress",
            f"recovering: its engine process stopped or died during the {operation}",
        )
        if row.state == "destroying" and row.reason is not None:
            # Killed before its archive was made: made now, while the workspace may still be
            # there (a failed one is recorded otherwise).
            why = archives.REASONS.get(row.reason)  # type: ignore[call-overload]
            if why and not await jobs.db(archives.has_archive, row.id, why):
                await self.lifecycle.archive_before_destroy(row.id, DestroyReason(row.reason))
        try:
            await jobs.stack_op(self.stacks.recover, row.id)
        except Interrupted:
            return False
        except Exception as exc:
            log.warning("recovery of %s failed: %s", row.id, exc)
            left = await asyncio.to_thread(self.backend.objects, row.id)
            if left or row.state != "destroying":
                await jobs.force(
                    row.id,
                    SandboxState.FAILED,
                    f"recovering the interrupted {operation} failed: {describe(exc)}"
                    + (f" ({', '.join(left)} left)" if left else ""),
                )
                return True
            # The step failed, but nothing of the sandbox is left: it is destroyed.
        if row.state in ("creating", "repairing"):
            await jobs.force(
                row.id,
                SandboxState.FAILED,
                f"the engine stopped during the {operation}; cleaned up",
            )
        else:
            final = (
                SandboxState.EXPIRED if row.reason == DestroyReason.TTL else SandboxState.DESTROYED
            )
            await jobs.finish(row.id, final)
        return True

    # --- drift: changed behind the engine's back ---------------------------------------------

    async def check_drift(self) -> list[str]:
        """Find running sandboxes with a container missing or stopped (removed by hand) and
        start their repair; a pool sandbox in that state is recycled instead (nobody uses it:
        a fresh one is cheaper and certain). Returns the sandbox ids being repaired or
        recycled."""
        jobs = self.jobs
        rows: list[SandboxRow] = [
            row
            for state in ("running", "pooled", "lost")
            for row in await jobs.db(
                store.list_sandboxes, owner_id=None, state=state, limit=100_000
            )
        ]
        started: list[str] = []
        if not rows or not self.stacks.instance:
            return started
        # Rows first, then containers: a sandbox that settles in between is skipped below
        # (its state no longer allows a repair).
        everything = await asyncio.to_thread(self.backend.states, self.stacks.instance)
        for row in rows:
            declared = (row.outputs or {}).get("containers")
            expected = [str(n) for n in declared.values()] if isinstance(declared, dict) else []
            if not expected:
                continue
            states = everything.get(row.id, {})
            if any(states.get(n) == "removing" for n in expected):
                continue  # Docker is still removing it: repair once it is gone (next pass)
            lost = sorted({str(states[n]).removeprefix(NODE_LOST) for n in expected
                           if str(states.get(n, "")).startswith(NODE_LOST)})  # fmt: skip
            if lost or row.state == SandboxState.LOST:
                if await self._lost_or_back(row, lost):
                    started.append(row.id)
                continue
            broken = [n for n in expected if states.get(n) not in HEALTHY]
            if not broken:
                continue
            what = ", ".join(f"{n} ({states.get(n, 'missing')})" for n in broken)
            if row.state == SandboxState.POOLED:
                if await self.pool.recycle(row.id, f"not as declared: {what}"):
                    started.append(row.id)
                continue
            claimed = await jobs.db(
                store.transition, row.id, SandboxState.REPAIRING, worker=jobs.worker
            )
            if claimed is None:
                continue  # destroyed, expired or being repaired meanwhile
            await jobs.event(row.id, "repair", f"not as declared: {what}; repairing")
            jobs.spawn(self._repair_job(row.id))
            started.append(row.id)
        return started

    async def _lost_or_back(self, row: SandboxRow, nodes: list[str]) -> bool:
        """A sandbox on a node that is down is shown ``lost`` (state, event and error naming
        the node), never started elsewhere: its volumes are on that node; so is one on a node
        the operator drained. Once the node is back (active), it is repaired there (started
        again with its volumes). True: a repair began."""
        jobs = self.jobs
        if nodes:
            if row.state == SandboxState.POOLED:
                return bool(await self.pool.recycle(row.id, f"node {', '.join(nodes)} lost"))
            if row.state != SandboxState.RUNNING:
                return False  # already lost
            drained = all(n.endswith(DRAINED) for n in nodes)
            names = ", ".join(n.removesuffix(DRAINED) for n in nodes)
            why = (
                f"node {names} drained: Swarm stopped the sandbox there;"
                if drained
                else f"node {names} lost: its Docker daemon does not answer the swarm;"
            ) + (
                " the sandbox's work is on that node. It starts there again when the node is"
                + (" active again" if drained else " back")
                + "; DELETE destroys it"
            )
            moved = await jobs.db(store.transition, row.id, SandboxState.LOST, error=why)
            if moved is not None:
                await jobs.event(row.id, "state", f"lost: {why}")
            return False
        claimed = await jobs.db(
            store.transition, row.id, SandboxState.REPAIRING, worker=jobs.worker
        )
        if claimed is None:
            return False
        await jobs.event(row.id, "repair", "its node is back; starting it there again")
        jobs.spawn(self._repair_job(row.id))
        return True

    async def _repair_job(self, sandbox_id: str) -> None:
        """Policy: recreate what is missing (refresh + up; volumes and files are kept), at
        most MAX_REPAIRS times in a sandbox's life; past that, or if the repair fails, the
        sandbox is failed (its resources stay until its TTL or a DELETE removes them)."""
        jobs = self.jobs
        repairs: int = await jobs.db(store.repairs_of, sandbox_id)
        if repairs > MAX_REPAIRS:
            await jobs.finish(
                sandbox_id,
                SandboxState.FAILED,
                error=f"changed behind the engine's back {repairs} times; not repaired again",
            )
            return
        try:
            outputs = await jobs.stack_op(
                self.stacks.repair, sandbox_id, progress=jobs.progress(sandbox_id)
            )
        except Exception as exc:
            if await jobs.left_for_recovery(sandbox_id, "repair", exc):
                return
            log.warning("repair of %s failed: %s", sandbox_id, exc)
            await jobs.finish(
                sandbox_id, SandboxState.FAILED, error=f"repair failed: {describe(exc)[:1900]}"
            )
            return
        row: SandboxRow | None = await jobs.db(store.get_sandbox, sandbox_id)
        if row is not None:
            try:  # a recreated workspace has new addresses and lost its managed settings
                template = jobs.template(row.template)
                await self.egress.apply(row, template, outputs)
                await self.claude.set_up(row, template, outputs, first=False)
            except Exception as exc:
                log.warning("sandbox %s: not set up again: %s", sandbox_id, exc)
        await jobs.finish(sandbox_id, SandboxState.RUNNING, outputs=outputs)

    # --- orphans -------------------------------------------------------------------------------

    async def _disks(self) -> list[str]:
        """The sandboxes this engine holds a disk for (none when disks are off)."""
        return await asyncio.to_thread(self.stacks.disks.listed)

    async def remount_disks(self) -> None:
        """After a reboot of the host: every disk of this engine mounted again before its
        containers are repaired (Docker cannot start them without their volumes' folders)."""
        if self.stacks.instance:
            try:
                await asyncio.to_thread(self.stacks.disks.remount)
            except Exception as exc:
                log.warning("could not mount the sandboxes' disks again: %s", exc)

    async def sweep_orphans(self) -> list[str]:
        """Destroy what this engine made but no live sandbox owns: ``sbx-*`` stacks with no
        row (and not in the stack reserve), and Docker objects labelled with this engine and a
        sandbox that has no row or is destroyed/expired. Stacks and objects are listed before
        rows: a row is written before its stack exists, so a sandbox being created is never
        taken for an orphan."""
        jobs = self.jobs
        if not self.stacks.instance:
            return []
        disks = await self._disks()
        names = [s.name for s in await asyncio.to_thread(self.stacks.list)]
        stack_ids = {n.removeprefix("sbx-") for n in names if not n.startswith("sbx-preview")}
        objects: dict[str, list[str]] = await asyncio.to_thread(
            self.backend.engine_objects, self.stacks.instance
        )
        for sid in disks:  # a disk is the last of a sandbox to go: nothing else of it left
            if sid not in objects and sid not in stack_ids:
                objects[sid] = ["disk"]
        ids = sorted(stack_ids | set(objects))
        if not ids:
            return []
        states: dict[str, str] = await jobs.db(store.states_of, ids)
        reserved = {sid for sid, _, _ in await jobs.db(store.reserve_entries)}
        orphans = [
            i
            for i in ids
            if i not in reserved
            and (
                states.get(i) in (None, "destroyed", "expired")
                # a failed create's disk, when its clean-up could not drop it
                or (states.get(i) == "failed" and objects.get(i) == ["disk"])
            )
        ]
        for sid in orphans:
            what = ([f"stack sbx-{sid}"] if sid in stack_ids else []) + objects.get(sid, [])
            log.warning("orphaned (reason orphaned): %s; destroying", ", ".join(what))
            try:
                await jobs.stack_op(self.stacks.recover, sid)
            except Exception as exc:
                log.warning("could not remove orphan %s: %s", sid, exc)
                continue
            if sid in states:
                await jobs.event(sid, "orphan", f"removed (reason orphaned): {', '.join(what)}")
        return orphans
