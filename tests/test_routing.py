"""Published ports through the edge (a real Traefik with its Docker provider): the route
appears with the sandbox, answers only for its host, is gone after the destroy; and no other
sandbox reaches the port directly over Docker's networks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest

from engine.backend.docker import ensure_edge_network, remove_labelled
from engine.host.edge import Edge, EdgeError
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import serve
from tests.conftest import ROOT

# A workspace-only template with port 8000 published (a sandbox in seconds).
LIVE = ROOT / "tests" / "fixtures" / "live-templates"


@pytest.fixture(scope="module")
def edge(settings: Settings) -> Edge:
    edge = Edge(settings)
    try:
        edge.start()  # leaves a running, unchanged Traefik alone
    except EdgeError as exc:
        pytest.fail(f"the local Traefik (make edge) cannot run: {exc}")
    return edge


@pytest.fixture
def api(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = Settings(
        database_url=database, pulumi_backend_url=f"file://{tmp_path}", templates_dir=LIVE
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="t", role=Role.MEMBER)
    try:
        with (
            serve(settings) as address,
            httpx.Client(
                base_url=f"http://{address}", timeout=120, headers={"X-API-Key": key}
            ) as http,
        ):
            yield {"http": http}
    finally:
        with psycopg.connect(database) as conn:
            for (sid,) in conn.execute("SELECT id FROM sandboxes").fetchall():
                remove_labelled(sid)


def running(http: httpx.Client, template: str) -> dict[str, Any]:
    created = http.post("/api/v1/sandboxes", json={"template": template, "ttl": "30m"})
    assert created.status_code == 202, created.text
    sid = created.json()["id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        body: dict[str, Any] = http.get(f"/api/v1/sandboxes/{sid}").json()
        if body["state"] == "running":
            return body
        assert body["state"] == "creating", body
        time.sleep(0.5)
    raise AssertionError(f"{sid} did not start")


def through_edge(edge: Edge, host: str) -> httpx.Response:
    return httpx.get(f"{edge.url}/", headers={"Host": host}, timeout=3)


def wait_status(edge: Edge, host: str, status: int, timeout: float = 60) -> object:
    """Poll until the edge answers ``status`` for ``host``; the last status (or error) seen."""
    deadline = time.monotonic() + timeout
    seen: object = None
    while time.monotonic() < deadline:
        try:
            seen = through_edge(edge, host).status_code
        except httpx.HTTPError as exc:  # a request caught mid-change of the route
            seen = repr(exc)
        if seen == status:
            break
        time.sleep(0.5)
    return seen


def can_connect(container: Any, address: str, port: int) -> bool:
    probe = f"timeout 3 bash -c 'echo > /dev/tcp/{address}/{port}'"
    return bool(container.exec_run(["bash", "-c", probe]).exit_code == 0)


def test_a_published_port_is_routed_by_host_and_only_by_host(
    edge: Edge, api: dict[str, Any], docker_client: docker.DockerClient, settings: Settings
) -> None:
    http: httpx.Client = api["http"]
    first = running(http, "web")
    sid = first["id"]
    host = f"{sid}-8000.{settings.domain}"
    assert first["endpoints"] == [{"port": 8000, "public": True, "url": f"http://{host}"}]
    workspace = docker_client.containers.get(first["workspace"])
    page = f"hello from {sid}"
    setup = f"mkdir -p /tmp/www && echo '{page}' > /tmp/www/index.html"
    assert workspace.exec_run(["bash", "-c", setup]).exit_code == 0
    workspace.exec_run(
        ["python3", "-m", "http.server", "8000", "--directory", "/tmp/www"], detach=True
    )

    assert wait_status(edge, host, 200) == 200
    response = through_edge(edge, host)
    assert response.status_code == 200 and response.text.strip() == page, response.text
    assert through_edge(edge, f"{sid}-8001.{settings.domain}").status_code == 404
    assert through_edge(edge, f"other-8000.{settings.domain}").status_code == 404

    # Another sandbox, also published (so also on the edge network), cannot reach it.
    second = running(http, "web")
    other = docker_client.containers.get(second["workspace"])
    workspace.reload()
    addresses = {
        name: net["IPAddress"]
        for name, net in workspace.attrs["NetworkSettings"]["Networks"].items()
    }
    assert set(addresses) == {f"sbx-{sid}-net", settings.edge_network}
    assert can_connect(workspace, "127.0.0.1", 8000)  # the probe works: the server is up
    for name, address in addresses.items():
        assert not can_connect(other, address, 8000), f"reached it over {name}"
    # Docker's DNS resolves the name on the shared edge network, but nothing gets through.
    assert not can_connect(other, first["workspace"], 8000)

    # After the destroy, the route is gone.
    assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
    assert wait_status(edge, host, 404) == 404
    assert http.delete(f"/api/v1/sandboxes/{second['id']}").status_code == 202
    deadline = time.monotonic() + 120
    while http.get(f"/api/v1/sandboxes/{second['id']}").json()["state"] != "destroyed":
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_the_edge_network_is_made_with_its_subnet_and_remade_only_when_unused(
    docker_client: docker.DockerClient,
) -> None:
    """Docker's pools give /26s (61 addresses); the edge network holds one address per
    published sandbox, so the engine makes it with SANDBOX_EDGE_SUBNET. An unused network of
    the name with another subnet is made again; one in use is kept until it is free."""
    name, subnet = "sandbox-edge-subnet-test", "10.211.250.0/28"

    def subnets() -> list[str]:
        config = docker_client.networks.get(name).attrs["IPAM"]["Config"] or []
        return [c["Subnet"] for c in config]

    def remove() -> None:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.networks.get(name).remove()

    remove()
    holder = None
    try:
        docker_client.networks.create(name, driver="bridge")  # from Docker's pool, not isolated
        ensure_edge_network(name, subnet)
        assert subnets() == [subnet]
        options = docker_client.networks.get(name).attrs["Options"]
        assert options["com.docker.network.bridge.enable_icc"] == "false"

        ensure_edge_network(name, "10.211.250.16/28")  # unused: made again
        assert subnets() == ["10.211.250.16/28"]

        holder = docker_client.containers.run(
            "sandbox-base:bookworm", ["sleep", "60"], network=name, detach=True, remove=True
        )
        ensure_edge_network(name, subnet)  # in use: kept as it is
        assert subnets() == ["10.211.250.16/28"]
    finally:
        if holder is not None:
            holder.remove(force=True)
        remove()
