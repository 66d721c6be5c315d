"""The disk hog: a candidate writes until the disk says no — in the home, in /tmp, in /var/tmp
and through the sandbox's PostgreSQL — and the sandbox's own disk (engine/host/disks.py) is
the bound: the write fails at the template's disk_limit with "No space left on device", the
host gives no more than that, the neighbour and the API keep working, the workspace keeps
running. Under runc and under gVisor (runsc). Slow: it runs alone, so the host's free space
it measures is its own sandboxes' doing. ``-s`` prints the figures (docs/security.md)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.api_server import Engine, prepare, wait_for_state
from tests.conftest import ROOT

TEMPLATES = ROOT / "tests" / "fixtures" / "disk-templates"
LIMIT = 256 * 2**20  # small-disk's disk_limit
EXEC_TIMEOUT = 120  # seconds a psql statement's exec may take
pytestmark = pytest.mark.slow

# Writes as the candidate until the disk refuses; prints the bytes written and the error.
FILL = (
    "import sys\n"
    "written = 0\n"
    "try:\n"
    "    with open(sys.argv[1], 'wb') as f:\n"
    "        block = b'x' * 2**20\n"
    "        while written < 2**34:\n"
    "            f.write(block); f.flush(); written += len(block)\n"
    "            if written % (64 * 2**20) == 0: __import__('os').fsync(f.fileno())\n"
    "        __import__('os').fsync(f.fileno())\n"
    "except OSError as exc:\n"
    "    print(written, exc.strerror); sys.exit(0)\n"
    "print(written, 'no error'); sys.exit(1)\n"
)


@pytest.fixture(scope="module")
def engine(
    module_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, Path]]:
    disks = tmp_path_factory.mktemp("disks")
    key, _, env = prepare(
        module_database,
        tmp_path_factory.mktemp("pulumi-state"),
        SANDBOX_TEMPLATES_DIR=str(TEMPLATES),
        SANDBOX_DISK_DIR=str(disks),
        SANDBOX_MAX_LIVE_SANDBOXES_PER_KEY="4",
    )
    process = Engine(env, tmp_path_factory.mktemp("engine") / "engine.log")
    process.start()
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{process.port}", headers={"X-API-Key": key}, timeout=60
        ) as http:
            yield http, disks
    finally:
        process.stop()


def _create(http: httpx.Client, template: str) -> str:
    made = http.post("/api/v1/sandboxes", json={"template": template})
    assert made.status_code == 202, made.text
    return str(made.json()["id"])


def _allocated(folder: Path) -> int:
    """Bytes the host has given the disks in ``folder`` (their files' allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*.img"))


def _free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _fill(container: Any, path: str) -> tuple[int, str]:
    done = container.exec_run(["python3", "-c", FILL, path])
    out = done.output.decode().strip().splitlines()[-1]
    assert done.exit_code == 0, f"writing {path} never failed: {out}"
    written, error = out.split(" ", 1)
    return int(written), error


@pytest.mark.parametrize("template", ["small-disk", "small-disk-gvisor"])
def test_a_disk_hog_stops_at_the_sandboxs_disk_limit(
    engine: tuple[httpx.Client, Path], docker_client: docker.DockerClient, template: str
) -> None:
    http, disks = engine
    ids = [_create(http, template), _create(http, "neighbour")]
    try:
        for sid in ids:
            wait_for_state(http, sid, "running", timeout=300)
        hog, neighbour = (
            docker_client.containers.get(http.get(f"/api/v1/sandboxes/{sid}").json()["workspace"])
            for sid in ids
        )
        assert hog.attrs["Config"]["User"] == "coder"  # the candidate, as the terminal runs
        size = int(hog.exec_run(["df", "-B1", "--output=size", "/home/coder"]).output.split()[-1])
        assert 0.8 * LIMIT < size <= LIMIT, f"df shows {size} bytes, not the disk's"
        free_before, allocated_before = _free(disks), _allocated(disks)

        # While the hog writes: the neighbour writes and reads, the API answers.
        stop = threading.Event()
        checks: list[str] = []

        def neighbour_and_api() -> None:
            while not stop.is_set():
                wrote = neighbour.exec_run(
                    ["sh", "-c", "echo alive > ~/probe && cat ~/probe && rm ~/probe"]
                )
                answer = http.get("/healthz")
                ok = wrote.exit_code == 0 and wrote.output.strip() == b"alive"
                checks.append("ok" if ok and answer.status_code == 200 else f"{wrote} {answer}")
                time.sleep(0.5)

        watcher = threading.Thread(target=neighbour_and_api, daemon=True)
        watcher.start()
        figures: dict[str, Any] = {}
        try:
            for path in ("/home/coder/fill", "/tmp/fill", "/var/tmp/fill"):
                written, error = _fill(hog, path)
                figures[path] = written
                assert error == "No space left on device", (path, error)
                # the whole disk went to this one file: it was all the sandbox had
                assert 0.5 * LIMIT < written <= LIMIT, (path, written)
                grown = _allocated(disks) - allocated_before
                assert grown <= LIMIT, f"the host gave {grown} bytes for a {LIMIT}-byte disk"
                figures[f"host free drop after {path}"] = free_before - _free(disks)
                assert free_before - _free(disks) <= LIMIT + 32 * 2**20, figures
                assert hog.exec_run(["rm", "-f", path]).exit_code == 0
            # Its PostgreSQL writes to the same disk: a table past it fails too. The SQL is
            # the candidate's, with the candidate's credentials over TCP (the workspace
            # image has no psql; the service's own does).
            pg = docker_client.containers.get(hog.name.replace("-workspace", "-postgres"))
            password = next(
                e.split("=", 1)[1]
                for e in hog.attrs["Config"]["Env"]
                if e.startswith("PGPASSWORD=")
            )

            # Under runsc an exec whose process ends while PostgreSQL restarts can leave its
            # stream open for ever (docs/security.md): a statement is given EXEC_TIMEOUT (in a
            # thread of its own, as Docker's client takes no timeout on an exec's stream), and
            # the server's log is what is asserted then.
            def sql(statement: str) -> Any:
                pg.reload()
                if pg.status != "running":  # restarting (its server stopped): not yet
                    return docker.models.containers.ExecResult(1, pg.status.encode())
                answer: list[Any] = []
                argv = ["psql", "-h", "127.0.0.1", "-U", "sandbox", "-d", "sandbox",
                        "-v", "ON_ERROR_STOP=1", "-c", statement]  # fmt: skip
                worker = threading.Thread(
                    target=lambda: answer.append(
                        pg.exec_run(argv, environment={"PGPASSWORD": password})
                    ),
                    daemon=True,
                )
                worker.start()
                worker.join(EXEC_TIMEOUT)
                if answer:
                    return answer[0]
                said = f"the exec's stream did not end within {EXEC_TIMEOUT} s"
                return docker.models.containers.ExecResult(1, said.encode())

            # The service's own root file system takes nothing (the sandbox user is the
            # server's superuser: it may write files wherever the server's user can).
            escape = sql("COPY (SELECT 1) TO '/var/lib/postgresql/escape.txt'")
            assert b"Read-only file system" in escape.output, escape.output
            # Last, as a full disk stops PostgreSQL until space is freed (its WAL cannot be
            # written; here nothing else is left to delete): the sandbox's own service only.
            # Under runc: under runsc the server's restart can leave the exec hanging, and
            # the engine's repair then replaces the container with its log (seen in CI);
            # the same disk's bound is shown above by the candidate's own writes.
            if template == "small-disk":
                # 128 KiB a row, stored uncompressed (STORAGE EXTERNAL), until the disk is full
                table = sql(
                    "CREATE TABLE hog (x text); ALTER TABLE hog ALTER x SET STORAGE EXTERNAL;"
                    " INSERT INTO hog SELECT repeat(md5(i::text), 4000)"
                    " FROM generate_series(1, 200000) AS i"
                )
                said = table.output.decode()
                assert table.exit_code != 0, said
                # Either the statement fails, or the server's WAL writer does and the server
                # restarts (PostgreSQL's answer to a full WAL disk): "No space left" either way.
                logs = pg.logs().decode(errors="replace")
                assert "No space left on device" in said + logs, said + logs[-2000:]
                figures["postgres"] = "statement" if "No space" in said else "server restarted"
            else:
                figures["postgres"] = "not filled under runsc (see the comment)"
        finally:
            stop.set()
            watcher.join(10)
        assert checks and all(c == "ok" for c in checks), checks
        # Nothing of the root file system is the candidate's to fill: every folder they may
        # write to is a mount of the disk (the home, /tmp, /var/tmp).
        # (find lists the mount points themselves without going in: left out.)
        writable = hog.exec_run(
            ["bash", "-c", "find / -xdev -writable ! -type l 2>/dev/null"
             " | grep -vxF -f <(awk '{print $2}' /proc/self/mounts) | head"]
        )  # fmt: skip
        assert writable.output.decode().split() == [], writable.output.decode()
        # The workspace keeps running, and works once the candidate deletes what they wrote.
        hog.reload()
        assert hog.status == "running"
        assert hog.exec_run(["sh", "-c", "echo ok > ~/after && cat ~/after"]).output == b"ok\n"
        assert http.get(f"/api/v1/sandboxes/{ids[0]}").json()["state"] == "running"
        kernel = hog.exec_run(["uname", "-r"]).output.decode().strip()
        print(f"disk hog ({template}, kernel {kernel}): limit {LIMIT >> 20} MiB, df {size >> 20}"
              f" MiB; " + ", ".join(f"{k}: {v >> 20 if isinstance(v, int) else v}"
                                    for k, v in figures.items()))  # fmt: skip
    finally:
        for sid in ids:
            http.delete(f"/api/v1/sandboxes/{sid}")
        for sid in ids:
            wait_for_state(http, sid, "destroyed", timeout=300)
    assert not list(disks.rglob("*.img")), "a disk was left behind"
