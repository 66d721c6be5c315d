"""Stopping the engine (SIGTERM, SIGINT) with work in flight, on a template with services.

What a stop does (docs/operations.md, "Stopping the engine"): requests and stack operations in
flight get SANDBOX_STOP_TIMEOUT to finish; a Pulumi run cut short by the stop — a service
manager signals the engine and every process under it — is no failure of its sandbox, which is
left mid-operation for the next start's recovery; recovery ends every sandbox in its final
state (an interrupted destroy destroyed, an interrupted create failed and cleaned up) with
nothing of it left in Docker or the Pulumi backend.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest

from engine.backend.docker import remove_container, remove_labelled
from engine.settings import Settings
from tests.api_server import (
    Engine,
    engine_http,
    nothing_left,
    prepare,
    wait_for_event,
    wait_for_state,
)
from tests.conftest import ROOT, TEST_LABEL

TEMPLATES = ROOT / "tests" / "fixtures" / "stop-templates"


@pytest.fixture
def engine(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    key, backend, env = prepare(
        database,
        tmp_path,
        SANDBOX_REAP_INTERVAL="0",
        SANDBOX_TEMPLATES_DIR=str(TEMPLATES),
        SANDBOX_ARCHIVES_DIR=str(tmp_path / "archives"),
        SANDBOX_STOP_TIMEOUT="60",
    )
    process = Engine(env, tmp_path / "engine.log")
    settings = Settings(database_url=database, pulumi_backend_url=backend)
    yield {"engine": process, "key": key, "settings": settings, "database": database}
    process.stop()
    with psycopg.connect(database) as conn:
        for (sid,) in conn.execute("SELECT id FROM sandboxes").fetchall():
            remove_labelled(sid)


def _row(database: str, sid: str) -> tuple[str, str | None]:
    with psycopg.connect(database) as conn:
        found = conn.execute("SELECT state, error FROM sandboxes WHERE id = %s", (sid,)).fetchone()
    assert found is not None
    return found[0], found[1]


def _stop_everything(proc: Engine, sig: signal.Signals = signal.SIGTERM) -> None:
    """A service manager's stop: ``sig`` to the engine and every process under it at once
    (its Pulumi runs, their provider and language host, the shared provider)."""
    signalled = proc.signal_all(sig)
    assert len(signalled) > 2, "the engine had no Pulumi run going"
    proc.wait(timeout=120)
    left = [pid for pid in signalled if Path(f"/proc/{pid}").exists()]
    assert not left, f"processes of the stopped engine still run: {left}"


def _running(http: httpx.Client, template: str = "stoppable") -> str:
    made = http.post("/api/v1/sandboxes", json={"template": template})
    assert made.status_code == 202, made.text
    sid = str(made.json()["id"])
    wait_for_state(http, sid, "running")
    return sid


def test_a_stop_mid_destroy_is_finished_by_the_next_start(
    engine: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    proc: Engine = engine["engine"]
    database = engine["database"]
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        sid = _running(http)
        assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
        wait_for_event(database, sid, "delete docker:index/container:Container")
    _stop_everything(proc)
    # Cut short by the stop: not a failure. (A destroy that got to its end first is done.)
    state, error = _row(database, sid)
    assert state in ("destroying", "destroyed"), (state, error)
    if state == "destroying":
        wait_for_event(database, sid, "the interrupted destroy is settled at its next start")
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        wait_for_state(http, sid, "destroyed")
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        assert body["error"] is None, body
        # Archived once, before the stop; recovery does not archive again.
        archives = http.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
        assert [a["reason"] for a in archives] == ["deleted"], archives
    nothing_left(docker_client, engine["settings"], sid)


def test_a_stop_mid_create_is_cleaned_up_by_the_next_start(
    engine: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    proc: Engine = engine["engine"]
    database = engine["database"]
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        made = http.post("/api/v1/sandboxes", json={"template": "stoppable"})
        assert made.status_code == 202, made.text
        sid = made.json()["id"]
        wait_for_event(database, sid, "create docker:index/container:Container")
    _stop_everything(proc)
    state, error = _row(database, sid)
    assert state in ("creating", "running"), (state, error)
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        if state == "running":  # it got to its end before the stop cut it: it stays
            assert http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "running"
            assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
            wait_for_state(http, sid, "destroyed")
        else:
            deadline = time.monotonic() + 180
            while (body := http.get(f"/api/v1/sandboxes/{sid}").json())["state"] == "creating":
                assert time.monotonic() < deadline, body
                time.sleep(0.5)
            assert body["state"] == "failed", body
            assert body["error"] == "the engine stopped during the create; cleaned up", body
    nothing_left(docker_client, engine["settings"], sid)


def test_a_container_docker_is_already_removing_is_waited_for(
    docker_client: docker.DockerClient,
) -> None:
    """Removals of one container at once (a destroy cut short and its recovery): Docker
    answers all but one 409 "removal … already in progress" (a 300 MB layer keeps the first
    busy long enough, every time); remove_container waits until the container is gone."""
    container = docker_client.containers.run(
        "sandbox-base:bookworm",
        ["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=300 && sleep 300"],
        detach=True,
        labels={TEST_LABEL: "1"},
    )
    ident = str(container.id)
    deadline = time.monotonic() + 60
    while b"300+0 records out" not in container.logs():
        assert time.monotonic() < deadline, container.logs()
        time.sleep(0.2)
    raw: list[str] = []
    ours: list[str] = []

    def remove_raw() -> None:
        try:
            docker_client.api.remove_container(ident, force=True, v=True)
            raw.append("removed")
        except docker.errors.APIError as exc:
            raw.append(f"{exc.status_code}")

    def remove_ours() -> None:
        try:
            remove_container(docker_client, ident)
            docker_client.api.inspect_container(ident)
            ours.append("still there after remove_container returned")
        except docker.errors.NotFound:
            ours.append("gone")
        except Exception as exc:
            ours.append(repr(exc))

    threads = [threading.Thread(target=f) for f in (remove_raw, remove_ours, remove_ours)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert ours == ["gone", "gone"], (ours, raw)
