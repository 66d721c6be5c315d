"""The engine's runs of the ``pulumi`` CLI: each bounded in time, each in a process group of its
own, and all of them stopped together when the engine stops.

- **A time bound per run.** A run past its bound (``SANDBOX_PULUMI_TIMEOUT`` for the runs that
  touch resources, ``SHORT_TIMEOUT`` for the rest: ``stack ls``, ``stack init``, ``config``…)
  has its process group terminated and raises ``PulumiTimeout``: nothing the engine starts can
  hang for ever (a ``stack ls`` of Pulumi's DIY PostgreSQL backend could: ``toolenv``).
- **Its own process group.** A Ctrl-C in the engine's terminal reaches the engine, not its
  Pulumi runs: a stop lets them finish within ``SANDBOX_STOP_TIMEOUT`` instead of cutting every
  one of them at once.
- **A stop is not a failure.** Once the engine is stopping (``begin_stop``), a run that ends
  badly raises ``PulumiInterrupted``; so does a run killed by a signal from outside while the
  engine's own stop signal is on its way. The service leaves such a sandbox mid-operation for
  the next start's recovery, which finishes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

from pulumi import automation as auto
from pulumi.automation._cmd import CommandResult, OnOutput, _fixup_path
from pulumi.automation.errors import create_command_error

# Seconds a run that touches no resources (stack ls, stack init, config, export…) may take.
SHORT_TIMEOUT = 120.0
# The subcommands bounded by the long timeout instead: they wait on resources.
LONG = frozenset({"up", "destroy", "refresh", "preview", "import"})
# Seconds a terminated run gets to end by itself (Pulumi cancels: in-flight resource steps
# finish, no new ones start) before its group is killed.
TERMINATE_GRACE = 10.0
# Seconds a run that died by a signal waits for the engine's own stop to be noticed: a service
# manager signals the engine and its children together, and a child may end first.
SIGNAL_SETTLE = 1.0
# What Pulumi prints when a signal cancels it (pkg/backend/cancellation_scope.go).
_CANCELLED = ("SIGTERM received", "^C received")


class PulumiRunError(auto.CommandError):
    """A run that ended in a way the engine describes itself (its output holds no error)."""

    def __init__(self, result: CommandResult, description: str) -> None:
        super().__init__(result)
        self.description = description

    def __str__(self) -> str:
        return self.description


class PulumiTimeout(PulumiRunError):
    """A run past its time bound; its process group was terminated."""


class PulumiInterrupted(PulumiRunError):
    """A run cut short by the engine's own stop (or by the signal that stops it)."""


class PulumiSignalled(PulumiRunError):
    """A run killed by a signal from outside the engine while the engine goes on."""


def verb(args: list[str]) -> str:
    """The subcommand of a run's arguments, as a user reads it (``stack ls``, ``up``)."""
    words = [a for a in args if not a.startswith("-")]
    if words and words[0] in ("stack", "config", "plugin") and len(words) > 1:
        return " ".join(words[:2])
    return words[0] if words else "pulumi"


def signal_name(code: int) -> str:
    """``SIGTERM`` for a return code of -15; empty when the code is no signal's."""
    if code >= 0:
        return ""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class EngineCommand(auto.PulumiCommand):
    """``auto.PulumiCommand`` with the engine's bounds: the Automation API's own calls (stack
    selection, previews, refreshes, exports) go through it as well as the engine's direct runs.
    """

    def __init__(
        self, root: str, *, long_timeout: float, short_timeout: float = SHORT_TIMEOUT
    ) -> None:
        super().__init__(root=root)
        self.long_timeout = long_timeout
        self.short_timeout = short_timeout
        self._stopping = threading.Event()
        self._running: dict[int, subprocess.Popen[str]] = {}
        self._guard = threading.Lock()

    # --- the engine's stop ----------------------------------------------------------------

    def begin_stop(self) -> None:
        """The engine is stopping: from now on a run that fails was interrupted."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def running(self) -> int:
        with self._guard:
            return len(self._running)

    def terminate_all(self, grace: float = TERMINATE_GRACE) -> int:
        """Terminate every run still going (SIGTERM to its group: Pulumi cancels), then kill
        what is left after ``grace`` seconds. Returns how many runs there were."""
        self.begin_stop()
        with self._guard:
            processes = list(self._running.values())
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
        return len(processes)

    # --- one run --------------------------------------------------------------------------

    def timeout_for(self, args: list[str]) -> float:
        return self.long_timeout if verb(args) in LONG else self.short_timeout

    def run(
        self,
        args: list[str],
        cwd: str,
        additional_env: Mapping[str, str],
        on_output: OnOutput | None = None,
        on_error: OnOutput | None = None,
    ) -> CommandResult:
        """As ``auto.PulumiCommand.run`` (non-interactive, the same errors), in a process group
        of its own and bounded by ``timeout_for(args)``."""
        args = list(args)
        if "--non-interactive" not in args:
            args.insert(0, "--non-interactive")
        env: dict[str, str] = {**os.environ, **additional_env, "PULUMI_AUTOMATION_API": "true"}
        if os.path.isabs(self.command):
            env = _fixup_path(env, os.path.dirname(self.command))
        if self.stopping:
            result = CommandResult(stdout="", stderr="", code=-1)
            raise PulumiInterrupted(
                result, f"pulumi {verb(args)} was not started: the engine is stopping"
            )
        limit = self.timeout_for(args)
        result, timed_out = self._process(args, cwd, env, limit, on_output, on_error)
        if result.code == 0:
            return result
        raise self._failure(verb(args), result, timed_out, limit)

    def _process(
        self,
        args: list[str],
        cwd: str,
        env: dict[str, str],
        limit: float,
        on_output: OnOutput | None,
        on_error: OnOutput | None,
    ) -> tuple[CommandResult, bool]:
        """Run the CLI to its end, or ``limit`` seconds (then TERM, and KILL after a grace):
        its result, and whether it timed out."""
        out: list[str] = []
        err: list[str] = []
        timed_out = threading.Event()
        with subprocess.Popen(
            [self.command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            encoding="utf-8",
            start_new_session=True,
        ) as process:
            with self._guard:
                self._running[process.pid] = process
            readers = [
                threading.Thread(target=_consume, args=(process.stdout, on_output, out)),
                threading.Thread(target=_consume, args=(process.stderr, on_error, err)),
            ]
            for reader in readers:
                reader.start()

            def expire() -> None:
                timed_out.set()
                _signal_group(process, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=TERMINATE_GRACE)
                    return
                _signal_group(process, signal.SIGKILL)

            timer = threading.Timer(limit, expire)
            timer.daemon = True
            timer.start()
            try:
                for reader in readers:
                    reader.join()
                process.wait()
            finally:
                timer.cancel()
                with self._guard:
                    self._running.pop(process.pid, None)
        result = CommandResult(
            stdout="\n".join(out), stderr="\n".join(err), code=process.returncode
        )
        return result, timed_out.is_set()

    def _failure(
        self, name: str, result: CommandResult, timed_out: bool, limit: float
    ) -> auto.CommandError:
        """The error of a run that did not succeed: timed out, cut short by the engine's stop,
        signalled from outside, or failed as Pulumi reports it."""
        if timed_out:
            return PulumiTimeout(
                result, f"pulumi {name} did not finish within {limit:.0f} s and was stopped"
            )
        code = result.code
        signalled = code < 0 or any(mark in result.stdout for mark in _CANCELLED)
        if signalled and not self.stopping:
            self._stopping.wait(SIGNAL_SETTLE)
        if self.stopping:
            return PulumiInterrupted(result, f"pulumi {name} was cut short by the engine's stop")
        if signalled:
            how = signal_name(code) or "a signal"
            return PulumiSignalled(
                result, f"pulumi {name} was stopped by {how} from outside the engine"
            )
        return create_command_error(result)


def describe_command_error(exc: auto.CommandError, what: str = "") -> str:
    """A failed run in a user's words: the error lines it printed, or, when it printed none,
    how it ended (never a bare "stderr:")."""
    if isinstance(exc, PulumiRunError):
        return exc.description
    text = str(exc)
    lines = [ln.strip().removeprefix("stderr: ") for ln in text.splitlines() if "error:" in ln]
    if lines:
        return "\n".join(dict.fromkeys(lines))
    code = _code_of(text)
    name = what or "pulumi"
    if code is None:
        return f"{name} failed without an error message"
    how = signal_name(code)
    return f"{name} was stopped by {how}" if how else f"{name} exited with code {code}"


def _code_of(text: str) -> int | None:
    for line in text.splitlines():
        if line.strip().startswith("code:"):
            with contextlib.suppress(ValueError):
                return int(line.split(":", 1)[1])
    return None


def _consume(stream: Any, callback: OnOutput | None, chunks: list[str]) -> None:
    for line in iter(stream.readline, ""):
        stripped = line.rstrip()
        if callback:
            callback(stripped)
        chunks.append(stripped)
    stream.close()


def _signal_group(process: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
