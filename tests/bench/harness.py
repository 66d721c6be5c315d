"""What the benchmarks share: an engine in a process of its own on a throwaway database,
sandboxes created and destroyed through its API, process memory, and percentile summaries.

The engine runs as ``sandbox-engine serve`` in a separate process (not a thread of the
benchmark), so a load generator in the benchmark's process does not share its GIL and the
engine's memory can be read on its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import docker
import httpx
import psycopg

from engine.backend.docker import remove_labelled
from engine.host.disks import Disks
from engine.migrate import migrate
from engine.model.spec import L_ENGINE
from engine.settings import Settings
from engine.store import Role, create_client, engine_instance

ROOT = Path(__file__).resolve().parents[2]
LIVE = ROOT / "tests" / "fixtures" / "live-templates"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
POLL = 0.05  # seconds between state polls


@dataclass(frozen=True)
class Engine:
    """A running engine process and what a benchmark needs to talk to it."""

    base_url: str
    member_key: str
    admin_key: str
    pid: int
    database_url: str
    log_path: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _wait_healthy(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine exited ({proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the engine did not answer /healthz within 120 s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40, *, requests: bool = True) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    if not requests:  # uvicorn's access lines of successful requests
        text = [line for line in text if not re.search(r'HTTP/1\.1" 2\d\d ', line)]
    return "\n".join(text[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL to the whole process group, Pulumi
    children included."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextmanager
def engine_process(**settings_env: str) -> Iterator[Engine]:
    """``sandbox-engine serve`` on a free port, a database of its own (migrated, with a member
    and an admin key) and a file Pulumi backend in a temporary folder; the workspace-only
    ``web`` template from tests/fixtures/live-templates. Keyword arguments are extra
    ``SANDBOX_*`` variables. On exit the process, every Docker object of its sandboxes, its
    stacks' config files, the database and the folder are gone."""
    settings = Settings()
    admin_url = settings.database_url.get_secret_value()
    name = f"sandbox_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    tmp = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    log = tmp / "engine.log"
    try:
        migrate(url)
        # An admin key exists before the engine starts, so `serve` writes no first-admin-key.
        with psycopg.connect(url, autocommit=True) as conn:
            _, member_key = create_client(conn, name="bench", role=Role.MEMBER)
            _, admin_key = create_client(conn, name="bench-admin", role=Role.ADMIN)
        extra = {"SANDBOX_TEMPLATES_DIR": str(LIVE), **settings_env}
        with serve_process(url, tmp, log, **extra) as (base_url, pid):
            yield Engine(base_url, member_key, admin_key, pid, url, log)
    except BaseException:
        kept = Path(tempfile.gettempdir()) / f"{name}.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(log, kept)
        print(f"engine log: {kept}; its last lines other than requests:", file=sys.stderr)
        print(_tail(log, requests=False), file=sys.stderr)
        raise
    finally:
        try:
            _clean_up(url, tmp, settings)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def serve_process(
    database_url: str, backend: Path, log: Path, **settings_env: str
) -> Iterator[tuple[str, int]]:
    """``sandbox-engine serve`` on a free port, on ``database_url`` and the file Pulumi backend
    in ``backend``, its output appended to ``log``; yields its base URL and pid, and stops it
    on exit. Keyword arguments are extra ``SANDBOX_*`` variables."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SANDBOX_DATABASE_URL": database_url,
        "SANDBOX_PULUMI_BACKEND_URL": f"file://{backend}",
        "SANDBOX_MAX_LIVE_SANDBOXES_PER_KEY": "1000",
        "SANDBOX_CREATES_PER_MINUTE": "10000",
        **settings_env,
    }
    port = _free_port()
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [python, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, proc, log)
        yield base_url, proc.pid
    finally:
        _stop(proc)


def _clean_up(url: str, backend: Path, settings: Settings) -> None:
    """Every Docker object of the engine's sandboxes (by sandbox, and by the engine-instance
    label, which also catches an object whose sandbox label does not match its row), their
    disks (engine/host/disks.py), and the config file (in the project's .state/stacks) of
    every stack in its Pulumi backend."""
    with psycopg.connect(url) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
        instance = engine_instance(conn)
    for sid in ids:
        remove_labelled(sid)
    client = docker.from_env(timeout=60)
    try:
        selector = {"label": f"{L_ENGINE}={instance}"}
        for container in client.containers.list(all=True, filters=selector):
            container.remove(force=True, v=True)
        for network in client.networks.list(filters=selector):
            network.remove()
        for volume in client.volumes.list(filters=selector):
            volume.remove(force=True)
    finally:
        client.close()
    if settings.disks:  # a sandbox whose destroy did not finish leaves its disk mounted
        disks = Disks(settings.disk_path, settings.disk_helper_image)
        for sid in disks.listed(instance):
            disks.drop(instance, sid)
        with contextlib.suppress(OSError):
            (settings.disk_path / instance).rmdir()
    stacks = {f"sbx-{sid}" for sid in ids}
    stacks |= {p.name.split(".")[0] for p in (backend / ".pulumi" / "stacks").rglob("*.json*")}
    for name in stacks:
        (settings.stack_config_path / f"Pulumi.{name}.yaml").unlink(missing_ok=True)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.extend(int(c) for c in children.read_text().split())
    return found


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (those alive now)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def rss_tree_mb(pid: int) -> float:
    """Resident memory (VmRSS) of the process and all its descendants, in MB (10^6 bytes).
    Shared pages are counted once per process, as ``ps`` does."""
    kb = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
    return kb * 1024 / 1e6


def cpu_tree_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by the process and its descendants: those alive
    now, and those that exited and were waited for by one of them."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            # After the parenthesised command: utime, stime, cutime, cstime are fields 12-15.
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, nearest-rank p50/p95/p99, max and count."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
        "n": len(ordered),
    }


def wait_state(http: httpx.Client, sid: str, wanted: str, timeout: float = 600) -> None:
    """Poll the sandbox every 50 ms until it is in ``wanted``; raise on ``failed``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(f"/api/v1/sandboxes/{sid}")
        response.raise_for_status()
        body = response.json()
        if body["state"] == wanted:
            return
        if body["state"] == "failed":
            raise RuntimeError(f"sandbox {sid} failed: {body.get('error')}")
        time.sleep(POLL)
    raise TimeoutError(f"sandbox {sid} did not reach {wanted} within {timeout} s")


def _bounded(work: Callable[[int], str], n: int, concurrency: int) -> list[str]:
    """Run work(0..n-1) with at most ``concurrency`` at once; results in index order. The
    first failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures: list[Future[str]] = [pool.submit(work, i) for i in range(n)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [e for e in (f.exception() for f in done) if e is not None]
        if errors:
            for f in futures:
                f.cancel()
            raise errors[0]
        return [f.result() for f in futures]


def create_running(http: httpx.Client, template: str, n: int, concurrency: int) -> list[str]:
    """Create ``n`` sandboxes through the API, at most ``concurrency`` in flight, each waited
    for until ``running``; returns their ids."""

    def one(_: int) -> str:
        response = http.post("/api/v1/sandboxes", json={"template": template, "ttl": "30m"})
        response.raise_for_status()
        sid: str = response.json()["id"]
        wait_state(http, sid, "running")
        return sid

    return _bounded(one, n, concurrency)


def destroy_all(http: httpx.Client, ids: Sequence[str], concurrency: int) -> dict[str, int]:
    """DELETE each sandbox and wait until it is ``destroyed``, at most ``concurrency`` at
    once. A DELETE refused (409) while the sandbox is busy (e.g. ``repairing``) is retried;
    returns how many refusals were met, by the state the sandbox was in."""
    refused: dict[str, int] = {}

    def one(i: int) -> str:
        sid = ids[i]
        deadline = time.monotonic() + 600
        while (response := http.delete(f"/api/v1/sandboxes/{sid}")).status_code == 409:
            state = http.get(f"/api/v1/sandboxes/{sid}").json()["state"]
            refused[state] = refused.get(state, 0) + 1
            if state in ("destroying", "destroyed") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if response.status_code != 409:
            response.raise_for_status()
        wait_state(http, sid, "destroyed")
        return sid

    _bounded(one, len(ids), concurrency)
    return refused


def api_client(engine: Engine, key: str | None = None, timeout: float = 120) -> httpx.Client:
    """A thread-safe HTTP client for the engine with the member key (or ``key``)."""
    return httpx.Client(
        base_url=engine.base_url,
        headers={"X-API-Key": key or engine.member_key},
        timeout=timeout,
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
    )
