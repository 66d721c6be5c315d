"""The warm pool, against a real engine (API server with its reaper), dockerd, PostgreSQL and
the Pulumi engine: sandboxes made ahead are claimed by creates, refilled, kept across a
restart, never counted against a key's quota, and recycled when stale or too old."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest

from engine.migrate import migrate
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import serve
from tests.conftest import ROOT, remove_labelled

WEB = ROOT / "tests" / "fixtures" / "live-templates" / "web.yaml"


def warm_template(folder: Path, pool: int, description: str = "warm pool test") -> None:
    """The workspace-only test template as ``warm``, keeping ``pool`` sandboxes ready."""
    text = WEB.read_text().replace("name: web", "name: warm")
    text = text.replace(
        "description: Python workspace with port 8000 published; no services.",
        f"description: {description}",
    )
    (folder / "warm.yaml").write_text(f"{text}pool: {pool}\n")


def pool_rows(database: str, digest: str | None = None) -> list[tuple[str, str, str | None]]:
    """(id, state, reason) of every pool-made sandbox never claimed (of one version of the
    template, or all), oldest first."""
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT id, state, reason FROM sandboxes WHERE owner_id IS NULL"
            " AND (%(d)s::text IS NULL OR template_digest = %(d)s) ORDER BY created_at",
            {"d": digest},
        ).fetchall()
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


def until(check: Callable[[], Any], what: str, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ready(database: str, n: int, digest: str | None = None) -> Callable[[], list[str]]:
    def check() -> list[str]:
        ids = [sid for sid, state, _ in pool_rows(database, digest) if state == "pooled"]
        return ids if len(ids) >= n else []

    return check


@pytest.fixture
def pool_engine(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    templates = tmp_path / "templates"
    templates.mkdir()
    warm_template(templates, pool=2)
    settings = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}/state",
        reap_interval=1,
        templates_dir=templates,
        max_live_sandboxes_per_key=2,
    )
    (tmp_path / "state").mkdir()
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="hiring", role=Role.MEMBER)
    try:
        yield {"settings": settings, "key": key, "db": database, "templates": templates}
    finally:
        with psycopg.connect(database) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
            reserved = [r[0] for r in conn.execute("SELECT id FROM stack_reserve").fetchall()]
        for sid in ids:
            remove_labelled(sid)
        for sid in ids + reserved:
            (settings.stack_config_path / f"Pulumi.sbx-{sid}.yaml").unlink(missing_ok=True)


def test_pooled_creates_are_claimed_refilled_and_survive_a_restart(
    pool_engine: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    settings, db = pool_engine["settings"], pool_engine["db"]
    headers = {"X-API-Key": pool_engine["key"]}
    with (
        serve(settings) as address,
        httpx.Client(base_url=f"http://{address}", headers=headers, timeout=120) as http,
    ):
        first = until(ready(db, 2), "a pool of 2")

        # A create that fits is served from the pool: running at once, TTL from now.
        started = time.perf_counter()
        claimed = http.post("/api/v1/sandboxes", json={"template": "warm", "ttl": "20m"})
        took = time.perf_counter() - started
        assert claimed.status_code == 201, claimed.text
        body = claimed.json()
        assert body["state"] == "running" and body["id"] in first
        assert body["owner"] == "hiring"
        left = body["expires_at"]
        assert 19 * 60 < _seconds_until(left) <= 20 * 60, left
        workspace = docker_client.containers.get(body["workspace"])
        assert workspace.status == "running"
        stream = http.get(f"/api/v1/sandboxes/{body['id']}/events").text  # Server-Sent Events
        events = [
            json.loads(line[6:]).get("message")
            for line in stream.splitlines()
            if line.startswith("data: ")
        ]
        assert "running: claimed by hiring" in events, events
        print(f"pooled create answered in {took * 1000:.0f} ms")

        # The pool refills in the background (the claimed one is no longer in it).
        refilled = until(ready(db, 2), "the pool refilled")
        assert body["id"] not in refilled

        # A request the pool cannot serve (its own env) takes the cold path.
        cold = http.post("/api/v1/sandboxes", json={"template": "warm", "env": {"TASK": "one"}})
        assert cold.status_code == 202 and cold.json()["state"] == "creating", cold.text

        # Pool sandboxes never count against a key: two of its own, and the quota is full.
        over = http.post("/api/v1/sandboxes", json={"template": "warm"})
        assert over.status_code == 429, over.text
        mine = {s["id"] for s in http.get("/api/v1/sandboxes").json()["items"]}
        assert mine == {body["id"], cold.json()["id"]}  # pool sandboxes are nobody's
        cold_id = cold.json()["id"]
        until(
            lambda: http.get(f"/api/v1/sandboxes/{cold_id}").json()["state"] == "running",
            "the cold create running",
        )
        assert http.delete(f"/api/v1/sandboxes/{cold_id}").status_code == 202

    # The pool is rows in the database: a new engine process finds it ready and serves it.
    before = {sid for sid, state, _ in pool_rows(db) if state == "pooled"}
    assert len(before) == 2
    with (
        serve(settings) as address,
        httpx.Client(base_url=f"http://{address}", headers=headers, timeout=120) as http,
    ):
        http.delete(f"/api/v1/sandboxes/{body['id']}")
        until(
            lambda: http.get(f"/api/v1/sandboxes/{body['id']}").json()["state"] == "destroyed",
            "the claimed sandbox destroyed",
        )
        again = http.post("/api/v1/sandboxes", json={"template": "warm"})
        assert again.status_code == 201, again.text
        assert again.json()["id"] in before
        http.delete(f"/api/v1/sandboxes/{again.json()['id']}")
        _drain_pool(pool_engine, http)


def test_stale_and_old_pool_sandboxes_are_recycled(
    pool_engine: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    settings, db = pool_engine["settings"], pool_engine["db"]
    with (
        serve(settings) as address,
        httpx.Client(
            base_url=f"http://{address}", headers={"X-API-Key": pool_engine["key"]}, timeout=120
        ) as http,
    ):
        old = until(ready(db, 2), "a pool of 2")

        # Past its maximum age: destroyed with reason recycled, and replaced.
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE sandboxes SET expires_at = now() WHERE id = %s", (old[0],))
        until(
            lambda: (old[0], "destroyed", "recycled") in pool_rows(db),
            "the aged pool sandbox recycled",
        )
        until(ready(db, 2), "the pool refilled after recycling")

        # The template changed: what was made from the old version is never claimed.
        warm_template(pool_engine["templates"], pool=2, description="edited")
        edited = hashlib.sha256((pool_engine["templates"] / "warm.yaml").read_bytes()).hexdigest()
        current = set(until(ready(db, 2, edited), "the pool remade from the edited template"))
        until(
            lambda: all(
                state == "destroyed" and reason == "recycled"
                for sid, state, reason in pool_rows(db)
                if sid not in current
            ),
            "the stale pool sandboxes recycled",
        )
        claimed = http.post("/api/v1/sandboxes", json={"template": "warm"}).json()
        assert claimed["id"] in current
        for sid, state, _ in pool_rows(db):
            if state == "destroyed":
                assert not docker_client.containers.list(
                    all=True, filters={"label": f"io.sandbox-engine.sandbox={sid}"}
                ), sid
        http.delete(f"/api/v1/sandboxes/{claimed['id']}")
        _drain_pool(pool_engine, http)


def test_cold_creates_take_a_reserved_stack(
    pool_engine: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    """Empty stacks are initialised ahead; a cold create takes one (its sandbox gets the
    stack's id), the reserve refills, survives a restart and the orphan sweep."""
    warm_template(pool_engine["templates"], pool=0)
    settings = pool_engine["settings"].model_copy(update={"stack_reserve": 2, "sweep_interval": 1})
    db = pool_engine["db"]
    stacks = StackManager(settings)

    def reserve(ready_only: bool = True) -> list[str]:
        with psycopg.connect(db) as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    "SELECT id FROM stack_reserve WHERE ready OR NOT %s ORDER BY created_at",
                    (ready_only,),
                ).fetchall()
            ]

    try:
        with (
            serve(settings) as address,
            httpx.Client(
                base_url=f"http://{address}", headers={"X-API-Key": pool_engine["key"]}, timeout=120
            ) as http,
        ):
            first = until(lambda: reserve() if len(reserve()) == 2 else [], "a reserve of 2")
            assert {f"sbx-{sid}" for sid in first} <= {s.name for s in stacks.list()}
            created = http.post("/api/v1/sandboxes", json={"template": "warm"})
            assert created.status_code == 202, created.text
            sid = created.json()["id"]
            assert sid == first[0]  # the oldest reserved stack
            until(
                lambda: http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "running",
                "the create running",
            )
            refilled = until(lambda: reserve() if len(reserve()) == 2 else [], "refilled")
            assert sid not in refilled
            time.sleep(3)  # orphan sweeps run every second: reserved stacks are not orphans
            names = {s.name for s in stacks.list()}
            assert {f"sbx-{r}" for r in refilled} <= names
            http.delete(f"/api/v1/sandboxes/{sid}")
            until(
                lambda: http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "destroyed",
                "the sandbox destroyed",
            )
        # A new engine process keeps the reserve as it is (rows and stacks).
        with serve(settings):
            time.sleep(2)
            assert reserve(ready_only=False) == refilled
    finally:
        for left in reserve(ready_only=False):
            stacks.recover(left)
        stacks.close()
    assert not [s.name for s in stacks.list()]


def _drain_pool(engine: dict[str, Any], http: httpx.Client) -> None:
    """Set the pool to zero and wait until every pool sandbox is recycled and destroyed."""
    warm_template(engine["templates"], pool=0)
    until(
        lambda: all(state == "destroyed" for _, state, _ in pool_rows(engine["db"])),
        "the pool drained",
    )
    with psycopg.connect(engine["db"]) as conn:
        live = conn.execute(
            "SELECT id FROM sandboxes WHERE state NOT IN ('destroyed', 'expired', 'failed')"
        ).fetchall()
    for (sid,) in live:
        until(
            lambda sid=sid: http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "destroyed",
            f"{sid} destroyed",
        )


def _seconds_until(iso: str) -> float:
    return (datetime.fromisoformat(iso) - datetime.now(UTC)).total_seconds()
