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
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import grpc
import yaml
from pulumi import automation as auto

# The Automation API's in-process language runtime (the server behind its inline programs).
# Private to the SDK, which is pinned (pyproject.toml); tests/test_automation.py runs it.
from pulumi.automation._server import LanguageServer
from pulumi.runtime.proto import language_pb2_grpc

from engine.errors import ConflictError, Interrupted, NotFoundError, StackError
from engine.pulumi_cli import PulumiInterrupted, describe_command_error
from engine.settings import Settings
from engine.spec import (
    BRIDGE_NAME_OPTION,
    L_ENGINE,
    L_MANAGED,
    L_SANDBOX,
    MANAGED_BY,
    bridge_name,
    stack_name,
)
from engine.templates import Template
from engine.toolenv import pulumi_command, pulumi_env, workspace_options
from stacks.program import program
from stacks.provider.server import PARENT_ENV as PROVIDER_PARENT_ENV

Progress = Callable[[str], None]

log = logging.getLogger("sandbox_engine.stacks")


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
        self._provider: SharedProvider | None = None
        if settings.shared_provider:
            self._provider = SharedProvider()
            # Stopped with this manager, even one never closed (at collection or exit).
            weakref.finalize(self, self._provider.stop)

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

    def _config(
        self,
        template: Template,
        sandbox_id: str,
        owner: str,
        templates_dir: Path,
        env: dict[str, str] | None = None,
    ) -> dict[str, auto.ConfigValue]:
        """The stack's config: the template and the request, which the program turns into the
        sandbox's spec."""
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
        return config

    # --- direct CLI runs (the create and destroy path) ---------------------------------------

    def _config_file(self, name: str) -> Path:
        return self.settings.stack_config_path / f"Pulumi.{name}.yaml"

    def _cli(
        self,
        args: list[str],
        *,
        inline: bool = False,
        progress: Progress | None = None,
        events: list[auto.EngineEvent] | None = None,
    ) -> None:
        """One ``pulumi`` run in the project folder, with the engine's environment.

        ``inline``: the program runs inside this process (the Automation API's language
        runtime serves it), so no language host, interpreter or plugin scan starts. Engine
        events are read from an event log as they are written: ``progress`` gets a line per
        resource step, ``events`` every event.
        """
        server: grpc.Server | None = None
        log_dir: tempfile.TemporaryDirectory[str] | None = None
        watcher: threading.Thread | None = None
        done = threading.Event()
        args = list(args)
        try:
            if inline:
                server = grpc.server(ThreadPoolExecutor(max_workers=4))
                language_pb2_grpc.add_LanguageRuntimeServicer_to_server(
                    LanguageServer(program), server
                )
                port = server.add_insecure_port("127.0.0.1:0")
                server.start()
                args += [f"--client=127.0.0.1:{port}", "--exec-kind", "auto.inline"]
            on_event = self._progress(progress)
            if on_event is not None or events is not None:
                log_dir = tempfile.TemporaryDirectory(prefix="sandbox-events-")
                log_path = Path(log_dir.name) / "events.jsonl"
                log_path.touch()
                args += ["--event-log", str(log_path)]

                def deliver(event: auto.EngineEvent) -> None:
                    if events is not None:
                        events.append(event)
                    if on_event is not None:
                        on_event(event)

                watcher = threading.Thread(
                    target=_follow, args=(log_path, deliver, done), daemon=True
                )
                watcher.start()
            env = pulumi_env(self.settings, backend_url=self.backend_url)
            # The flags the Automation API uses (--client, --event-log) exist only with this.
            env["PULUMI_DEBUG_COMMANDS"] = "true"
            if self._provider is not None and args[0] in ("up", "destroy"):
                env["PULUMI_DEBUG_PROVIDERS"] = f"docker:{self._provider.port()}"
            self._command.run(args, str(self.settings.project_dir), env)
        finally:
            done.set()
            if watcher is not None:
                watcher.join(timeout=30)
            if server is not None:
                # A program still running (the CLI failed or was stopped under it) gets a
                # moment to end on its own rather than being cut off mid-coroutine.
                server.stop(grace=5).wait(timeout=10)
            if log_dir is not None:
                log_dir.cleanup()

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

    def _write_config(self, name: str, config: dict[str, auto.ConfigValue]) -> None:
        """The stack's config: plain values written straight into its config file (the file
        ``pulumi config set`` writes; no CLI run), secrets through the CLI, which encrypts
        them with the stack's key."""
        path = self._config_file(name)
        document = yaml.safe_load(path.read_text()) if path.exists() else None
        document = document if isinstance(document, dict) else {}
        document["config"] = {k: v.value for k, v in config.items() if not v.secret}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(yaml.dump(document, Dumper=_QuotedDumper, sort_keys=True))
        tmp.replace(path)
        hidden = [f"{k}={v.value}" for k, v in config.items() if v.secret]
        if hidden:
            args = ["config", "set-all", "--stack", name]
            for pair in hidden:
                args += ["--secret", pair]
            self._cli(args)

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
            self._config_file(name).unlink(missing_ok=True)

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
                self._write_config(
                    name, self._config(template, sandbox_id, owner, templates_dir, env)
                )
                if any(e.public for e in template.expose):
                    ensure_edge_network(self.settings.edge_network, self.settings.edge_subnet)
                self._cli(
                    ["up", "--yes", "--skip-preview", "--stack", name],
                    inline=True,
                    progress=progress,
                    events=events,
                )
            except PulumiInterrupted as exc:
                # The engine is stopping: no teardown now (another Pulumi run); the sandbox
                # stays "creating" and the next start's recovery cleans it up.
                raise Interrupted(str(exc)) from exc
            except auto.CommandError as exc:
                self._remove_stack(name)
                raise StackError(_summarize(exc)) from exc
            except docker.errors.DockerException as exc:  # the engine's own Docker calls
                self._remove_stack(name)
                raise StackError(f"Docker is not reachable: {exc}") from exc
            except BaseException:
                self._remove_stack(name)
                raise
            return _stack_outputs(events)

    def preview_template(self, template: Template, templates_dir: Path) -> Preview:
        """What a new sandbox of this template would create; nothing is created."""
        name = stack_name(f"preview{secrets.token_hex(3)}")
        with self._operation(name):
            stack = self._stack(name, create=True)
            try:
                stack.set_all_config(
                    self._config(template, name.removeprefix("sbx-"), "preview", templates_dir)
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
        """Destroy every resource of the sandbox, then remove its stack (one CLI run)."""
        name = stack_name(sandbox_id)
        with self._operation(name):
            try:
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
            self._config_file(name).unlink(missing_ok=True)

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
                except PulumiInterrupted as exc:
                    raise Interrupted(str(exc)) from exc
                except auto.CommandError as exc:
                    raise StackError(f"pulumi destroy: {_summarize(exc)}") from exc
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


class SharedProvider:
    """The docker provider as one long-lived process of the engine, which the engine's own
    ``up`` and ``destroy`` runs attach to (``PULUMI_DEBUG_PROVIDERS``, the engine's attach
    protocol) instead of starting a provider each: a provider start is an interpreter start
    and its imports, about 0.45 s of every run. Started on first use and again whenever it is
    found dead; it ends with the engine (it watches its parent). The plain CLI, and the
    engine's previews and refreshes, still start their own provider as usual."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._port = 0

    def port(self) -> int:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            return self._port

    def _start(self) -> None:
        env = {**os.environ, PROVIDER_PARENT_ENV: str(os.getpid())}
        process = subprocess.Popen(
            [sys.executable, "-m", "stacks.provider.server"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            # A Ctrl-C meant for the engine leaves it to the runs that use it (their own
            # groups too); it ends with the engine, which it watches.
            start_new_session=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.isdigit():
            process.kill()
            raise StackError(f"the docker provider did not start (it printed {line[:200]!r})")
        self._process, self._port = process, int(line)
        # Anything it prints later is drained, so a full pipe never blocks it.
        threading.Thread(target=process.stdout.read, daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
            self._process = None


def remove_labelled(sandbox_id: str, *, containers_only: bool = False) -> list[str]:
    """Remove every container, network and volume labelled with this sandbox (in that order:
    what uses an object goes first). Returns what was removed."""
    selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
    removed: list[str] = []
    client = docker.from_env(timeout=60)
    try:
        for container in client.containers.list(all=True, filters=selector):
            remove_container(client, container.id or container.name)
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


# Seconds a container Docker is already removing (another request started it: a destroy cut
# short, say) is waited for.
REMOVAL_WAIT = 60.0


def remove_container(client: docker.DockerClient, ident: str) -> None:
    """Remove a container with its anonymous volumes; gone already is success, and one that
    Docker is already removing is waited for until it is gone."""
    try:
        client.api.remove_container(ident, v=True, force=True)
        return
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc.explanation):
            raise
    deadline = time.monotonic() + REMOVAL_WAIT
    while time.monotonic() < deadline:
        try:
            client.api.inspect_container(ident)
        except docker.errors.NotFound:
            return
        time.sleep(0.2)
    raise StackError(f"Docker was still removing container {ident} after {REMOVAL_WAIT:.0f} s")


def network_subnets(attrs: dict[str, Any]) -> list[str]:
    """The subnets of a Docker network, from its inspect attributes."""
    return [str(c.get("Subnet")) for c in (attrs.get("IPAM") or {}).get("Config") or []]


def ensure_edge_network(name: str, subnet: str = "") -> None:
    """The shared network Traefik reaches published workspaces on; made once, never part of a
    stack. Inter-container communication is off on it: a workspace on it reaches no other
    workspace (Traefik, on the host or in the host's network namespace, reaches them all). Its
    bridge is named like a sandbox's, so the host firewall covers it too. ``subnet`` (empty:
    Docker's pool chooses) bounds how many published sandboxes it holds; an unused network
    of another subnet is made again, a used one is kept (with a warning) until it is free."""
    options = {
        "com.docker.network.bridge.enable_icc": "false",
        BRIDGE_NAME_OPTION: bridge_name(name),
    }
    ipam = (
        docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
        if subnet
        else None
    )
    client = docker.from_env(timeout=30)
    try:
        for _ in range(2):
            try:
                network = client.networks.get(name)
            except docker.errors.NotFound:
                # Two creates racing to make it: the loser's 409 is fine, the network exists.
                with contextlib.suppress(docker.errors.APIError):
                    client.networks.create(
                        name,
                        driver="bridge",
                        options=options,
                        ipam=ipam,
                        labels={L_MANAGED: MANAGED_BY, "io.sandbox-engine.shared": "true"},
                        check_duplicate=True,
                    )
                network = client.networks.get(name)
            have = network.attrs.get("Options") or {}
            subnets = network_subnets(network.attrs)
            isolated = all(have.get(k) == v for k, v in options.items())
            if isolated and (not subnet or subnet in subnets):
                return
            if network.attrs.get("Containers"):
                if isolated:  # usable, only smaller or elsewhere than asked: kept while in use
                    log.warning(
                        "network %s has subnet %s, not %s; it is made again once no sandbox"
                        " uses it",
                        name,
                        ", ".join(subnets),
                        subnet,
                    )
                    return
                raise StackError(
                    f"network {name} exists without {options} and has containers; remove it "
                    "(docker network rm) once they are gone so the engine can make it isolated"
                )
            # Made by an older engine or by hand, and unused: make it again the right way.
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()
        raise StackError(f"network {name} could not be made with {options} and subnet {subnet}")
    finally:
        client.close()


def labelled_objects(sandbox_id: str) -> list[str]:
    """Every container, network and volume still labelled with this sandbox ("container x")."""
    selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
    client = docker.from_env(timeout=60)
    try:
        return [
            *(f"container {c.name}" for c in client.containers.list(all=True, filters=selector)),
            *(f"network {n.name}" for n in client.networks.list(filters=selector)),
            *(f"volume {v.name}" for v in client.volumes.list(filters=selector)),
        ]
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


def container_states(instance: str) -> dict[str, dict[str, str]]:
    """Sandbox id → container name → Docker state (running, exited, restarting, removing…) of
    every container this engine instance made: one Docker call for all sandboxes (the list
    itself, no inspect per container)."""
    client = docker.from_env(timeout=60)
    try:
        found: dict[str, dict[str, str]] = {}
        for c in client.containers.list(
            all=True, sparse=True, filters={"label": [f"{L_ENGINE}={instance}", L_SANDBOX]}
        ):
            sid = (c.attrs.get("Labels") or {}).get(L_SANDBOX)
            names = c.attrs.get("Names") or []
            if sid and names:
                found.setdefault(sid, {})[names[0].lstrip("/")] = str(c.attrs.get("State"))
        return found
    finally:
        client.close()


class _QuotedDumper(yaml.SafeDumper):
    """Every string double-quoted: the CLI reads the file as YAML 1.2, where an unquoted
    ``0591488581`` (a sandbox id, say) is a number, not the string it was."""


_QuotedDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
)


def _follow(path: Path, deliver: Callable[[auto.EngineEvent], None], done: threading.Event) -> None:
    """Read an event log as the CLI writes it (one JSON object per line) until ``done`` is
    set and everything written has been read."""
    pending = ""
    with path.open(encoding="utf-8") as fh:
        while True:
            chunk = fh.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    if line.strip():
                        deliver(auto.EngineEvent.from_json(json.loads(line)))
                continue
            if done.is_set():
                return
            done.wait(0.02)


def _stack_outputs(events: list[auto.EngineEvent]) -> dict[str, Any]:
    """The stack's outputs, from the outputs event of its root resource."""
    for event in reversed(events):
        out = event.res_outputs_event
        if out and out.metadata and out.metadata.type == "pulumi:pulumi:Stack":
            new = out.metadata.new
            return dict(new.outputs or {}) if new else {}
    return {}


def _counts(summary: Any) -> dict[str, int]:
    """Pulumi's change summaries are keyed by OpType; plain strings travel better."""
    return {getattr(op, "value", str(op)): int(n) for op, n in summary.items()}


def _summarize(exc: auto.CommandError) -> str:
    """The error lines of a failed Pulumi run, without its full log (and so without config);
    how it ended when it printed none."""
    return describe_command_error(exc)
