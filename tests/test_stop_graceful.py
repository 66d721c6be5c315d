"""Stopping the engine gracefully (SIGINT or SIGTERM to the engine alone, as Ctrl-C or a
container stop does) with a create and a candidate's submit in flight: what is in flight
finishes within the stop's bound. (The stops that cut work short are in test_stop.py, whose
fixture and helpers these share.)"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import docker
import psycopg

from tests.api_server import (
    Engine,
    descendants,
    engine_http,
    nothing_left,
    wait_for_event,
    wait_for_state,
)
from tests.test_stop import _row, _running, engine  # noqa: F401  (the engine fixture)


def test_ctrl_c_lets_a_create_in_flight_finish(
    engine: dict[str, Any],  # noqa: F811
    docker_client: docker.DockerClient,
) -> None:
    """SIGINT to the engine alone (Ctrl-C in its terminal, or tini's forwarding in the
    image): its Pulumi runs have process groups of their own, so the create in flight
    finishes within the stop's bound and is recorded running; the next start keeps it."""
    proc: Engine = engine["engine"]
    database = engine["database"]
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        made = http.post("/api/v1/sandboxes", json={"template": "stoppable"})
        sid = made.json()["id"]
        wait_for_event(database, sid, "create docker:index/container:Container")
    assert proc.proc is not None
    runs = descendants(proc.proc.pid)
    proc.proc.send_signal(signal.SIGINT)
    # Once shut down, it ends by the signal it got, as uvicorn does (the signal's default).
    assert proc.wait(timeout=120) in (0, -signal.SIGINT)
    assert _row(database, sid) == ("running", None)
    assert not [pid for pid in runs if Path(f"/proc/{pid}").exists()]
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        assert http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "running"
        assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
        wait_for_state(http, sid, "destroyed")
    nothing_left(docker_client, engine["settings"], sid)


def test_a_submit_in_flight_when_the_engine_stops_is_answered_and_its_destroy_finished(
    engine: dict[str, Any],  # noqa: F811
    docker_client: docker.DockerClient,
) -> None:
    """The candidate's submit is a request: the stop lets it finish (the archive is made and
    reported); the destroy the template asks for after it cannot start any more, and the next
    start's recovery does it, without archiving again."""
    proc: Engine = engine["engine"]
    database = engine["database"]
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        sid = _running(http)
        workspace = http.get(f"/api/v1/sandboxes/{sid}").json()["workspace"]
        # Enough to archive that the submit is still streaming when the signal comes.
        made = docker_client.containers.get(workspace).exec_run(
            ["sh", "-c", "head -c 150000000 /dev/urandom > /home/coder/big.bin"], user="coder"
        )
        assert made.exit_code == 0, made.output
        answer: dict[str, Any] = {}

        def submit() -> None:
            response = http.post(f"/api/v1/sandboxes/{sid}/submit", timeout=120)
            answer.update(status=response.status_code, body=response.json())

        submitting = threading.Thread(target=submit)
        submitting.start()
        with psycopg.connect(database, autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while not conn.execute(
                "SELECT 1 FROM submissions WHERE sandbox_id = %s", (sid,)
            ).fetchone():
                assert time.monotonic() < deadline, "the submit never began"
                time.sleep(0.02)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        submitting.join(timeout=120)
    assert answer.get("status") == 200, answer
    assert answer["body"]["archive"]["error"] is None, answer
    assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    state, error = _row(database, sid)
    assert state in ("destroying", "destroyed"), (state, error)
    proc.start()
    with engine_http(proc, engine["key"]) as http:
        wait_for_state(http, sid, "destroyed")
        archives = http.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
        assert [a["reason"] for a in archives] == ["submitted"], archives
    nothing_left(docker_client, engine["settings"], sid)
