"""Expiry warnings, repair of a sandbox changed by hand, and the orphan sweep — against a real
engine (API server with its reaper), dockerd, PostgreSQL and the Pulumi engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest
import websockets

from engine import store
from engine.migrate import migrate
from engine.model.spec import L_ENGINE, L_MANAGED, L_SANDBOX, MANAGED_BY
from engine.model.templates import find
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import Terminal, nothing_left, serve
from tests.conftest import ROOT, TEST_LABEL, remove_labelled
from tests.test_reaper import NOW, row

# A workspace-only template with port 8000 published (a sandbox in seconds).
LIVE = ROOT / "tests" / "fixtures" / "live-templates"

FIVE_MIN = timedelta(minutes=5)


@pytest.mark.parametrize(
    ("state", "expires_in", "warned_for", "expected"),
    [
        ("running", 299, None, True),
        ("running", 300, None, True),
        ("running", 301, None, False),  # not yet
        ("running", 0, None, False),  # expired: the reaper's, not a warning's
        ("creating", 60, None, False),
        ("repairing", 60, None, False),
        ("running", 60, NOW + timedelta(seconds=60), False),  # already warned for this expiry
        ("running", 60, NOW + timedelta(seconds=30), True),  # extended since: warned again
    ],
)
def test_should_warn(
    state: str, expires_in: float, warned_for: datetime | None, expected: bool
) -> None:
    assert store.should_warn(row(state, expires_in, warned_for), NOW, FIVE_MIN) is expected


def test_each_expiry_is_warned_once_and_an_extension_cancels_it(database: str) -> None:
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="o", role=Role.MEMBER)
        conn.execute(
            "INSERT INTO sandboxes (id, owner_id, template, state, expires_at)"
            " VALUES ('warn000001', %s, 't', 'running', now() + interval '10 minutes')",
            (owner.id,),
        )

        def claim() -> list[str]:
            now = datetime.now(UTC)
            return [r.id for r in store.claim_warnings(conn, now=now, before=FIVE_MIN)]

        assert claim() == []  # ten minutes left: too early
        conn.execute(
            "UPDATE sandboxes SET expires_at = now() + interval '4 minutes' WHERE id = 'warn000001'"
        )
        assert claim() == ["warn000001"]
        assert claim() == []  # once per expiry
        # Extended out of the window: the warning is cancelled, nothing is due...
        conn.execute(
            "UPDATE sandboxes SET expires_at = now() + interval '1 hour' WHERE id = 'warn000001'"
        )
        assert claim() == []
        # ...until the new expiry comes near.
        conn.execute(
            "UPDATE sandboxes SET expires_at = now() + interval '3 minutes' WHERE id = 'warn000001'"
        )
        assert claim() == ["warn000001"]


@pytest.fixture
def reaping_api(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}",
        reap_interval=1,
        sweep_interval=2,
        templates_dir=LIVE,
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="t", role=Role.MEMBER)
        instance = store.engine_instance(conn)
    try:
        with serve(settings) as address:
            http = httpx.Client(
                base_url=f"http://{address}", timeout=120, headers={"X-API-Key": key}
            )
            with http:
                yield {
                    "address": address,
                    "key": key,
                    "settings": settings,
                    "http": http,
                    "db": database,
                    "instance": instance,
                }
    finally:
        with psycopg.connect(database) as conn:
            for (sid,) in conn.execute("SELECT id FROM sandboxes").fetchall():
                remove_labelled(sid)


def wait_for(http: httpx.Client, sid: str, states: tuple[str, ...], timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    body: Any = {}
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        if body["state"] in states:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{sid} never reached {states}: {body}")


def events(database: str, sid: str) -> list[tuple[str, str]]:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT kind, message FROM sandbox_events WHERE sandbox_id = %s ORDER BY id", (sid,)
        ).fetchall()
    return [(str(k), str(m)) for k, m in rows]


def test_terminals_are_warned_before_expiry(reaping_api: dict[str, Any]) -> None:
    api = reaping_api
    http: httpx.Client = api["http"]
    sid = http.post("/api/v1/sandboxes", json={"template": "web", "ttl": "30m"}).json()["id"]
    wait_for(http, sid, ("running",))
    url = f"ws://{api['address']}/api/v1/ws/terminal/{sid}?token={api['key']}"

    async def extend(ttl: str) -> httpx.Response:
        return await asyncio.to_thread(
            http.post, f"/api/v1/sandboxes/{sid}/extend", json={"ttl": ttl}
        )

    async def session() -> None:
        async with websockets.connect(url) as ws:
            t = Terminal(ws)
            await t.resize(120, 30)
            await t.type("echo ready\r")
            await t.expect("ready")
            # Inside the default warning window (5 minutes): the next pass warns.
            assert (await extend("4m")).is_success
            await t.expect("Sandbox expires at", within=30)
            # Extending shows on the terminal too, and takes the sandbox out of the window.
            assert (await extend("1h")).is_success
            await t.expect("Sandbox extended", within=30)

    asyncio.run(session())
    time.sleep(3)  # passes run every second: none may warn about the new expiry yet
    warnings = [m for k, m in events(api["db"], sid) if k == "expiry_warning"]
    assert len(warnings) == 1, warnings
    assert "save your work" in warnings[0]
    assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
    wait_for(http, sid, ("destroyed",))


def test_a_workspace_removed_by_hand_is_repaired(
    reaping_api: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    api = reaping_api
    http: httpx.Client = api["http"]
    sid = http.post("/api/v1/sandboxes", json={"template": "web", "ttl": "30m"}).json()["id"]
    body = wait_for(http, sid, ("running",))
    workspace = docker_client.containers.get(body["workspace"])
    home = find(api["settings"].templates_path, "web").workspace.workdir
    assert workspace.exec_run(["sh", "-c", f"echo kept > {home}/marker"]).exit_code == 0
    first_id = workspace.id
    workspace.remove(force=True)

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        kinds = [k for k, _ in events(api["db"], sid)]
        if "repair" in kinds and http.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "running":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no repair: {events(api['db'], sid)}")
    repaired = docker_client.containers.get(body["workspace"])
    assert repaired.id != first_id and repaired.status == "running"
    # The home volume outlived the container: the candidate's files are still there.
    out = repaired.exec_run(["cat", f"{home}/marker"])
    assert out.output.decode().strip() == "kept", out
    # The repair event names the container and what was wrong: gone, or (if the drift pass
    # ran while `docker rm -f` was killing it) exited on its way out.
    repairs = [m for k, m in events(api["db"], sid) if k == "repair"]
    assert any(body["workspace"] in m and ("(missing)" in m or "(exited)" in m) for m in repairs), (
        repairs
    )

    assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
    wait_for(http, sid, ("destroyed",))
    nothing_left(docker_client, api["settings"], sid)


def test_orphans_of_this_engine_are_swept_and_others_are_not(
    database: str, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    settings = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}",
        reap_interval=1,
        sweep_interval=1,
        templates_dir=LIVE,
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="t", role=Role.MEMBER)
        instance = store.engine_instance(conn)
        conn.execute(
            "INSERT INTO sandboxes (id, owner_id, template, state, expires_at, destroyed_at)"
            " VALUES ('done000001', %s, 't', 'destroyed', now(), now())",
            (owner.id,),
        )
    # 1. A stack of this engine's with no row (say, its engine died between the two).
    stacks = StackManager(settings)
    stacks.instance = instance
    lost = "orphan" + time.strftime("%H%M%S")
    stacks.create(find(settings.templates_path, "web"), settings.templates_path, sandbox_id=lost)
    # 2. An object of a sandbox whose row says destroyed.
    labels = {L_MANAGED: MANAGED_BY, L_ENGINE: instance, L_SANDBOX: "done000001"}
    leaked = docker_client.volumes.create("sbx-done000001-home", labels=labels)
    # 3. Another engine's object (another database sharing this dockerd): never touched.
    foreign = docker_client.volumes.create(
        "sbx-other00001-home",
        labels={**labels, L_ENGINE: "another", L_SANDBOX: "other00001", TEST_LABEL: "1"},
    )
    try:
        with serve(settings):
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                left = docker_client.volumes.list(filters={"label": f"{L_ENGINE}={instance}"})
                names = {s.name for s in StackManager(settings).list()}
                if not left and f"sbx-{lost}" not in names:
                    break
                time.sleep(1)
            else:
                raise AssertionError(f"orphans left: {[v.name for v in left]}, stacks {names}")
        nothing_left(docker_client, settings, lost)
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(leaked.name)
        docker_client.volumes.get(foreign.name)  # still there
        assert ("orphan", f"removed (reason orphaned): volume {leaked.name}") in events(
            database, "done000001"
        )
    finally:
        foreign.remove(force=True)
        remove_labelled(lost)
        remove_labelled("done000001")
