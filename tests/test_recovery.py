"""kill -9 of the engine in the middle of a create and of a destroy: after a restart, each
sandbox ends settled (an interrupted destroy archived once) and nothing of it is left in Docker
or the Pulumi backend."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import psycopg
import pytest

from engine.settings import Settings
from tests.api_server import (
    Engine,
    engine_http,
    nothing_left,
    prepare,
    wait_for_event,
    wait_for_state,
)
from tests.conftest import ROOT, remove_labelled


@pytest.fixture
def engine(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    key, backend, env = prepare(
        database,
        tmp_path,
        SANDBOX_REAP_INTERVAL="0",
        SANDBOX_ARCHIVES_DIR=str(tmp_path / "archives"),
    )
    process = Engine(env, tmp_path / "engine.log")
    yield {"engine": process, "key": key, "backend": backend}
    process.stop()
    # Whatever a failing run left: nothing of its sandboxes outlives the test.
    with psycopg.connect(database) as conn:
        for (sid,) in conn.execute("SELECT id FROM sandboxes").fetchall():
            remove_labelled(sid)


def test_kill_during_create_and_during_destroy(
    engine: dict[str, Any], docker_client: docker.DockerClient, database: str
) -> None:
    proc: Engine = engine["engine"]
    settings = Settings(database_url=database, pulumi_backend_url=engine["backend"])

    # 1. Killed while the containers are being created.
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        sid = http.post("/api/v1/sandboxes", json={"template": "backend-go"}).json()["id"]
        wait_for_event(database, sid, "create docker:index/container:Container")
        proc.kill9()
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        assert body["state"] == "failed" and "during the create; cleaned up" in body["error"], body
    nothing_left(docker_client, settings, sid)

    # 2. Killed while a running sandbox is being destroyed.
    with engine_http(proc, engine["key"]) as http:
        sid = http.post("/api/v1/sandboxes", json={"template": "backend-go"}).json()["id"]
        deadline = time.monotonic() + 180
        while http.get(f"/api/v1/sandboxes/{sid}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
        wait_for_event(database, sid, "delete docker:index/container:Container")
        proc.kill9()
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        assert body["state"] == "destroyed", body
        # Its archive was made before the kill, and is not made again.
        archives = http.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
        assert [a["reason"] for a in archives] == ["deleted"], archives
    nothing_left(docker_client, settings, sid)

    # 3. Killed after a delete was taken but before its archive was made: the sandbox is left
    # `destroying` with no archive (the row set as such a crash leaves it). The recovery
    # archives the workspace, then finishes the destroy.
    with engine_http(proc, engine["key"]) as http:
        sid = http.post("/api/v1/sandboxes", json={"template": "backend-go"}).json()["id"]
        wait_for_state(http, sid, "running")
        workspace = http.get(f"/api/v1/sandboxes/{sid}").json()["workspace"]
    made = docker_client.containers.get(workspace).exec_run(
        ["sh", "-c", "echo 'my answer' > /home/coder/answer.txt"], user="coder"
    )
    assert made.exit_code == 0, made.output
    proc.kill9()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "UPDATE sandboxes SET state = 'destroying', reason = 'request' WHERE id = %s", (sid,)
        )
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        wait_for_state(http, sid, "destroyed")
        [archive] = http.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
        assert (archive["reason"], archive["error"]) == ("deleted", None), archive
        got = http.get(archive["download"])
        with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
            answer = tar.extractfile("home/coder/answer.txt")
            assert answer is not None and answer.read() == b"my answer\n"
    nothing_left(docker_client, settings, sid)


def test_two_engine_processes_share_a_database(
    database: str, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Two engines on one database: the second one starting (and reconciling) while the first
    is creating leaves the first one's creates alone; then both reap, and each expired
    sandbox is destroyed exactly once."""
    key, backend, env = prepare(
        database,
        tmp_path,
        SANDBOX_REAP_INTERVAL="1",
        SANDBOX_WARN_BEFORE="0",
        SANDBOX_TEMPLATES_DIR=str(ROOT / "tests" / "fixtures" / "live-templates"),
    )
    first, second = Engine(env, tmp_path / "a.log"), Engine(env, tmp_path / "b.log")
    ids: list[str] = []
    try:
        first.start()
        with engine_http(first, key) as http:
            for _ in range(3):
                created = http.post("/api/v1/sandboxes", json={"template": "web", "ttl": "15s"})
                assert created.status_code == 202, created.text
                ids.append(created.json()["id"])
        second.start()  # reconciles at start, while the first engine's creates run
        deadline = time.monotonic() + 400
        with psycopg.connect(database, autocommit=True) as conn:
            while time.monotonic() < deadline:
                states = dict(conn.execute("SELECT id, state FROM sandboxes").fetchall())
                if all(s in ("expired", "failed", "destroyed") for s in states.values()):
                    break
                time.sleep(1)
            rows = conn.execute("SELECT id, state, reason, error FROM sandboxes").fetchall()
            claims = dict(
                conn.execute(
                    "SELECT sandbox_id, count(*) FROM sandbox_events"
                    " WHERE kind = 'state' AND message = 'destroying (ttl)' GROUP BY sandbox_id"
                ).fetchall()
            )
            recovered = conn.execute(
                "SELECT count(*) FROM sandbox_events WHERE message LIKE 'recovering%'"
            ).fetchone()
        assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
            (i, "expired", "ttl") for i in ids
        ), rows
        assert claims == dict.fromkeys(ids, 1)
        assert recovered == (0,)
    finally:
        first.stop()
        second.stop()
        for sid in ids:
            remove_labelled(sid)
    settings = Settings(database_url=database, pulumi_backend_url=backend)
    for sid in ids:
        nothing_left(docker_client, settings, sid)
