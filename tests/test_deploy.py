"""The production deploy (deploy/docker-compose.prod.yml): the compose file validates, a
missing secret is named, and the whole stack — Traefik, PostgreSQL, the AI gateway and the
engine image, all built here — comes up, serves the API through Traefik over TLS, and makes a
sandbox whose published port answers through the same Traefik and whose Claude Code answers
through the gateway service (to a stand-in upstream on this host)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from engine.host import firewall
from tests.ai_upstream import serving
from tests.conftest import ROOT, remove_labelled, unmount_under
from tests.gateway_lock import gateway_port

COMPOSE = ROOT / "deploy" / "docker-compose.prod.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compose(env_file: Path, project: str, *args: str, check: bool = True) -> str:
    try:
        done = subprocess.run(
            [
                "docker-compose",
                "-p",
                project,
                "-f",
                str(COMPOSE),
                "--env-file",
                str(env_file),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            # the env file's settings, not this run's (compose prefers the environment's)
            env={k: v for k, v in os.environ.items() if k != "SANDBOX_DISK_DIR"},
        )
    except FileNotFoundError:
        pytest.fail("docker-compose is missing: deploy/local/packages.sh installs it")
    if check and done.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def env_file(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def test_the_compose_file_validates_and_names_a_missing_secret(tmp_path: Path) -> None:
    example = ROOT / "deploy" / ".env.example"
    out = compose(example, "sbxcheck", "config", check=False)
    assert "POSTGRES_PASSWORD" in out, out  # left empty in the example: named, not defaulted
    filled = tmp_path / "filled.env"
    filled.write_text(
        example.read_text()
        .replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=pw\n")
        .replace("SANDBOX_SECRET_KEY=\n", "SANDBOX_SECRET_KEY=key\n")
    )
    config = compose(filled, "sbxcheck", "config")
    assert "sandbox-engine:local" in config and "sandbox-traefik:local" in config


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    build = subprocess.run(
        [str(ROOT / "deploy" / "build.sh")], capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, f"deploy/build.sh failed:\n{build.stderr[-3000:]}"
    project = f"sbxsmoke{secrets.token_hex(3)}"
    ports = {"http": free_port(), "https": free_port(), "ping": free_port()}
    env = env_file(
        tmp_path_factory.mktemp("deploy") / "smoke.env",
        SANDBOX_DOMAIN="smoke.test",
        ACME_EMAIL="",
        ACME_CA_SERVER="https://127.0.0.1:1/directory",  # no ACME here: Traefik's own cert
        POSTGRES_PASSWORD=secrets.token_urlsafe(12),
        SANDBOX_SECRET_KEY=secrets.token_urlsafe(24),
        DOCKER_GID=str(os.stat("/var/run/docker.sock").st_gid),
        STACK_NAME=project,
        HTTP_PORT=str(ports["http"]),
        HTTPS_PORT=str(ports["https"]),
        TRAEFIK_PING_PORT=str(ports["ping"]),
    )
    made: list[str] = []
    # The sandboxes' disks, made by the engine's helper container on this host, in the run's
    # folder of disks (tests/conftest.py), through the env file.
    disks = Path(os.environ["SANDBOX_DISK_DIR"]) / project
    with serving() as (upstream_url, upstream):
        with env.open("a") as fh:
            fh.write(
                f"SANDBOX_DISK_DIR={disks}\n"
                f"SANDBOX_ANTHROPIC_UPSTREAM={upstream_url}\n"
                "SANDBOX_ANTHROPIC_API_KEY=sk-ant-api03-deploy-smoke\n"
                f"POSTGRES_HOST_PORT={free_port()}\n"
                f"SANDBOX_GATEWAY_METRICS_PORT={free_port()}\n"
            )
        try:
            # All but the AI gateway, whose port is taken in turn (tests/gateway_lock.py): the
            # test starts it when it needs it.
            compose(env, project, "up", "-d", "--no-build", "traefik", "firewall", "api")
            yield {
                "env": env,
                "project": project,
                "ports": ports,
                "sandboxes": made,
                "upstream": upstream,
                "disks": disks,
            }
        finally:
            for sid in made:
                remove_labelled(sid)
            compose(env, project, "down", "-v", "--remove-orphans", check=False)
            unmount_under(disks)


def _claude_when_the_gateway_answers(workspace: Any) -> Any:
    """``claude -p`` in the workspace once the gateway service listens (it starts in about a
    second; Claude Code would retry a refused connection for minutes)."""
    deadline = time.monotonic() + 60
    probe = "curl -s -o /dev/null -I -m 2 -w '%{http_code}' \"$ANTHROPIC_BASE_URL/\""
    settings = "/etc/claude-code/managed-settings.json"
    base = workspace.exec_run(["sh", "-c", f"grep -o 'http://[^\"]*' {settings} | head -1"])
    url = base.output.decode().strip()
    while time.monotonic() < deadline:
        ran = workspace.exec_run(["sh", "-c", probe.replace("$ANTHROPIC_BASE_URL", url)])
        if ran.output.decode().strip() == "200":
            break
        time.sleep(0.5)
    return workspace.exec_run(
        ["bash", "-lc", "cd ~/workspace && claude -p 'hello from the deploy'"], user="coder"
    )


def edge_get(d: dict[str, Any], host: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        kw.pop("method", "GET"),
        f"https://127.0.0.1:{d['ports']['https']}{path}",
        headers={"Host": host, **kw.pop("headers", {})},
        verify=False,  # noqa: S501  (no ACME here: Traefik answers with its default certificate)
        timeout=60,
        **kw,
    )


def test_the_stack_serves_the_api_and_sandboxes_through_traefik(
    deployment: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    d = deployment
    deadline = time.monotonic() + 180
    status: object = None
    while time.monotonic() < deadline:
        try:
            status = edge_get(d, "api.smoke.test", "/healthz").status_code
        except httpx.HTTPError as exc:
            status = repr(exc)
        if status == 200:
            break
        time.sleep(1)
    assert status == 200, f"{status}\n{compose(d['env'], d['project'], 'logs', '--tail', '40')}"
    plain = httpx.get(
        f"http://127.0.0.1:{d['ports']['http']}/healthz", headers={"Host": "api.smoke.test"}
    )
    assert plain.status_code in (301, 308) and plain.headers["location"].startswith("https://")

    # The firewall service keeps the host rules in place.
    assert "firewall:" in compose(d["env"], d["project"], "logs", "firewall")
    assert firewall.problems() == []

    # The first admin key is in a 0600 file in the state volume, not in the logs.
    key = compose(d["env"], d["project"], "exec", "-T", "api", "cat", "/app/.state/first-admin-key")
    key = key.strip()
    assert key.startswith("sek_")
    assert key not in compose(d["env"], d["project"], "logs", "api")
    auth = {"X-API-Key": key}

    created = edge_get(
        d,
        "api.smoke.test",
        "/api/v1/sandboxes",
        method="POST",
        headers=auth,
        json={"template": "backend-python", "ttl": "10m"},
    )
    assert created.status_code == 202, created.text
    sid = created.json()["id"]
    d["sandboxes"].append(sid)
    deadline = time.monotonic() + 300
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = edge_get(d, "api.smoke.test", f"/api/v1/sandboxes/{sid}", headers=auth).json()
        if body["state"] != "creating":
            break
        time.sleep(1)
    assert body["state"] == "running", body
    host = f"{sid}-8000.smoke.test"
    assert body["endpoints"][0]["url"] == f"https://{host}"
    workspace = docker_client.containers.get(body["workspace"])
    # Its home is a folder of its own disk, made on this host by the unprivileged engine's
    # helper container: the template sets no disk_limit, so the default 10Gi.
    home = docker_client.volumes.get(f"sbx-{sid}-home").attrs["Options"]
    assert home["device"].startswith(str(d["disks"])), home
    size = workspace.exec_run(["df", "-B1", "--output=size", "/home/coder"]).output.split()[-1]
    assert 9 * 2**30 < int(size) <= 10 * 2**30, size
    # Claude Code through the gateway service, with the operator's key added there only.
    with gateway_port():
        compose(d["env"], d["project"], "up", "-d", "--no-build", "gateway")
        try:
            said = _claude_when_the_gateway_answers(workspace)
        finally:
            compose(d["env"], d["project"], "stop", "gateway")
    assert said.exit_code == 0 and b"stand-in model" in said.output, said.output
    seen = d["upstream"].seen
    assert seen and {r.headers.get("x-api-key") for r in seen} == {"sk-ant-api03-deploy-smoke"}
    transcript = edge_get(
        d, "api.smoke.test", f"/api/v1/sandboxes/{sid}/ai/transcript", headers=auth
    ).json()
    assert "hello from the deploy" in str(transcript["items"]), transcript
    workspace.exec_run(["bash", "-c", "mkdir -p /tmp/w && echo deployed > /tmp/w/index.html"])
    workspace.exec_run(["python3", "-m", "http.server", "8000", "-d", "/tmp/w"], detach=True)
    deadline = time.monotonic() + 60
    page = None
    while time.monotonic() < deadline:
        try:
            page = edge_get(d, host, "/")
        except httpx.HTTPError:
            page = None
        if page is not None and page.status_code == 200:
            break
        time.sleep(1)
    assert page is not None and page.status_code == 200 and page.text.strip() == "deployed"

    gone = edge_get(d, "api.smoke.test", f"/api/v1/sandboxes/{sid}", method="DELETE", headers=auth)
    assert gone.status_code == 202
    deadline = time.monotonic() + 180
    while (
        edge_get(d, "api.smoke.test", f"/api/v1/sandboxes/{sid}", headers=auth).json()["state"]
        != "destroyed"
    ):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert not docker_client.containers.list(
        all=True, filters={"label": f"io.sandbox-engine.sandbox={sid}"}
    )
    assert not [p for p in d["disks"].rglob("*") if p.is_file()], "a disk was left behind"
