"""A sandbox under gVisor (``runtime: runsc``, docs/security.md): each part of it works as
under runc — the terminal, task seeding, services by name, a port published through Traefik,
the archive — while its system calls go to gVisor's kernel, not the host's. Claude Code
through the AI gateway under runsc: tests/test_claude.py. A runtime dockerd does not have is
refused before anything is made."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import websockets

from engine.backend.docker import DockerBackend
from engine.host.edge import Edge, EdgeError
from engine.model.spec import L_SANDBOX, L_TEMPLATE
from engine.settings import Settings
from tests.api_server import Terminal, member_api, wait_for_state
from tests.conftest import ROOT
from tests.provider_helpers import leftovers

TEMPLATES = ROOT / "tests" / "fixtures" / "runsc-templates"
SERVED = "served-from-gvisor"


@pytest.fixture
def api(database: str, tmp_path: Path, settings: Settings) -> Iterator[httpx.Client]:
    try:
        Edge(settings).start()  # leaves a running, unchanged Traefik alone
    except EdgeError as exc:
        pytest.fail(f"the local Traefik (make edge) cannot run: {exc}")
    with member_api(database, tmp_path, TEMPLATES, reap_interval=0) as http:
        yield http


def _sh(container: Any, command: str) -> str:
    ran = container.exec_run(["bash", "-lc", command], user="coder")
    assert ran.exit_code == 0, (command, ran.output)
    return str(ran.output.decode())


def test_a_sandbox_under_gvisor_works_as_under_runc(
    api: httpx.Client, docker_client: docker.DockerClient, settings: Settings
) -> None:
    if "runsc" not in (docker_client.info().get("Runtimes") or {}):
        pytest.fail("dockerd has no runtime runsc: make setup registers it")
    started = time.monotonic()
    made = api.post("/api/v1/sandboxes", json={"template": "gvisor"})
    assert made.status_code == 202, made.text
    sid = made.json()["id"]
    wait_for_state(api, sid, "running")
    took = time.monotonic() - started
    body = api.get(f"/api/v1/sandboxes/{sid}").json()
    try:
        ours = docker_client.containers.list(filters={"label": f"{L_SANDBOX}={sid}"})
        assert len(ours) == 3 and {c.attrs["HostConfig"]["Runtime"] for c in ours} == {"runsc"}
        workspace = docker_client.containers.get(body["workspace"])
        # gVisor's kernel answers, not the host's.
        assert _sh(workspace, "uname -r").strip() == "4.4.0"
        # The task was seeded into the workdir.
        assert "README.md" in _sh(workspace, "ls")
        # Services by name on the sandbox's network.
        pong = "exec 3<>/dev/tcp/redis/6379; printf 'PING\\r\\n' >&3; head -c 7 <&3"
        assert _sh(workspace, pong).startswith("+PONG")
        connect = "import socket; socket.create_connection(('postgres', 5432), 10).close()"
        _sh(workspace, f'python3 -c "{connect}"')
        # The terminal, over the WebSocket.
        url = f"ws://{api.base_url.host}:{api.base_url.port}/api/v1/ws/terminal/{sid}"
        url += f"?token={api.headers['X-API-Key']}"

        async def echo() -> None:
            async with websockets.connect(url) as ws:
                term = Terminal(ws)
                await term.type("echo gvisor-$((6*7)) > answer.txt; cat answer.txt\r")
                await term.expect("gvisor-42", within=30)

        asyncio.run(echo())
        # A port published through Traefik.
        workspace.exec_run(
            [
                "sh",
                "-c",
                "cd /tmp && echo served-from-gvisor > index.html && python3 -m http.server 8000",
            ],
            user="coder",
            detach=True,
        )
        host = f"{sid}-8000.{settings.domain}"
        deadline = time.monotonic() + 60
        got: httpx.Response | None = None
        while time.monotonic() < deadline:
            try:
                got = httpx.get(
                    f"http://{settings.edge_host}:{settings.edge_port}/",
                    headers={"Host": host},
                    timeout=3,
                )
                if got.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert got is not None and got.status_code == 200 and SERVED in got.text
    finally:
        assert api.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
        wait_for_state(api, sid, "destroyed")
    # The archive holds what the candidate wrote inside gVisor.
    [archive] = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
    assert archive["error"] is None, archive
    with tarfile.open(fileobj=io.BytesIO(api.get(archive["download"]).content)) as tar:
        answer = tar.extractfile("home/coder/workspace/answer.txt")
        assert answer is not None and answer.read() == b"gvisor-42\n"
    assert leftovers(docker_client, f"sbx-{sid}") == []
    print(f"gvisor sandbox (postgres, redis, a published port) running in {took:.1f} s")


def test_a_runtime_dockerd_does_not_have_is_refused_before_anything_is_made(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> None:
    # The daemon's answer is the seam: a dockerd where runsc was never registered.
    monkeypatch.setattr(DockerBackend, "runtimes", lambda self: ["runc"])
    made = api.post("/api/v1/sandboxes", json={"template": "gvisor"})
    assert made.status_code == 422, made.text
    assert made.headers["content-type"] == "application/problem+json"
    problem = made.json()
    assert "runsc runtime, which dockerd does not have" in problem["detail"], problem
    assert "template" in str(problem), problem
    assert api.get("/api/v1/sandboxes").json()["items"] == []
    assert docker_client.containers.list(all=True, filters={"label": f"{L_TEMPLATE}=gvisor"}) == []
