"""Faults of the machine under the engine: dockerd restarted while sandboxes run, PostgreSQL
restarted under load, the engine killed in a burst of creates, the state backend's disk full.

The first three restart shared services or load the machine, so they run alone
(``make test-slow``); the full disk is a tmpfs of the test's own. The engine runs as its
own process (tests/test_recovery.py's ``Engine``), as in production. Figures are printed
(``-s``) and reported in docs/security.md.
"""

from __future__ import annotations

import collections
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest

from api.app import DB_WAIT
from engine.backend.docker import engine_objects, remove_labelled
from engine.model.spec import L_ROLE, L_SANDBOX
from engine.settings import Settings
from tests.api_server import Engine, prepare
from tests.conftest import ROOT

LIVE = str(ROOT / "tests" / "fixtures" / "live-templates")


def _client(engine: Engine, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{engine.port}", headers={"X-API-Key": key}, timeout=30
    )


def _wait(http: httpx.Client, sid: str, states: tuple[str, ...], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = http.get(f"/api/v1/sandboxes/{sid}")
        if answer.status_code == 200:
            body = answer.json()
            if body["state"] in states:
                return body
        time.sleep(0.3)
    raise AssertionError(f"{sid} never reached {states}: {body}")


def _instance(database: str) -> str:
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT id FROM engine_instance").fetchone()
    assert row is not None
    return str(row[0])


def _workspace(client: docker.DockerClient, sid: str) -> Any:
    (found,) = client.containers.list(
        all=True, filters={"label": [f"{L_SANDBOX}={sid}", f"{L_ROLE}=workspace"]}
    )
    return found


@pytest.fixture
def engine(database: str, tmp_path: Path) -> Any:
    """An engine process reaping (and checking drift) every second; whatever a failing run
    left is removed at the end."""
    key, backend, env = prepare(
        database,
        tmp_path,
        SANDBOX_REAP_INTERVAL="1",
        SANDBOX_TEMPLATES_DIR=LIVE,
        SANDBOX_MAX_LIVE_SANDBOXES_PER_KEY="20",
    )
    process = Engine(env, tmp_path / "engine.log")
    process.start()
    yield process, key, backend
    process.stop()
    with psycopg.connect(database) as conn:
        for (sid,) in conn.execute("SELECT id FROM sandboxes").fetchall():
            remove_labelled(sid)


def _dockerd_pids() -> list[int]:
    found = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


@pytest.mark.slow
def test_dockerd_restart_while_sandboxes_run(
    engine: Any, database: str, docker_client: docker.DockerClient
) -> None:
    process, key, _ = engine
    with _client(process, key) as http:
        sid = http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"]
        _wait(http, sid, ("running",))
        before = _workspace(docker_client, sid)
        assert before.exec_run(["sh", "-c", "echo kept > ~/proof.txt"]).exit_code == 0
        # A process of the candidate's, as a shell would have (live-restore keeps it).
        before.exec_run(["sleep", "1000"], detach=True)
        started = before.attrs["State"]["StartedAt"]

        pids = _dockerd_pids()
        assert pids, "dockerd is not running"
        t0 = time.monotonic()
        subprocess.run(["kill", "-TERM", *map(str, pids)], check=True)
        while _dockerd_pids():
            assert time.monotonic() - t0 < 60, "dockerd did not stop"
            time.sleep(0.2)
        # Docker is gone: reads still answer (they are the database's) and a create fails
        # with a clear error, leaving nothing.
        assert http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "running"
        assert http.get("/api/v1/sandboxes").status_code == 200
        lost = http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"]
        failed = _wait(http, lost, ("failed", "running"), timeout=120)
        subprocess.run([str(ROOT / "deploy" / "local" / "dockerd.sh")], check=True)
        down = time.monotonic() - t0
        docker_client.ping()

        after = _workspace(docker_client, sid)
        survived = after.attrs["State"]["StartedAt"] == started
        processes = after.top()["Processes"] if after.status == "running" else []
        kept = after.exec_run(["cat", "/home/coder/proof.txt"])
        time.sleep(3)  # three reaper passes, each with a drift check
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        with psycopg.connect(database) as conn:
            events = [
                r[0]
                for r in conn.execute(
                    "SELECT message FROM sandbox_events WHERE sandbox_id = %s", (sid,)
                ).fetchall()
            ]
        fresh = http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"]
        fresh_state = _wait(http, fresh, ("running", "failed"))["state"]
        print(
            f"dockerd restart: down {down:.1f} s; sandbox {body['state']}, same container "
            f"{after.id == before.id}, processes kept {survived} "
            f"({sum('sleep 1000' in ' '.join(p) for p in processes)} sleep left), file kept "
            f"{kept.exit_code == 0}; create during the outage: {failed['state']} "
            f"({(failed.get('error') or '')[:120]}); create after: {fresh_state}"
        )
        assert after.id == before.id and after.status == "running"
        assert kept.exit_code == 0 and kept.output.strip() == b"kept"
        assert body["state"] == "running", body
        assert not [e for e in events if "repair" in e or "failed" in e], events
        assert failed["state"] == "failed" and "docker" in failed["error"].lower(), failed
        assert not docker_client.containers.list(all=True, filters={"label": f"{L_SANDBOX}={lost}"})
        assert fresh_state == "running"
        if docker_client.info().get("LiveRestoreEnabled"):
            assert survived, "live-restore is on, yet the workspace was restarted"
        for s in (sid, fresh):
            assert http.delete(f"/api/v1/sandboxes/{s}").status_code == 202
        for s in (sid, fresh):
            _wait(http, s, ("destroyed",))
    assert not engine_objects(_instance(database))


def _postgres(action: str) -> None:
    args = [str(ROOT / "deploy" / "local" / "postgres.sh"), *([action] if action else [])]
    subprocess.run(args, check=True, capture_output=True)


@pytest.mark.slow
def test_postgres_restart_under_load(
    engine: Any, database: str, docker_client: docker.DockerClient
) -> None:
    process, key, _ = engine
    with _client(process, key) as http:
        first = http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"]
        _wait(http, first, ("running",))

        log: list[tuple[float, str, int]] = []
        accepted: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with _client(process, key) as reader:
                while not stop.is_set():
                    for path in (f"/api/v1/sandboxes/{first}", "/api/v1/sandboxes"):
                        try:
                            code = reader.get(path).status_code
                        except httpx.HTTPError:
                            code = 0
                        log.append((time.monotonic(), "read", code))
                    time.sleep(0.02)

        def creates() -> None:
            with _client(process, key) as writer:
                while not stop.is_set():
                    answer = writer.post("/api/v1/sandboxes", json={"template": "web"})
                    log.append((time.monotonic(), "create", answer.status_code))
                    if answer.status_code == 202:
                        accepted.append(answer.json()["id"])
                    time.sleep(2.0)

        threads = [threading.Thread(target=load), threading.Thread(target=creates)]
        for t in threads:
            t.start()
        time.sleep(1)
        t_stop = time.monotonic()
        _postgres("stop")
        time.sleep(DB_WAIT + 2)  # longer than a request waits for a connection: 503s are due
        _postgres("")
        t_up = time.monotonic()
        time.sleep(7)
        stop.set()
        for t in threads:
            t.join()

        codes = collections.Counter((kind, code) for _, kind, code in log)
        late = [code for t, kind, code in log if t > t_up + 4 and code != 200 and kind == "read"]
        failed_at = [t for t, kind, code in log if kind == "read" and code != 200]
        print(
            f"postgres restart: down {t_up - t_stop:.1f} s; {len(log)} requests: "
            f"{dict(codes)}; reads failed from {min(failed_at, default=t_stop) - t_stop:+.1f} s "
            f"to {max(failed_at, default=t_up) - t_up:+.1f} s after it was back; "
            f"{len(accepted)} creates accepted, all running after"
        )
        assert {code for kind, code in codes if kind == "read"} <= {200, 503}, codes
        assert codes[("read", 503)] > 0  # the outage was seen…
        assert not late, late  # …and over within 4 s of PostgreSQL being back
        assert {code for kind, code in codes if kind == "create"} <= {202, 503}, codes
        for sid in [first, *accepted]:
            assert _wait(http, sid, ("running", "failed"))["state"] == "running", sid
        with psycopg.connect(database) as conn:
            rows = {r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()}
        assert rows == {first, *accepted}  # none lost, none twice
        assert set(engine_objects(_instance(database))) == rows
        for sid in rows:
            http.delete(f"/api/v1/sandboxes/{sid}")
        for sid in rows:
            _wait(http, sid, ("destroyed",))


@pytest.mark.slow
def test_engine_killed_during_a_burst_of_creates(
    engine: Any, database: str, docker_client: docker.DockerClient
) -> None:
    process, key, backend = engine
    with _client(process, key) as http:
        ids = [
            http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"] for _ in range(5)
        ]
        # Some are done, some mid-way, some still queued for a stack thread.
        deadline = time.monotonic() + 120
        while not any(http.get(f"/api/v1/sandboxes/{s}").json()["state"] == "running" for s in ids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        states_at_kill = collections.Counter(
            http.get(f"/api/v1/sandboxes/{s}").json()["state"] for s in ids
        )
    process.kill9()
    process.start()
    with _client(process, key) as http:
        final = {s: _wait(http, s, ("running", "failed"))["state"] for s in ids}
        errors = {
            s: http.get(f"/api/v1/sandboxes/{s}").json()["error"]
            for s, st in final.items()
            if st == "failed"
        }
    settings = Settings(database_url=database, pulumi_backend_url=backend)
    objects = engine_objects(_instance(database))
    print(
        f"engine killed in a burst of {len(ids)} creates: at the kill {dict(states_at_kill)}; "
        f"after the restart {dict(collections.Counter(final.values()))}; "
        f"Docker objects of failed ones {sum(1 for s in errors if s in objects)}"
    )
    assert states_at_kill["running"] >= 1 and states_at_kill["creating"] >= 1, states_at_kill
    for sid, error in errors.items():
        assert "cleaned up" in error, error
        assert sid not in objects
        assert not (settings.stack_config_path / f"Pulumi.sbx-{sid}.yaml").exists()
    assert {s for s, st in final.items() if st == "running"} == set(objects)
    with _client(process, key) as http:
        for sid in ids:
            http.delete(f"/api/v1/sandboxes/{sid}")
        for sid in ids:
            _wait(http, sid, ("destroyed", "failed"))
    assert not engine_objects(_instance(database))


def test_a_full_state_backend_is_a_clear_error(
    database: str, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(full)], check=True)
    try:
        key, _, env = prepare(
            database, tmp_path, SANDBOX_REAP_INTERVAL="0", SANDBOX_TEMPLATES_DIR=LIVE
        )
        env["SANDBOX_PULUMI_BACKEND_URL"] = f"file://{full}"
        # Filled to the last block, as a disk that ran out.
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={full / 'filler'}", "bs=4k"], capture_output=True
        )
        process = Engine(env, tmp_path / "engine.log")
        process.start()
        try:
            with _client(process, key) as http:
                sid = http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"]
                body = _wait(http, sid, ("failed", "running"))
                print(f"state backend full: {body['state']}: {body.get('error')}")
                assert body["state"] == "failed"
                assert "no space left on device" in body["error"].lower(), body
                assert not docker_client.containers.list(
                    all=True, filters={"label": f"{L_SANDBOX}={sid}"}
                )
                # Room again: the next create works.
                (full / "filler").unlink()
                again = http.post("/api/v1/sandboxes", json={"template": "web"}).json()["id"]
                assert _wait(http, again, ("running", "failed"))["state"] == "running"
                http.delete(f"/api/v1/sandboxes/{again}")
                _wait(http, again, ("destroyed",))
        finally:
            process.stop()
            with psycopg.connect(database) as conn:
                for (left,) in conn.execute("SELECT id FROM sandboxes").fetchall():
                    remove_labelled(left)
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
