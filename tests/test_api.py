"""The API app factory."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import psycopg
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from api.schemas import SandboxList, SandboxPublic
from engine import store
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, SandboxState, create_client


def test_healthz(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_a_sandbox_is_shown_as_its_schema_says(database: str) -> None:
    """The sandbox routes pass on JSON the database builds (engine.store.SANDBOX_JSON): every
    state's shape, with and without outputs, is what SandboxPublic (and so /openapi.json)
    promises, and the list holds the same items."""
    migrate(database)
    outputs = {
        "workspace": "sbx-x-workspace",
        "endpoints": [{"port": 8000, "public": True, "url": "http://x-8000.localhost"}],
    }
    expires = datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="hiring", role=Role.MEMBER)
        for i, state in enumerate(SandboxState):
            for with_outputs in (False, True):
                conn.execute(
                    "INSERT INTO sandboxes (id, owner_id, template, state, expires_at, outputs,"
                    " destroyed_at) VALUES (%s, %s, 'web', %s, %s, %s, %s)",
                    (
                        f"{i}{int(with_outputs)}00000000",  # all digits: still a string
                        None if state == "pooled" else owner.id,
                        state.value,
                        expires,
                        Jsonb(outputs) if with_outputs else None,
                        expires if state in ("destroyed", "expired") else None,
                    ),
                )

    async def check() -> None:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            listed = SandboxList.model_validate_json(
                await store.sandboxes_json(conn, owner_id=None, state=None)
            )
            assert len(listed.items) == 2 * len(SandboxState)
            for item in listed.items:
                one = await store.sandbox_json(conn, item.id, owner_id=None)
                assert one is not None
                shown = SandboxPublic.model_validate_json(one)
                assert shown == item and shown.id.isdigit()
                assert shown.expires_at == expires
                assert shown.owner == (None if shown.state == "pooled" else "hiring")
                assert shown.endpoints == [] or shown.endpoints[0].port == 8000
                raw = json.loads(one)
                assert raw["expires_at"] == "2030-01-02T03:04:05.000006Z"  # as pydantic writes
                assert raw["links"]["self"] == f"/api/v1/sandboxes/{shown.id}"
            mine = SandboxList.model_validate_json(
                await store.sandboxes_json(conn, owner_id=owner.id, state="running")
            )
            assert {i.state for i in mine.items} == {"running"} and len(mine.items) == 2
            assert await store.sandbox_json(conn, "10000000000", owner_id=owner.id + 1) is None

    asyncio.run(check())
