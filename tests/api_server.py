"""A real uvicorn server in a thread, or the engine as a process of its own, for tests over
HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import websockets

from api.app import create_app
from api.terminal import MAX_FRAME
from engine.migrate import migrate
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import Role, create_client
from tests.conftest import ROOT
from tests.threaded_server import threaded_server


@contextmanager
def serve(settings: Settings, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve on a free port of ``host``; yields the 127.0.0.1 address to call it on."""
    with threaded_server(
        create_app(settings),
        host,
        what="the API server",
        log_level="info",
        log_config=None,  # records reach the root logger (and the tests' caplog)
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME,  # as engine/cli.py serves it
    ) as port:
        yield f"127.0.0.1:{port}"


@contextmanager
def member_api(
    database: str, tmp_path: Path, templates: Path, **settings: Any
) -> Iterator[httpx.Client]:
    """An engine on ``database`` (migrated) served in this process with ``templates``, a file
    Pulumi backend and archives in ``tmp_path``, and ``settings`` besides; yields a client
    holding a new member key."""
    engine = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}",
        templates_dir=templates,
        archives_dir=tmp_path / "archives",
        **settings,
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        key = create_client(conn, name="member", role=Role.MEMBER)[1]
    with (
        serve(engine) as address,
        httpx.Client(base_url=f"http://{address}", headers={"X-API-Key": key}, timeout=120) as http,
    ):
        yield http


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs…), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: the fields follow its last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """`sandbox-engine serve` as a process of its own, in its own session, with its state
    (keys file, PULUMI_HOME, passphrase, recordings…) in a folder beside its log, never in
    the checkout's .state/. ``kill9`` takes every process under it along, as a crash of its
    host (or its cgroup) would."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.env = {"SANDBOX_STATE_DIR": str(log.parent / f"{log.stem}-state"), **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return Path(self.env["SANDBOX_STATE_DIR"])

    def start(self) -> None:
        """Start it and wait for /healthz. A free port can be taken by another test's process
        between choosing it and binding it: then another port, up to three times."""
        for _ in range(3):
            begun = self.log.stat().st_size if self.log.exists() else 0
            try:
                return self._start()
            except AssertionError:
                if "address already in use" not in self.log.read_text()[begun:]:
                    raise
                self.port = _free_port()
        raise AssertionError(f"no free port for the engine:\n{self.log.read_text()[-2000:]}")

    def _start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                if self.proc.poll() is not None:  # it ended (a port taken, say)
                    break
                time.sleep(0.2)
        raise AssertionError(f"the engine did not start:\n{self.log.read_text()[-2000:]}")

    def signal_all(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to the engine and every process under it at once (a service manager's
        stop of its cgroup); returns the pids signalled."""
        assert self.proc is not None
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill9(self) -> None:
        assert self.proc is not None
        self.signal_all(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        """Wait for the engine to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=600)


@contextmanager
def serve_process(settings: Settings, log: Path) -> Iterator[str]:
    """``sandbox-engine serve`` in a process of its own (Engine), configured with ``settings``
    through its SANDBOX_* environment; yields the address to call it on. For a test whose
    client side is busy itself (a fuzzer): the two do not share an interpreter lock."""
    env = dict(os.environ)
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"SANDBOX_{name.upper()}"] = str(value)
    engine = Engine(env, log)
    engine.start()
    try:
        yield f"127.0.0.1:{engine.port}"
    finally:
        engine.stop()


class Terminal:
    """A WebSocket terminal client: type, read until some text shows, resize."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen = b""

    async def type(self, text: str) -> None:
        await self.ws.send(text.encode())

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def expect(self, needle: str, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while needle.encode() not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen; last output: {self.seen[-400:]!r}")
            message = await asyncio.wait_for(self.ws.recv(), left)
            self.seen += message if isinstance(message, bytes) else message.encode()


async def close_code(url: str) -> int:
    """Connect and return the close code the server ends with."""
    try:
        async with websockets.connect(url) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006
    return 1000


@contextmanager
def running_sandbox(address: str, key: str, template: str = "backend-go") -> Iterator[str]:
    """A sandbox made over the API and running; destroyed (and waited for) at the end."""
    with httpx.Client(
        base_url=f"http://{address}", headers={"X-API-Key": key}, timeout=120
    ) as http:
        created = http.post("/api/v1/sandboxes", json={"template": template, "ttl": "30m"})
        assert created.status_code == 202, created.text
        sandbox_id = created.json()["id"]
        try:
            wait_for_state(http, sandbox_id, "running")
            yield sandbox_id
        finally:
            http.delete(f"/api/v1/sandboxes/{sandbox_id}")
            wait_for_state(http, sandbox_id, "destroyed")


def wait_for_state(http: httpx.Client, sandbox_id: str, state: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/sandboxes/{sandbox_id}").json()
        if body["state"] == state:
            return
        assert body["state"] != "failed", body
        time.sleep(0.5)
    raise AssertionError(f"{sandbox_id} never reached {state}")


# --- an engine process over a throwaway database ---------------------------------------------


def prepare(database: str, tmp_path: Path, **settings: str) -> tuple[str, str, dict[str, str]]:
    """A migrated database with a member key, a file backend in ``tmp_path``, and the
    environment an engine process runs with: (key, backend URL, env)."""
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="t", role=Role.MEMBER)
    backend = f"file://{tmp_path}"
    env = {
        **os.environ,
        "SANDBOX_DATABASE_URL": database,
        "SANDBOX_PULUMI_BACKEND_URL": backend,
        # Engines of one env share their state (the stack secrets' passphrase above all), as
        # engine processes of one deployment do; never the checkout's .state/.
        "SANDBOX_STATE_DIR": str(tmp_path / "engine-state"),
        **settings,
    }
    return key, backend, env


def engine_http(engine: Engine, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{engine.port}", headers={"X-API-Key": key}, timeout=60
    )


def wait_for_event(database: str, sid: str, text: str, timeout: float = 120) -> None:
    """Poll the events table (the SSE stream would hold the request open until the end)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database, autocommit=True) as conn:
        while time.monotonic() < deadline:
            found = conn.execute(
                "SELECT 1 FROM sandbox_events WHERE sandbox_id = %s AND message LIKE %s",
                (sid, f"%{text}%"),
            ).fetchone()
            if found:
                return
            time.sleep(0.05)
    raise AssertionError(f"no event with {text!r}")


def nothing_left(docker_client: docker.DockerClient, settings: Settings, sid: str) -> None:
    selector = {"label": f"io.sandbox-engine.sandbox={sid}"}
    assert not docker_client.containers.list(all=True, filters=selector)
    assert not docker_client.networks.list(filters=selector)
    assert not docker_client.volumes.list(filters=selector)
    assert f"sbx-{sid}" not in {s.name for s in StackManager(settings).list()}
    assert not (ROOT / ".state" / "stacks" / f"Pulumi.sbx-{sid}.yaml").exists()
