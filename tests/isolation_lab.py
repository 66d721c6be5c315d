"""The isolation tests' lab: an engine process listening on every address, two sandboxes of the
light web template (an attacker and its neighbour), and a TCP service on every host address.
Each module makes its own, as a module-scoped fixture over ``make_lab``, once per runtime
(``runtime="runsc"``: both sandboxes under gVisor, through ``SANDBOX_RUNTIME``)."""

from __future__ import annotations

import io
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from engine.host import firewall
from engine.model.spec import L_ROLE, L_SANDBOX
from engine.terminal.session import TMUX_COMMAND
from tests.api_server import Engine, prepare, wait_for_state

ROOT = Path(__file__).resolve().parent.parent
LIVE = ROOT / "tests" / "fixtures" / "live-templates"
ATTACKS = (ROOT / "tests" / "fixtures" / "attacks.py").read_text()
SERVED = 8000  # the port the other sandbox listens on (the web template publishes it)
RUNTIMES = ("runc", "runsc")  # what a lab fixture is parametrized over


@dataclass
class Lab:
    http: httpx.Client
    api_port: int
    listener_port: int
    a: Any  # the attacker's workspace container
    b: Any  # the neighbour's workspace container
    ids: list[str]
    runtime: str = "runc"  # both sandboxes': "runc" (Docker's default) or "runsc" (gVisor)


def _listener() -> tuple[socket.socket, int]:
    """A TCP service on every host address, as an SSH daemon or a database would be."""
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, port


def in_shell(container: Any, script: str, arg: str, timeout: float = 300) -> tuple[int, str]:
    """Run a Python script as the candidate's commands run: in a window of the workspace's
    tmux session, started as the engine's terminal starts it (under the image's seccomp
    filter, sandbox-confine), not straight from a ``docker exec``. Returns its exit code and
    output."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in (("attack.py", script), ("attack.arg", arg)):
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.mode = len(data), 1000, 1000, 0o600
            tar.addfile(info, io.BytesIO(data))
    folder = "/tmp/lab-" + str(time.monotonic_ns())
    assert container.exec_run(["mkdir", "-m", "700", folder], user="coder").exit_code == 0
    assert container.put_archive(folder, buffer.getvalue())
    command = (
        f'cd {folder} && python3 attack.py "$(cat attack.arg)" > out 2>&1; echo $? > rc.tmp'
        " && mv rc.tmp rc"
    )
    # The session as the terminal starts it (when no terminal has yet).
    container.exec_run(
        ["bash", "-c", f"{TMUX_COMMAND} new-session -d -s main 2>/dev/null; true"], user="coder"
    )
    started = container.exec_run(["tmux", "new-window", "-d", "-t", "main", command], user="coder")
    assert started.exit_code == 0, started.output.decode()
    deadline = time.monotonic() + timeout
    while container.exec_run(["test", "-f", f"{folder}/rc"]).exit_code != 0:
        assert time.monotonic() < deadline, "the script in the tmux session did not finish"
        time.sleep(0.2)
    rc = container.exec_run(["cat", f"{folder}/rc"]).output.decode().strip()
    out = container.exec_run(["cat", f"{folder}/out"]).output.decode("utf-8", "replace")
    container.exec_run(["rm", "-rf", folder])
    return int(rc), out


def _workspace(client: docker.DockerClient, sandbox_id: str) -> Any:
    found = client.containers.list(
        filters={"label": [f"{L_SANDBOX}={sandbox_id}", f"{L_ROLE}=workspace"]}
    )
    assert len(found) == 1, found
    return found[0]


def make_lab(
    module_database: str,
    tmp_path_factory: pytest.TempPathFactory,
    docker_client: docker.DockerClient,
    *,
    runtime: str = "runc",
) -> Iterator[Lab]:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: one of {RUNTIMES}")
    if runtime not in (docker_client.info().get("Runtimes") or {}):
        pytest.fail(f"dockerd has no runtime {runtime}: make setup registers runsc")
    missing = firewall.problems()
    if missing:
        pytest.fail(
            "the host firewall is not in place (sandbox-engine firewall apply): "
            + "; ".join(missing)
        )
    # The engine as its own process, as in production: the latencies below are its own, not
    # the test interpreter's, and it listens on every address, as a careless deploy would.
    key, _, env = prepare(
        module_database,
        tmp_path_factory.mktemp("pulumi-state"),
        SANDBOX_TEMPLATES_DIR=str(LIVE),
        SANDBOX_MAX_LIVE_SANDBOXES_PER_KEY="2",
        SANDBOX_LISTEN_HOST="0.0.0.0",
        SANDBOX_RUNTIME=runtime,  # the web template sets none
    )
    engine = Engine(env, tmp_path_factory.mktemp("engine") / "engine.log")
    server, listener_port = _listener()
    ids: list[str] = []
    engine.start()
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{engine.port}", headers={"X-API-Key": key}, timeout=120
        ) as http:
            try:
                for _ in range(2):
                    made = http.post("/api/v1/sandboxes", json={"template": "web"})
                    assert made.status_code == 202, made.text
                    ids.append(made.json()["id"])
                for sid in ids:
                    wait_for_state(http, sid, "running")
                a, b = (_workspace(docker_client, sid) for sid in ids)
                yield Lab(http, engine.port, listener_port, a, b, ids, runtime)
            finally:
                for sid in ids:
                    http.delete(f"/api/v1/sandboxes/{sid}")
                for sid in ids:
                    wait_for_state(http, sid, "destroyed")
    finally:
        engine.stop()
        server.close()
