"""A sandbox's life after its create: more time, expiry warnings, the candidate's submit, and
the destroy — archived first when someone owns it, the stack destroyed, and what a failed
destroy leaves cleaned up directly."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from engine import store
from engine.backend import Backend
from engine.errors import ConflictError, EngineError, NotFoundError, describe
from engine.hiring import archives
from engine.model.templates import Archive, Template
from engine.sandboxes.creates import InvalidRequest
from engine.sandboxes.jobs import Jobs
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import DestroyReason, SandboxRow, SandboxState
from engine.units import format_duration, format_duration_short, parse_duration

log = logging.getLogger("sandbox_engine.service")


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        jobs: Jobs,
        stacks: StackManager,
        backend: Backend,
        archiver: archives.Archiver,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.stacks = stacks
        self.backend = backend
        self.archiver = archiver

    async def notify(self, row: SandboxRow, message: str) -> None:
        """Best effort: a line on the sandbox's terminals."""
        workspace = (row.outputs or {}).get("workspace")
        if workspace:
            await asyncio.to_thread(self.backend.notify, str(workspace), message)

    # --- destroy -------------------------------------------------------------------------------

    async def destroy(self, sandbox_id: str, reason: DestroyReason) -> SandboxRow:
        """Move the sandbox to ``destroying`` (ConflictError when its state does not allow
        it) and start its destroy."""

        def begin(conn: psycopg.Connection) -> SandboxRow:
            row = store.begin_destroy(conn, sandbox_id, reason, worker=self.jobs.worker)
            if row is None:
                raise ConflictError(f"sandbox {sandbox_id} cannot be destroyed in its state")
            return row

        row: SandboxRow = await self.jobs.db(begin)
        self.start_destroy(sandbox_id, reason)
        return row

    def start_destroy(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Start the destroy job of a sandbox already moved to ``destroying``."""
        self.jobs.spawn(self.destroy_job(sandbox_id, reason))

    async def destroy_job(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Archive, destroy the stack; when the destroy fails, clean up what is left directly
        (``StackManager.recover``: the stack's lock and pending steps dropped, the stack
        destroyed again, labelled objects removed). A destroy that ends with nothing of the
        sandbox left is ``destroyed`` (or ``expired``), whatever failed on the way; one the
        engine's stop cuts short stays ``destroying`` for recovery."""
        jobs = self.jobs
        await self.archive_before_destroy(sandbox_id, reason)
        try:
            await jobs.stack_op(self.stacks.destroy, sandbox_id, progress=jobs.progress(sandbox_id))
        except NotFoundError:
            pass  # no stack (a create that failed): nothing to destroy
        except Exception as exc:
            if await jobs.left_for_recovery(sandbox_id, "destroy", exc):
                return
            log.warning("destroy of %s failed: %s; cleaning up directly", sandbox_id, exc)
            await jobs.event(sandbox_id, "progress", f"{describe(exc)}; cleaning up directly")
            try:
                await jobs.stack_op(self.stacks.recover, sandbox_id)
            except Exception as cleanup:
                if await jobs.left_for_recovery(sandbox_id, "destroy", cleanup):
                    return
                left = await asyncio.to_thread(self.backend.objects, sandbox_id)
                if left:
                    error = (
                        f"destroy: {describe(exc)}; cleaning up after it failed too:"
                        f" {describe(cleanup)} ({', '.join(left)} left)"
                    )
                    await jobs.finish(sandbox_id, SandboxState.FAILED, error=error[:2000])
                    return
        final = SandboxState.EXPIRED if reason == DestroyReason.TTL else SandboxState.DESTROYED
        await jobs.finish(sandbox_id, final)

    async def archive_before_destroy(self, sandbox_id: str, reason: DestroyReason) -> None:
        """Archive the workspace of a sandbox someone owns before its stack goes (the state
        stays ``destroying``); bounded (engine/hiring/archives.py), and never stops the
        destroy."""
        why = archives.REASONS.get(reason)
        row: SandboxRow | None = await self.jobs.db(store.get_sandbox, sandbox_id)
        if why is None or row is None or row.owner_id is None:
            return
        try:
            await self.archiver.archive(row, why, self._archive_spec(row.template))
        except Exception:
            log.exception("archive of %s before its destroy", sandbox_id)

    def _archive_spec(self, template: str) -> Archive:
        """The template's archive section; the defaults when the template is gone meanwhile."""
        try:
            return self.jobs.template(template).archive
        except EngineError:
            return Archive()

    # --- more time, and its end ------------------------------------------------------------

    async def extend(self, row: SandboxRow, ttl: str) -> SandboxRow:
        template = self.jobs.template(row.template)
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
            updated = store.extend(conn, row.id, expires_at=expires)
            if updated is None:
                raise ConflictError(f"sandbox {row.id} is not live")
            store.add_event(conn, row.id, "extended", f"expires {expires:%Y-%m-%dT%H:%M:%SZ}")
            return updated

        result: SandboxRow = await self.jobs.db(apply)
        if result.state == SandboxState.RUNNING:
            await self.notify(result, f"Sandbox extended: it now expires at {expires:%H:%M:%S} UTC")
        return result

    async def warn_expiring(self, now: datetime, before: timedelta) -> list[str]:
        """Warn running sandboxes that expire within ``before``: an ``expiry_warning`` event
        and a message on every terminal attached to the workspace's tmux. Each warning is
        claimed in the database, so of several engine processes one sends it."""
        rows: list[SandboxRow] = await self.jobs.db(store.claim_warnings, now=now, before=before)
        for row in rows:
            left = max(0, int((row.expires_at - now).total_seconds()))
            text = (
                f"Sandbox expires at {row.expires_at:%H:%M:%S} UTC"
                f" (in {format_duration_short(left)}): save your work"
            )
            await self.jobs.event(row.id, "expiry_warning", text)
            await self.notify(row, text)
        return [r.id for r in rows]

    # --- the candidate's submit --------------------------------------------------------------

    async def submit(self, sandbox_id: str, *, by: str) -> dict[str, Any]:
        """The candidate hands in: archive now (reason submitted), an event, a line on the
        workspace's terminals, then a destroy when the template's ``submit.destroy`` says so.
        Returns {archive, destroyed}. Once per sandbox: a second submit, even at the same
        time, waits for the first one's report and returns it."""
        jobs = self.jobs
        if not await jobs.db(archives.claim_submit, sandbox_id, by=by):
            return await self._submit_report(sandbox_id)
        try:
            row: SandboxRow = await jobs.db(store.get_sandbox, sandbox_id)
            try:
                template: Template | None = jobs.template(row.template)
            except EngineError:
                template = None
            spec = template.archive if template else Archive()
            made = await self.archiver.archive(row, "submitted", spec)
            await jobs.event(sandbox_id, "submit", f"submitted by {by}")
            destroy = bool(template and template.submit.destroy)
            if destroy:
                destroy = await self._destroy_submitted(sandbox_id)
            report = {"archive": made.public(), "destroyed": destroy}
            await jobs.db(archives.finish_submit, sandbox_id, report)
        except BaseException:
            await jobs.db(archives.drop_submit, sandbox_id)
            raise
        text = (
            f"Submitted: {made.files} files archived"
            if made.error is None
            else f"Submitted, but the archive failed: {made.error}"
        ) + ("; the workspace is being removed" if destroy else "")
        await self.notify(row, text)
        return report

    async def _submit_report(self, sandbox_id: str) -> dict[str, Any]:
        """The report of the submit another call started (waited for while it archives)."""
        deadline = time.monotonic() + self.settings.archive_timeout + archives.DOCKER_TIMEOUT * 2
        while True:
            claimed, report = await self.jobs.db(archives.submit_report, sandbox_id)
            if report is not None:
                return dict(report)
            if not claimed or time.monotonic() > deadline:
                raise ConflictError(f"the submit of sandbox {sandbox_id} did not finish; retry")
            await asyncio.sleep(0.5)

    async def _destroy_submitted(self, sandbox_id: str) -> bool:
        """Start the destroy a template's ``submit.destroy`` asks for (reason submitted: the
        destroy does not archive again); False when the sandbox is no longer running."""
        try:
            await self.destroy(sandbox_id, DestroyReason.SUBMITTED)
        except ConflictError:
            return False
        return True
