"""The reaper: a pure decision, exactly-once claiming, and a real sandbox expiring."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import httpx
import psycopg
import pytest

from engine.migrate import migrate
from engine.sandboxes.reaper import claim_expired, should_reap
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import Role, SandboxRow, create_client
from tests.api_server import serve
from tests.conftest import ROOT
from tests.provider_helpers import leftovers

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def row(state: str, expires_in: float, warned_for: datetime | None = None) -> SandboxRow:
    """A sandbox row at the fixed time NOW, expiring ``expires_in`` seconds after it."""
    return SandboxRow(
        id="abc123",
        owner_id=1,
        template="t",
        state=state,
        reason=None,
        created_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(seconds=expires_in),
        destroyed_at=None,
        outputs=None,
        error=None,
        metadata={},
        warned_for=warned_for,
    )


@pytest.mark.parametrize(
    ("state", "expires_in", "expected"),
    [
        ("running", -1, True),
        ("running", 0, True),
        ("running", 60, False),
        ("failed", -1, True),
        ("creating", -1, False),
        ("destroying", -1, False),
        ("destroyed", -1, False),
        ("expired", -1, False),
    ],
)
def test_should_reap(state: str, expires_in: int, expected: bool) -> None:
    assert should_reap(row(state, expires_in), NOW) is expected


def test_two_reapers_claim_each_sandbox_exactly_once(database: str) -> None:
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="o", role=Role.MEMBER)
        for i in range(40):
            conn.execute(
                "INSERT INTO sandboxes (id, owner_id, template, state, expires_at)"
                " VALUES (%s, %s, 't', 'running', now() - interval '1 minute')",
                (f"exp{i:07d}", owner.id),
            )
    claimed: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def reap(slot: int) -> None:
        with psycopg.connect(database) as conn:
            start.wait()
            while True:
                with conn.transaction():
                    got = claim_expired(conn, now=datetime.now(UTC), limit=3)
                if not got:
                    return
                claimed[slot] += [r.id for r in got]

    threads = [threading.Thread(target=reap, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(claimed[0]) & set(claimed[1])
    assert len(claimed[0]) + len(claimed[1]) == 40
    with psycopg.connect(database) as conn:
        states = conn.execute("SELECT DISTINCT state, reason FROM sandboxes").fetchall()
    assert states == [("destroying", "ttl")]


@pytest.fixture
def reaping_api(database: str, tmp_path: Any) -> Iterator[dict[str, Any]]:
    settings = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}",
        reap_interval=1,
        templates_dir=ROOT / "tests" / "fixtures" / "live-templates",  # a workspace-only one
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="t", role=Role.MEMBER)
    with serve(settings) as address:
        yield {"address": address, "key": key, "settings": settings}


def test_a_ten_second_sandbox_expires(
    reaping_api: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    api = reaping_api
    with httpx.Client(
        base_url=f"http://{api['address']}", timeout=60, headers={"X-API-Key": api["key"]}
    ) as http:
        sid = http.post("/api/v1/sandboxes", json={"template": "web", "ttl": "10s"}).json()["id"]
        deadline = time.monotonic() + 180
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = http.get(f"/api/v1/sandboxes/{sid}").json()
            if body["state"] in ("expired", "failed", "destroyed"):
                break
            time.sleep(0.5)
        assert (body["state"], body["reason"]) == ("expired", "ttl"), body
        kinds = [
            line
            for line in http.get(f"/api/v1/sandboxes/{sid}/events").text.splitlines()
            if line.startswith("data: ")
        ]
        assert any("destroying (ttl)" in k for k in kinds)
    assert leftovers(docker_client, f"sbx-{sid}") == []
    stacks = StackManager(api["settings"]).list()
    assert f"sbx-{sid}" not in {s.name for s in stacks}


def test_destroyed_rows_are_kept_for_the_retention_period(database: str) -> None:
    from engine.store import prune_destroyed

    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="o", role=Role.MEMBER)
        for sid, state, age in (
            ("old0000001", "destroyed", 31),
            ("new0000001", "destroyed", 29),
            ("live000001", "running", None),
        ):
            conn.execute(
                "INSERT INTO sandboxes (id, owner_id, template, state, expires_at, destroyed_at)"
                " VALUES (%s, %s, 't', %s, now(), now() - make_interval(days => %s))",
                (sid, owner.id, state, age),
            )
            conn.execute(
                "INSERT INTO sandbox_events (sandbox_id, kind) VALUES (%s, 'state')", (sid,)
            )
        assert prune_destroyed(conn, older_than_days=30) == 1
        left = {r[0] for r in conn.execute("SELECT id FROM sandboxes")}
        events = {r[0] for r in conn.execute("SELECT sandbox_id FROM sandbox_events")}
    assert left == events == {"new0000001", "live000001"}
