"""The workspace and service images: built offline, each one run for real."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import docker
import psycopg
import pytest

from engine.host.images import IMAGES, build
from tests.conftest import ROOT, TEST_LABEL

WORKSPACES = ["workspace-base", "workspace-python", "workspace-node", "workspace-go"]


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> dict[str, str]:
    """`make test` builds the images first; this only confirms nothing is left to build."""
    lines: list[str] = []
    results = build(ROOT / "images", progress=lines.append, client=docker_client)
    return results


def run(client: docker.DockerClient, image: str, command: str, **kwargs: object) -> str:
    out = client.containers.run(
        f"{image}:latest", ["bash", "-lc", command], remove=True, labels={TEST_LABEL: "1"}, **kwargs
    )
    return out.decode().strip()


def test_a_second_build_with_nothing_changed_builds_nothing(
    images: dict[str, str], docker_client: docker.DockerClient
) -> None:
    again = build(ROOT / "images", progress=lambda _: None, client=docker_client)
    assert again == {i.name: "up to date" for i in IMAGES}


@pytest.mark.parametrize("image", WORKSPACES)
def test_claude_code_runs_as_coder(
    images: dict[str, str], docker_client: docker.DockerClient, image: str
) -> None:
    out = run(docker_client, image, "id -un; id -u; echo $HOME; claude --version")
    user, uid, home, version = out.splitlines()
    assert (user, uid, home) == ("coder", "1000", "/home/coder")
    labels = docker_client.images.get(f"{image}:latest").labels
    assert version == f"{labels['io.sandbox-engine.claude-code']} (Claude Code)"


@pytest.mark.parametrize(
    ("image", "command", "expected"),
    [
        (
            "workspace-base",
            "node --version; git --version; tmux -V",
            ["v22.", "git version", "tmux"],
        ),
        (
            "workspace-python",
            "python3 --version; pip --version; uv --version;"
            " python3 -m venv /tmp/v && /tmp/v/bin/python -c 'print(\"venv ok\")'",
            ["Python 3.11", "pip ", "uv 0.", "venv ok"],
        ),
        (
            "workspace-node",
            "node --version; npm --version; cd /tmp && npm init -y >/dev/null &&"
            " node -e 'console.log(\"node ok\")'",
            ["v22.", "10.", "node ok"],
        ),
        (
            "workspace-go",
            'go version; cd /tmp && printf \'package main\\nimport "fmt"\\n'
            'func main() { fmt.Println("go ok") }\\n\' > m.go && go run m.go',
            ["go version go1.26", "go ok"],
        ),
    ],
)
def test_language_toolchains(
    images: dict[str, str],
    docker_client: docker.DockerClient,
    image: str,
    command: str,
    expected: list[str],
) -> None:
    lines = run(docker_client, image, command).splitlines()
    assert len(lines) == len(expected), lines
    for line, prefix in zip(lines, expected, strict=True):
        assert line.startswith(prefix), (line, prefix)


@pytest.fixture
def claude_dir(docker_client: docker.DockerClient) -> Iterator[str]:
    """A volume to mount at ~/.claude (as an operator's own docker run might)."""
    volume = docker_client.volumes.create(
        f"claude-dir-test-{secrets.token_hex(3)}", labels={TEST_LABEL: "1"}
    )
    yield volume.name
    volume.remove(force=True)


def test_started_as_root_the_entrypoint_fixes_ownership_and_drops_to_coder(
    images: dict[str, str], docker_client: docker.DockerClient, claude_dir: str
) -> None:
    mounts = {claude_dir: {"bind": "/home/coder/.claude", "mode": "rw"}}
    # Make the mount root-owned, as a bind mount or a volume made by another tool would be.
    docker_client.containers.run(
        "workspace-base:latest",
        ["chown", "0:0", "/home/coder/.claude"],
        user="root",
        entrypoint=[],
        volumes=mounts,
        remove=True,
        labels={TEST_LABEL: "1"},
    )
    out = (
        docker_client.containers.run(
            "workspace-base:latest",
            ["bash", "-c", "id -u; stat -c %u /home/coder/.claude"],
            user="root",
            volumes=mounts,
            remove=True,
            labels={TEST_LABEL: "1"},
        )
        .decode()
        .split()
    )
    assert out == ["1000", "1000"]


def test_idle_workspace_uses_no_cpu(
    images: dict[str, str], docker_client: docker.DockerClient
) -> None:
    container = docker_client.containers.run(
        "workspace-base:latest", detach=True, labels={TEST_LABEL: "1"}
    )
    try:
        time.sleep(1)
        _, out = container.exec_run(["ps", "-o", "comm=", "-p", "1"])
        assert out.decode().strip() == "tini"
        assert container.top()["Processes"][-1][-1].startswith("sleep")
        # One stats sample spans about a second: an idle workspace uses (almost) no CPU in it.
        stats = container.stats(stream=False)
        used_ns = (
            stats["cpu_stats"]["cpu_usage"]["total_usage"]
            - stats["precpu_stats"]["cpu_usage"]["total_usage"]
        )
        assert used_ns < 50_000_000, f"idle workspace used {used_ns / 1e6:.0f} ms of CPU"
    finally:
        container.remove(force=True)


def _published(container: docker.models.containers.Container, port: str) -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


def _wait_healthy(container: docker.models.containers.Container, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        status = container.attrs["State"].get("Health", {}).get("Status")
        if status == "healthy":
            return
        assert container.status != "exited", container.logs().decode()
        time.sleep(0.5)
    raise AssertionError(f"{container.name} not healthy: {container.logs().decode()[-500:]}")


def test_service_postgres_becomes_healthy_and_accepts_a_client(
    images: dict[str, str], docker_client: docker.DockerClient
) -> None:
    password = secrets.token_hex(8)
    container = docker_client.containers.run(
        "service-postgres:latest",
        detach=True,
        labels={TEST_LABEL: "1"},
        environment={"POSTGRES_USER": "app", "POSTGRES_PASSWORD": password, "POSTGRES_DB": "appdb"},
        ports={"5432/tcp": ("127.0.0.1", None)},
    )
    try:
        _wait_healthy(container)
        port = _published(container, "5432/tcp")
        url = f"postgresql://app:{password}@127.0.0.1:{port}/appdb"
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("select current_user, current_database()").fetchone()
        assert row == ("app", "appdb")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url.replace(password, "wrong"), connect_timeout=10).close()
        assert container.exec_run(["id", "-un"]).output.decode().strip() == "postgres"
    finally:
        container.remove(force=True, v=True)


def test_service_redis_becomes_healthy_and_answers_ping(
    images: dict[str, str], docker_client: docker.DockerClient
) -> None:
    container = docker_client.containers.run(
        "service-redis:latest",
        detach=True,
        labels={TEST_LABEL: "1"},
        ports={"6379/tcp": ("127.0.0.1", None)},
    )
    try:
        _wait_healthy(container)
        with socket.create_connection(("127.0.0.1", _published(container, "6379/tcp")), 5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(16) == b"+PONG\r\n"
        assert container.exec_run(["id", "-un"]).output.decode().strip() == "redis"
    finally:
        container.remove(force=True, v=True)
