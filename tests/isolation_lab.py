"""The isolation tests' lab: an engine process listening on every address, two sandboxes of the
light web template (an attacker and its neighbour), and a TCP service on every host address.
Each module makes its own, as a module-scoped fixture over ``make_lab``."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from engine.host import firewall
from engine.model.spec import L_ROLE, L_SANDBOX
from tests.api_server import Engine, prepare, wait_for_state

ROOT = Path(__file__).resolve().parent.parent
LIVE = ROOT / "tests" / "fixtures" / "live-templates"
ATTACKS = (ROOT / "tests" / "fixtures" / "attacks.py").read_text()
SERVED = 8000  # the port the other sandbox listens on (the web template publishes it)


@dataclass
class Lab:
    http: httpx.Client
    api_port: int
    listener_port: int
    a: Any  # the attacker's workspace container
    b: Any  # the neighbour's workspace container
    ids: list[str]


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
) -> Iterator[Lab]:
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
                yield Lab(http, engine.port, listener_port, a, b, ids)
            finally:
                for sid in ids:
                    http.delete(f"/api/v1/sandboxes/{sid}")
                for sid in ids:
                    wait_for_state(http, sid, "destroyed")
    finally:
        engine.stop()
        server.close()
