"""One ``pulumi`` CLI run as the engine makes it, and what it needs around it.

- ``PulumiRuns.run``: a run in the project folder with the engine's environment; with
  ``inline`` the program runs inside this process (the Automation API's language runtime
  serves it: no language host, interpreter or plugin scan starts), and engine events are read
  from an event log as they are written (progress lines, the stack's outputs).
- The program is the Pulumi project's own, found as the plain CLI finds it: ``main`` of the
  project's ``Pulumi.yaml`` (``stacks/``), whose package exposes ``program``. The engine drives
  the project at ``SANDBOX_PROJECT_DIR``; it does not import it by name.
- ``SharedProvider``: the docker provider as one long-lived process the engine's own runs
  attach to.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import yaml
from pulumi import automation as auto

# The Automation API's in-process language runtime (the server behind its inline programs).
# Private to the SDK, which is pinned (pyproject.toml); tests/test_automation.py runs it.
from pulumi.automation._server import LanguageServer
from pulumi.runtime.proto import language_pb2_grpc

from engine.errors import StackError
from engine.host.toolenv import PROVIDER_MODULE, pulumi_env
from engine.sandboxes.pulumi_cli import EngineCommand
from engine.settings import Settings

Progress = Callable[[str], None]
# The variable the docker provider reads its parent's pid from (it ends with its parent):
# stacks/provider/server.py reads the same name.
PROVIDER_PARENT_ENV = "SANDBOX_PROVIDER_PARENT"


def project_program(project_dir: Path) -> Callable[[], None]:
    """The program of the Pulumi project in ``project_dir``: its ``Pulumi.yaml``'s ``main``
    package's ``program``."""
    settings = yaml.safe_load((project_dir / "Pulumi.yaml").read_text()) or {}
    main = str(settings.get("main") or ".").strip("/")
    module = importlib.import_module(main.replace("/", "."))
    program = getattr(module, "program", None)
    if not callable(program):
        raise StackError(f"{project_dir}/Pulumi.yaml: its main {main!r} exposes no program()")
    return program  # type: ignore[no-any-return]


class PulumiRuns:
    """The engine's ``pulumi`` runs in the project folder (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        command: EngineCommand,
        *,
        backend_url: str | None,
        provider: SharedProvider | None,
    ) -> None:
        self.settings = settings
        self.command = command
        self.backend_url = backend_url
        self.provider = provider
        self.program = project_program(settings.project_dir)

    def run(
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
        args = list(args)
        with contextlib.ExitStack() as stack:
            if inline:
                args += self._serve_program(stack)
            on_event = progress_events(progress)
            if on_event is not None or events is not None:
                args += _event_log(stack, on_event, events)
            env = pulumi_env(self.settings, backend_url=self.backend_url)
            # The flags the Automation API uses (--client, --event-log) exist only with this.
            env["PULUMI_DEBUG_COMMANDS"] = "true"
            if self.provider is not None and args[0] in ("up", "destroy"):
                env["PULUMI_DEBUG_PROVIDERS"] = f"docker:{self.provider.port()}"
            self.command.run(args, str(self.settings.project_dir), env)

    def _serve_program(self, stack: contextlib.ExitStack) -> list[str]:
        """The program served from this process for one run (stopped with ``stack``); the
        CLI's arguments that point it there."""
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        language_pb2_grpc.add_LanguageRuntimeServicer_to_server(
            LanguageServer(self.program), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        # A program still running (the CLI failed or was stopped under it) gets a moment to
        # end on its own rather than being cut off mid-coroutine.
        stack.callback(lambda: server.stop(grace=5).wait(timeout=10))
        return [f"--client=127.0.0.1:{port}", "--exec-kind", "auto.inline"]


def _event_log(
    stack: contextlib.ExitStack,
    on_event: Callable[[auto.EngineEvent], None] | None,
    events: list[auto.EngineEvent] | None,
) -> list[str]:
    """An event log followed while the run writes it (until ``stack`` closes), each event
    given to ``on_event`` and kept in ``events``; the CLI's arguments that name it."""
    log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sandbox-events-"))
    log_path = Path(log_dir) / "events.jsonl"
    log_path.touch()

    def deliver(event: auto.EngineEvent) -> None:
        if events is not None:
            events.append(event)
        if on_event is not None:
            on_event(event)

    done = threading.Event()
    watcher = threading.Thread(target=follow, args=(log_path, deliver, done), daemon=True)
    watcher.start()
    stack.callback(watcher.join, timeout=30)
    stack.callback(done.set)
    return ["--event-log", str(log_path)]


def progress_events(progress: Progress | None) -> Callable[[auto.EngineEvent], None] | None:
    """An engine-event handler that reports a line per resource step to ``progress``."""
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
            [sys.executable, "-m", PROVIDER_MODULE],
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


def follow(path: Path, deliver: Callable[[auto.EngineEvent], None], done: threading.Event) -> None:
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


def stack_outputs(events: list[auto.EngineEvent]) -> dict[str, Any]:
    """The stack's outputs, from the outputs event of its root resource."""
    for event in reversed(events):
        out = event.res_outputs_event
        if out and out.metadata and out.metadata.type == "pulumi:pulumi:Stack":
            new = out.metadata.new
            return dict(new.outputs or {}) if new else {}
    return {}


def counts(summary: Any) -> dict[str, int]:
    """Pulumi's change summaries are keyed by OpType; plain strings travel better."""
    return {getattr(op, "value", str(op)): int(n) for op, n in summary.items()}
