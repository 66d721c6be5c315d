"""The stack manager: sandbox stacks over the Automation API.

One stack per sandbox (``sbx-<id>``) in the project at ``settings.project_dir``. Operations on
one stack never overlap (a lock per stack); a semaphore caps concurrent operations; the
workspace files Pulumi rewrites on stack selection are guarded by one lock (pulumi#8186).
Calls block: async callers run them with ``asyncio.to_thread``. Pulumi's errors are mapped
here, once, into the engine's exception tree.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from pulumi import automation as auto

from engine.errors import ConflictError, NotFoundError, StackError
from engine.settings import Settings
from engine.spec import (
    CLAUDE_AUTH_VOLUME,
    L_ENGINE,
    L_MANAGED,
    L_SANDBOX,
    MANAGED_BY,
    stack_name,
)
from engine.templates import Template
from engine.toolenv import pulumi_command, workspace_options

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Change:
    """One resource in a preview: what would happen to it and which properties differ."""

    op: str  # create | update | replace | delete | same | …
    type: str
    name: str
    properties: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preview:
    changes: tuple[Change, ...]
    summary: dict[str, int] = field(default_factory=dict)


class StackManager:
    def __init__(self, settings: Settings, *, backend_url: str | None = None) -> None:
        self.settings = settings
        self.backend_url = backend_url
        self._command = pulumi_command(settings)
        self._select_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.max_stack_operations)
        settings.stack_config_path.mkdir(parents=True, exist_ok=True)
        # The engine instance id (engine_instance.id), labelled on every object; set by the
        # service once it has the database. Empty: objects carry no engine label (previews).
        self.instance = ""

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

    def _configure(
        self,
        stack: auto.Stack,
        template: Template,
        sandbox_id: str,
        owner: str,
        templates_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        config = {
            "sandbox:id": auto.ConfigValue(sandbox_id),
            "sandbox:template": auto.ConfigValue(template.name),
            "sandbox:owner": auto.ConfigValue(owner),
            "sandbox:templatesDir": auto.ConfigValue(str(templates_dir.resolve())),
            "sandbox:domain": auto.ConfigValue(self.settings.domain),
            "sandbox:entrypoint": auto.ConfigValue(self.settings.entrypoint),
            "sandbox:tlsResolver": auto.ConfigValue(self.settings.tls_resolver),
            "sandbox:edgeNetwork": auto.ConfigValue(self.settings.edge_network),
            "sandbox:publicPort": auto.ConfigValue(str(self.settings.public_port)),
        }
        if self.instance:
            config["sandbox:engine"] = auto.ConfigValue(self.instance)
        if "postgres" in template.services:
            config["sandbox:servicePassword"] = auto.ConfigValue(
                secrets.token_urlsafe(18), secret=True
            )
        if env:
            # Request env may carry credentials (an Anthropic key): a stack secret.
            config["sandbox:env"] = auto.ConfigValue(json.dumps(env), secret=True)
        stack.set_all_config(config)

    @staticmethod
    def _progress(progress: Progress | None) -> Callable[[auto.EngineEvent], None] | None:
        if progress is None:
            return None

        def on_event(event: auto.EngineEvent) -> None:
            if event.resource_pre_event and event.resource_pre_event.metadata:
                m = event.resource_pre_event.metadata
                if m.type != "pulumi:pulumi:Stack" and m.op.value != "same":
                    progress(f"{m.op.value} {m.type} {m.urn.rsplit('::', 1)[-1]}")
            elif event.res_outputs_event and event.res_outputs_event.metadata:
                m = event.res_outputs_event.metadata
                if m.type != "pulumi:pulumi:Stack" and m.op.value != "same":
                    progress(f"done {m.op.value} {m.type} {m.urn.rsplit('::', 1)[-1]}")
            elif event.res_op_failed_event:
                progress("failed: a resource operation failed")

        return on_event

    def _ensure_shared_volume(self) -> None:
        """claude-auth outlives every sandbox: made once, never part of a stack."""
        client = docker.from_env(timeout=30)
        try:
            client.volumes.get(CLAUDE_AUTH_VOLUME)
        except docker.errors.NotFound:
            client.volumes.create(
                CLAUDE_AUTH_VOLUME,
                labels={L_MANAGED: MANAGED_BY, "io.sandbox-engine.shared": "true"},
            )
        finally:
            client.close()

    # --- operations ------------------------------------------------------------------------

    def create(
        self,
        template: Template,
        templates_dir: Path,
        *,
        sandbox_id: str | None = None,
        owner: str = "cli",
        env: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Create the stack and bring the sandbox up; on failure, tear down what was made."""
        sandbox_id = sandbox_id or secrets.token_hex(5)
        name = stack_name(sandbox_id)
        with self._operation(name):
            stack = self._stack(name, create=True)
            try:
                self._configure(stack, template, sandbox_id, owner, templates_dir, env)
                if template.claude_auth:
                    self._ensure_shared_volume()
                if any(e.public for e in template.expose):
                    ensure_edge_network(self.settings.edge_network)
                up = stack.up(on_event=self._progress(progress))
            except auto.CommandError as exc:
                self._teardown(stack)
                raise StackError(_summarize(exc)) from exc
            except BaseException:
                self._teardown(stack)
                raise
            return {k: v.value for k, v in up.outputs.items()}

    def _teardown(self, stack: auto.Stack) -> None:
        try:
            stack.destroy()
        finally:
            stack.workspace.remove_stack(stack.name, force=True)

    def preview_template(self, template: Template, templates_dir: Path) -> Preview:
        """What a new sandbox of this template would create; nothing is created."""
        name = stack_name(f"preview{secrets.token_hex(3)}")
        with self._operation(name):
            stack = self._stack(name, create=True)
            try:
                self._configure(
                    stack, template, name.removeprefix("sbx-"), "preview", templates_dir
                )
                return self._preview(stack)
            finally:
                stack.workspace.remove_stack(name, force=True)

    def preview(self, sandbox_id: str) -> Preview:
        name = stack_name(sandbox_id)
        with self._operation(name):
            return self._preview(self._stack(name, create=False))

    def _preview(self, stack: auto.Stack) -> Preview:
        changes: list[Change] = []

        def on_event(event: auto.EngineEvent) -> None:
            pre = event.resource_pre_event
            if pre and pre.metadata and pre.metadata.type != "pulumi:pulumi:Stack":
                m = pre.metadata
                props = tuple(sorted((m.detailed_diff or {}).keys() or (m.diffs or [])))
                changes.append(Change(m.op.value, m.type, m.urn.rsplit("::", 1)[-1], props))

        try:
            result = stack.preview(on_event=on_event)
        except auto.CommandError as exc:
            raise StackError(_summarize(exc)) from exc
        return Preview(tuple(changes), _counts(result.change_summary))

    def destroy(self, sandbox_id: str, *, progress: Progress | None = None) -> None:
        """Destroy every resource of the sandbox, then remove its stack. Idempotent."""
        name = stack_name(sandbox_id)
        with self._operation(name):
            stack = self._stack(name, create=False)
            try:
                stack.destroy(on_event=self._progress(progress))
            except auto.CommandError as exc:
                raise StackError(_summarize(exc)) from exc
            stack.workspace.remove_stack(name)
            (self.settings.stack_config_path / f"Pulumi.{name}.yaml").unlink(missing_ok=True)

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
            remove_labelled(sandbox_id, containers_only=True)
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
                except auto.CommandError as exc:
                    raise StackError(_summarize(exc)) from exc
                stack.workspace.remove_stack(name, force=True)
                (self.settings.stack_config_path / f"Pulumi.{name}.yaml").unlink(missing_ok=True)
        remove_labelled(sandbox_id)

    def repair(self, sandbox_id: str, *, progress: Progress | None = None) -> dict[str, Any]:
        """Bring a sandbox changed behind the engine's back (a container removed or stopped by
        hand) back to its declared state: refresh, so the state sees what is gone, then up,
        which recreates it. Volumes are untouched: the workspace's files survive."""
        name = stack_name(sandbox_id)
        with self._operation(name):
            stack = self._stack(name, create=False)
            try:
                stack.refresh(on_event=self._progress(progress))
                up = stack.up(on_event=self._progress(progress))
            except auto.CommandError as exc:
                raise StackError(_summarize(exc)) from exc
            return {k: v.value for k, v in up.outputs.items()}

    def refresh(self, sandbox_id: str) -> dict[str, int]:
        name = stack_name(sandbox_id)
        with self._operation(name):
            result = self._stack(name, create=False).refresh()
            return _counts(result.summary.resource_changes or {})

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


def remove_labelled(sandbox_id: str, *, containers_only: bool = False) -> list[str]:
    """Remove every container, network and volume labelled with this sandbox (in that order:
    what uses an object goes first). Returns what was removed."""
    selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
    removed: list[str] = []
    client = docker.from_env(timeout=60)
    try:
        for container in client.containers.list(all=True, filters=selector):
            container.remove(force=True, v=True)
            removed.append(f"container {container.name}")
        if containers_only:
            return removed
        for network in client.networks.list(filters=selector):
            network.remove()
            removed.append(f"network {network.name}")
        for volume in client.volumes.list(filters=selector):
            volume.remove(force=True)
            removed.append(f"volume {volume.name}")
    finally:
        client.close()
    return removed


def ensure_edge_network(name: str) -> None:
    """The shared network Traefik reaches published workspaces on; made once, never part of a
    stack. Inter-container communication is off on it: a workspace on it reaches no other
    workspace (Traefik, on the host or in the host's network namespace, reaches them all)."""
    client = docker.from_env(timeout=30)
    try:
        try:
            network = client.networks.get(name)
        except docker.errors.NotFound:
            # Two creates racing to make it: the loser's 409 is fine, the network exists.
            with contextlib.suppress(docker.errors.APIError):
                client.networks.create(
                    name,
                    driver="bridge",
                    options={"com.docker.network.bridge.enable_icc": "false"},
                    labels={L_MANAGED: MANAGED_BY, "io.sandbox-engine.shared": "true"},
                    check_duplicate=True,
                )
            network = client.networks.get(name)
        icc = (network.attrs.get("Options") or {}).get("com.docker.network.bridge.enable_icc")
        if icc != "false":
            raise StackError(
                f"network {name} exists with inter-container traffic on; remove it "
                "(docker network rm) so the engine can make it isolated"
            )
    finally:
        client.close()


def engine_objects(instance: str) -> dict[str, list[str]]:
    """Every container, network and volume labelled with this engine instance, by sandbox."""
    found: dict[str, list[str]] = {}
    selector = {"label": [f"{L_ENGINE}={instance}", L_SANDBOX]}
    client = docker.from_env(timeout=60)
    try:
        for kind, items in (
            ("container", client.containers.list(all=True, filters=selector)),
            ("network", client.networks.list(filters=selector)),
            ("volume", client.volumes.list(filters=selector)),
        ):
            for item in items:
                labels = item.attrs.get("Labels") or item.attrs.get("Config", {}).get("Labels")
                sid = (labels or {}).get(L_SANDBOX)
                if sid:
                    found.setdefault(sid, []).append(f"{kind} {item.name}")
    finally:
        client.close()
    return found


def container_states(sandbox_id: str) -> dict[str, str]:
    """Name → Docker status (running, exited, restarting, …) of the sandbox's containers."""
    client = docker.from_env(timeout=30)
    try:
        return {
            c.name: c.status
            for c in client.containers.list(
                all=True, filters={"label": f"{L_SANDBOX}={sandbox_id}"}
            )
        }
    finally:
        client.close()


def _counts(summary: Any) -> dict[str, int]:
    """Pulumi's change summaries are keyed by OpType; plain strings travel better."""
    return {getattr(op, "value", str(op)): int(n) for op, n in summary.items()}


def _summarize(exc: auto.CommandError) -> str:
    """The error lines of a failed Pulumi run, without its full log (and so without config)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    return "\n".join(dict.fromkeys(lines)) or text.strip().splitlines()[-1]
