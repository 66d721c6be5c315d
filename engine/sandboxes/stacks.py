"""The stack manager: sandbox stacks over the Automation API.

One stack per sandbox (``sbx-<id>``) in the project at ``settings.project_dir``. Operations on
one stack never overlap (a lock per stack); a semaphore caps concurrent operations; the
workspace files Pulumi rewrites on stack selection are guarded by one lock (pulumi#8186).
Calls block: async callers run them with ``asyncio.to_thread``. Pulumi's errors are mapped
here, once, into the engine's exception tree.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pulumi import automation as auto

from engine.backend import Backend, BackendError, backend_for
from engine.errors import ConflictError, Interrupted, NotFoundError, StackError
from engine.host.disks import SandboxDisks
from engine.host.toolenv import pulumi_command, workspace_options
from engine.model.spec import stack_name
from engine.model.templates import Template
from engine.sandboxes.previews import Preview, preview_of
from engine.sandboxes.pulumi_cli import PulumiInterrupted, describe_command_error
from engine.sandboxes.runs import (
    Progress,
    PulumiRuns,
    SharedProvider,
    counts,
    progress_events,
    stack_outputs,
)
from engine.sandboxes.stack_config import StackConfig
from engine.settings import Settings

log = logging.getLogger("sandbox_engine.stacks")


class StackManager:
    def __init__(
        self,
        settings: Settings,
        *,
        backend_url: str | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.backend_url = backend_url
        # What Pulumi does not do (a clean-up of labelled objects, the edge network).
        self.backend = backend or backend_for(settings)
        self._command = pulumi_command(settings)
        self._select_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.max_stack_operations)
        # The engine instance id (engine_instance.id), labelled on every object; set by the
        # service once it has the database. Empty: objects carry no engine label (previews).
        self.instance = ""
        self._provider: SharedProvider | None = None
        if settings.shared_provider:
            self._provider = SharedProvider()
            # Stopped with this manager, even one never closed (at collection or exit).
            weakref.finalize(self, self._provider.stop)
        self.runs = PulumiRuns(
            settings, self._command, backend_url=backend_url, provider=self._provider
        )
        # Every sandbox's own disk (SANDBOX_DISKS): made before its stack, dropped after it;
        # the stack's config says where it is (a preview's too: where it would be).
        self.disks = SandboxDisks(settings, lambda: self.instance)
        self.config = StackConfig(
            settings, self.runs, disk_of=self.disks.path, host_address=self.backend.host_address
        )

    def _cli(self, args: list[str], **kwargs: Any) -> None:
        self.runs.run(args, **kwargs)

    def close(self) -> None:
        """Stop the shared provider (it also stops by itself when this process ends)."""
        if self._provider is not None:
            self._provider.stop()

    # --- the engine's stop -------------------------------------------------------------------

    def begin_stop(self) -> None:
        """The engine is stopping: no new Pulumi run starts, and one that ends badly from now
        on was interrupted (``Interrupted``), not failed."""
        self._command.begin_stop()

    @property
    def stopping(self) -> bool:
        return self._command.stopping

    def running(self) -> int:
        """Pulumi runs going on now."""
        return self._command.running()

    def terminate_runs(self) -> int:
        """Cut every Pulumi run still going short (the stop's time is up); how many there were."""
        return self._command.terminate_all()

    # --- plumbing --------------------------------------------------------------------------

    @contextmanager
    def _operation(self, stack: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(stack, threading.Lock())
        if not lock.acquire(blocking=False):
            raise ConflictError(f"an operation on {stack} is already running")
        try:
            with self._slots:
                yield
        finally:
            lock.release()

    def _options(self) -> auto.LocalWorkspaceOptions:
        return workspace_options(
            self.settings,
            work_dir=self.settings.project_dir,
            command=self._command,
            backend_url=self.backend_url,
        )

    def _stack(self, name: str, *, create: bool) -> auto.Stack:
        with self._select_lock:
            try:
                if create:
                    return auto.create_stack(
                        name, work_dir=str(self.settings.project_dir), opts=self._options()
                    )
                return auto.select_stack(
                    name, work_dir=str(self.settings.project_dir), opts=self._options()
                )
            except auto.StackNotFoundError as exc:
                raise NotFoundError(f"no sandbox stack {name}") from exc
            except auto.StackAlreadyExistsError as exc:
                raise ConflictError(f"stack {name} already exists") from exc

    # --- direct CLI runs (the create and destroy path) ---------------------------------------

    def _init_stack(self, name: str) -> None:
        """``pulumi stack init``: the empty stack, and its config file holding the salt of its
        secrets key."""
        try:
            self._cli(["stack", "init", "--no-select", name])
        except auto.StackAlreadyExistsError as exc:
            raise ConflictError(f"stack {name} already exists") from exc
        except PulumiInterrupted as exc:
            raise Interrupted(str(exc)) from exc
        except auto.CommandError as exc:  # e.g. the state backend's disk is full
            raise StackError(f"pulumi stack init: {_summarize(exc)}") from exc

    def reserve(self, sandbox_id: str) -> None:
        """Initialise the empty stack of a future sandbox (the stack reserve): a cold create
        that takes it skips ``stack init``, a CLI run and a key derivation."""
        name = stack_name(sandbox_id)
        with self._operation(name):
            self._init_stack(name)

    def _remove_stack(self, name: str) -> None:
        """Destroy whatever the stack holds, then remove the stack and its config file (one
        run: ``destroy --remove``). When the destroy fails the stack is removed anyway
        (``--force``) and the error raised: the caller decides what is left to clean."""
        try:
            self.backend.unpublish(name.removeprefix("sbx-"))
            self._cli(
                ["destroy", "--yes", "--skip-preview", "--remove", "--stack", name], inline=True
            )
        except auto.StackNotFoundError:
            pass
        except BaseException:
            with contextlib.suppress(auto.CommandError):
                self._cli(["stack", "rm", "--yes", "--force", "--stack", name])
            raise
        finally:
            self.config.path(name).unlink(missing_ok=True)
        self._dropped(name.removeprefix("sbx-"))

    def _dropped(self, sandbox_id: str) -> None:
        """Once its stack is gone: its disk (nothing uses it now), what a swarm's nodes hold."""
        self.disks.drop(sandbox_id)
        self.backend.forget(sandbox_id)

    def create(
        self,
        template: Template,
        templates_dir: Path,
        *,
        sandbox_id: str | None = None,
        owner: str = "cli",
        env: dict[str, str] | None = None,
        progress: Progress | None = None,
        reserved: bool = False,
    ) -> dict[str, Any]:
        """Create the stack (``reserved``: it was initialised ahead, see ``reserve``) and
        bring the sandbox up; on failure, tear down what was made.

        Three CLI runs at most (``stack init`` unless reserved, ``config set-all`` only for
        secrets, ``up`` with the program inline); the outputs come from the update's events.
        """
        sandbox_id = sandbox_id or secrets.token_hex(5)
        name = stack_name(sandbox_id)
        with self._operation(name):
            if not reserved:
                self._init_stack(name)
            events: list[auto.EngineEvent] = []
            try:
                self.disks.make(template, sandbox_id, progress)
                self.config.write(
                    name,
                    self.config.values(
                        template, sandbox_id, owner, templates_dir, self.instance, env
                    ),
                )
                published = any(e.public for e in template.expose)
                if published:
                    self.backend.prepare_edge(self.settings.edge_network, self.settings.edge_subnet)
                self._cli(
                    ["up", "--yes", "--skip-preview", "--stack", name],
                    inline=True,
                    progress=progress,
                    events=events,
                )
                outputs = stack_outputs(events)
                if published:
                    self.backend.publish(str(outputs.get("network") or ""))
            except PulumiInterrupted as exc:
                # The engine is stopping: no teardown now (another Pulumi run); the sandbox
                # stays "creating" and the next start's recovery cleans it up.
                raise Interrupted(str(exc)) from exc
            except auto.CommandError as exc:
                self._remove_stack(name)
                raise StackError(_summarize(exc)) from exc
            except BackendError as exc:  # the engine's own Docker calls (the edge network)
                self._remove_stack(name)
                raise StackError(str(exc)) from exc
            except BaseException:
                self._remove_stack(name)
                raise
            return outputs

    def preview_template(self, template: Template, templates_dir: Path) -> Preview:
        """What a new sandbox of this template would create; nothing is created."""
        sid = f"preview{secrets.token_hex(3)}"
        name = stack_name(sid)
        with self._operation(name):
            stack = self._stack(name, create=True)
            try:
                stack.set_all_config(
                    self.config.values(template, sid, "preview", templates_dir, self.instance)
                )
                return preview_of(stack)
            finally:
                stack.workspace.remove_stack(name, force=True)

    def preview(self, sandbox_id: str) -> Preview:
        name = stack_name(sandbox_id)
        with self._operation(name):
            return preview_of(self._stack(name, create=False))

    def destroy(self, sandbox_id: str, *, progress: Progress | None = None) -> None:
        """Destroy every resource of the sandbox, then remove its stack (one CLI run)."""
        name = stack_name(sandbox_id)
        with self._operation(name):
            try:
                self.backend.unpublish(sandbox_id)
                self._cli(
                    ["destroy", "--yes", "--skip-preview", "--remove", "--stack", name],
                    inline=True,
                    progress=progress,
                )
            except auto.StackNotFoundError as exc:
                raise NotFoundError(f"no sandbox stack {name}") from exc
            except PulumiInterrupted as exc:
                raise Interrupted(str(exc)) from exc
            except auto.CommandError as exc:
                raise StackError(f"pulumi destroy: {_summarize(exc)}") from exc
            self.config.path(name).unlink(missing_ok=True)
            self._dropped(sandbox_id)

    def recover(self, sandbox_id: str) -> None:
        """Tear down a sandbox whose engine died mid-operation.

        The stack may hold a lock and pending operations (resources being created when the
        process was killed, absent from the state): the lock is cancelled, the pending
        operations are dropped from the state, the stack is destroyed and removed, and any
        Docker object still labelled with the sandbox is removed directly.
        """
        name = stack_name(sandbox_id)
        with self._operation(name):
            # Containers first: one created but not yet recorded would keep the network and
            # volumes busy. The provider counts the recorded ones, now gone, as deleted.
            self.backend.remove(sandbox_id, containers_only=True)
            self.backend.unpublish(sandbox_id)
            try:
                stack = self._stack(name, create=False)
            except NotFoundError:
                stack = None
            if stack is not None:
                with contextlib.suppress(auto.CommandError):
                    stack.cancel()  # DIY backends: removes the dead process's lock
                exported = stack.export_stack()
                state = dict(exported.deployment or {})
                if state.get("pending_operations"):
                    state["pending_operations"] = []
                    stack.import_stack(auto.Deployment(version=exported.version, deployment=state))
                try:
                    stack.destroy()
                except PulumiInterrupted as exc:
                    raise Interrupted(str(exc)) from exc
                except auto.CommandError as exc:
                    raise StackError(f"pulumi destroy: {_summarize(exc)}") from exc
                stack.workspace.remove_stack(name, force=True)
                self.config.path(name).unlink(missing_ok=True)
        self.backend.remove(sandbox_id)
        self.disks.drop(sandbox_id)

    def repair(self, sandbox_id: str, *, progress: Progress | None = None) -> dict[str, Any]:
        """Bring a sandbox changed behind the engine's back (a container removed or stopped by
        hand) back to its declared state: refresh, so the state sees what is gone, then up,
        which recreates it. Volumes are untouched: the workspace's files survive."""
        name = stack_name(sandbox_id)
        with self._operation(name):
            stack = self._stack(name, create=False)
            self.config.ask_restart(name)
            try:
                stack.refresh(on_event=progress_events(progress))
                up = stack.up(on_event=progress_events(progress))
            except auto.CommandError as exc:
                raise StackError(_summarize(exc)) from exc
            outputs = {k: v.value for k, v in up.outputs.items()}
            if any(e.get("public") for e in outputs.get("endpoints") or []):
                try:  # a network made anew is joined again
                    self.backend.publish(str(outputs.get("network") or ""))
                except BackendError as exc:
                    raise StackError(str(exc)) from exc
            return outputs

    def refresh(self, sandbox_id: str) -> dict[str, int]:
        name = stack_name(sandbox_id)
        with self._operation(name):
            result = self._stack(name, create=False).refresh()
            return counts(result.summary.resource_changes or {})

    def outputs(self, sandbox_id: str) -> dict[str, Any]:
        stack = self._stack(stack_name(sandbox_id), create=False)
        return {k: v.value for k, v in stack.outputs().items() if not v.secret}

    def list(self) -> list[auto.StackSummary]:
        """Every sandbox stack in the backend."""
        opts = self._options()
        with self._select_lock:
            ws = auto.LocalWorkspace(
                work_dir=opts.work_dir, pulumi_command=opts.pulumi_command, env_vars=opts.env_vars
            )
        return [s for s in ws.list_stacks() if s.name.startswith("sbx-")]


def _summarize(exc: auto.CommandError) -> str:
    """The error lines of a failed Pulumi run, without its full log (and so without config);
    how it ended when it printed none."""
    return describe_command_error(exc)
