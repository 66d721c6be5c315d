"""What the parts of the sandbox service share: the database, the stack threads, background
jobs and their stop, events, and a sandbox's moves to its end states.

Requests change rows and return at once; the stack work runs as background jobs (one task per
operation, the blocking Pulumi calls on threads of their own). Every state change and every
progress line is an event of the sandbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from engine import store, workers
from engine.ai import store as ai_store
from engine.errors import Interrupted
from engine.model.templates import Template, find
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import SandboxState

log = logging.getLogger("sandbox_engine.service")

# Seconds a finished stack operation keeps trying to record its result in the database.
FINISH_RETRY = 300.0
# Seconds a stop waits for jobs once their Pulumi runs were cut short, and again once the jobs
# themselves were cancelled.
STOP_SETTLE = 15.0

Write = Callable[[str, str, str], Awaitable[None]]


class Emitter:
    """Events a worker thread emits (progress lines, a task's output), written in the order
    they were emitted: each waits for the one before it, without holding up the thread.
    ``write(sandbox_id, kind, line)`` writes one."""

    def __init__(
        self, write: Write, sandbox_id: str, kind: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._write_one, self._sandbox_id, self._kind, self._loop = write, sandbox_id, kind, loop
        self._last: concurrent.futures.Future[None] | None = None

    def __call__(self, line: str) -> None:
        self._last = asyncio.run_coroutine_threadsafe(self._write(self._last, line), self._loop)

    async def _write(self, before: concurrent.futures.Future[None] | None, line: str) -> None:
        if before is not None:
            with contextlib.suppress(Exception):  # one lost line does not stop the rest
                await asyncio.wrap_future(before)
        await self._write_one(self._sandbox_id, self._kind, line)

    async def written(self) -> None:
        """Wait until every line emitted so far is written (or failed to be)."""
        if self._last is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._last)


class Jobs:
    """The database, the stack threads and the background jobs of one engine process."""

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        stacks: StackManager,
        lease: workers.WorkerLease,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.stacks = stacks
        self.lease = lease
        self._jobs: set[asyncio.Task[None]] = set()
        self._stack_threads = ThreadPoolExecutor(
            max_workers=settings.max_stack_operations, thread_name_prefix="stack"
        )

    def template(self, name: str) -> Template:
        """A template of the templates folder by name (NotFoundError, TemplateError)."""
        return find(self.settings.templates_path, name)

    @property
    def worker(self) -> str:
        """This process's worker id (its lease), recorded on the sandboxes it works on."""
        return self.lease.id

    # --- the database ------------------------------------------------------------------------

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a repository function in one transaction, off the event loop."""

        def run() -> Any:
            with self.pool.connection() as conn:  # commits on success, rolls back on error
                return fn(conn, *args, **kwargs)

        return await asyncio.to_thread(run)

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

    async def event(self, sandbox_id: str, kind: str, message: str) -> None:
        await self.db(store.add_event, sandbox_id, kind, message)

    def progress(self, sandbox_id: str, kind: str = "progress") -> Emitter:
        """A sink for a worker thread's lines (a stack operation's steps, a task's output)."""
        return Emitter(self.event, sandbox_id, kind, asyncio.get_running_loop())

    # --- end states --------------------------------------------------------------------------

    async def finish(
        self,
        sandbox_id: str,
        state: SandboxState,
        *,
        outputs: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Move the sandbox to ``state`` with its event (a move its state does not allow is
        recorded and changes nothing). Kept trying through a database restart: the stack work
        is done and cannot be asked again, or the row would stay mid-operation."""

        def apply(conn: psycopg.Connection) -> None:
            row = store.transition(conn, sandbox_id, state, outputs=outputs, error=error)
            if row is None:  # not a legal step from the row's state: record, change nothing
                store.add_event(conn, sandbox_id, "progress", f"ignored transition to {state}")
                return
            store.add_event(
                conn, sandbox_id, "state", state.value + (f": {error}" if error else "")
            )

        await self.db_through_restarts(apply, what=f"recording {sandbox_id} as {state.value}")

    async def force(self, sandbox_id: str, state: SandboxState, error: str) -> None:
        """Settle a sandbox recovery removed everything of: ``state`` as of now, whatever its
        state was."""

        def apply(conn: psycopg.Connection) -> None:
            conn.execute(
                "UPDATE sandboxes SET state = %s, error = %s, destroyed_at = now() WHERE id = %s",
                (state.value, error, sandbox_id),
            )
            ai_store.revoke(conn, sandbox_id)
            store.add_event(conn, sandbox_id, "state", f"{state.value}: {error}")

        await self.db(apply)

    # --- stack operations and jobs -----------------------------------------------------------

    async def stack_op(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
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

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def drain(self) -> None:
        """Wait for running jobs: a stack operation is never cut in half."""
        if self._jobs:
            await asyncio.wait(self._jobs)

    # --- stopping ----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stacks.stopping

    def begin_stop(self) -> None:
        """The engine got its stop signal (or its lifespan ends): no new stack operation
        starts, and one cut short from now on is left for recovery. Safe from a signal
        handler (it only sets a flag)."""
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

    def _close_stacks(self) -> None:
        self._stack_threads.shutdown(wait=True)
        self.stacks.close()

    async def left_for_recovery(self, sandbox_id: str, operation: str, exc: Exception) -> bool:
        """Whether a failed step was the engine's stop cutting it short; if so the sandbox is
        left as it is (mid-operation) for recovery, with an event saying so."""
        if not isinstance(exc, Interrupted) and not self.stopping:
            return False
        log.info("%s of %s left for recovery: %s", operation, sandbox_id, exc)
        with contextlib.suppress(Exception):  # the database may be going too: recovery tells
            await self.event(
                sandbox_id,
                "progress",
                f"the engine is stopping: the interrupted {operation} is settled at its next start",
            )
        return True
