"""Migrations and API keys against a real PostgreSQL (a throwaway database per test)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import psycopg

from engine import store
from engine.migrate import migrate
from engine.store import (
    Client,
    Role,
    create_client,
    ensure_first_admin,
    list_clients,
    revoke_client,
)
from tests.conftest import ROOT


def test_migrations_apply_once(database: str) -> None:
    names = sorted(p.stem for p in (ROOT / "engine" / "migrations").glob("*.sql"))
    assert migrate(database) == names
    assert migrate(database) == []
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT version, name FROM schema_version").fetchall()
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert rows == [(int(n[:4]), n) for n in names]
    assert {"api_clients", "sandboxes", "sandbox_events", "engine_instance"} <= tables


def authenticate(database: str, key: str) -> Client | None:
    """``store.authenticate`` (async, as the API runs it) on a connection of its own."""

    async def run() -> Client | None:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            return await store.authenticate(conn, key)

    return asyncio.run(run())


def test_keys_are_stored_hashed_and_revoked_at_once(database: str) -> None:
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        client, key = create_client(conn, name="alice", role=Role.MEMBER)
        assert key.startswith("sek_") and len(key) > 40
        stored = conn.execute("SELECT api_clients::text FROM api_clients").fetchone()
        assert stored is not None and key not in stored[0] and key[12:] not in stored[0]

        found = authenticate(database, key)
        assert found is not None and found.id == client.id and found.last_used_at is not None
        assert authenticate(database, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert authenticate(database, "not-a-key") is None

        assert revoke_client(conn, client.id)
        assert authenticate(database, key) is None
        assert not revoke_client(conn, client.id)
        assert [c.revoked_at is not None for c in list_clients(conn)] == [True]


def test_first_admin_is_created_once(database: str) -> None:
    migrate(database)
    with psycopg.connect(database) as conn:
        key = ensure_first_admin(conn)
        conn.commit()
        assert key is not None
        assert ensure_first_admin(conn) is None
        conn.commit()
        admin = authenticate(database, key)
    assert admin is not None and admin.role == "admin"


def test_cli_creates_a_key_as_json(database: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "keys",
            "create",
            "--name",
            "ci",
            "--role",
            "admin",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "SANDBOX_DATABASE_URL": database},
    )
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["role"] == "admin" and created["key"].startswith("sek_")
    assert authenticate(database, created["key"]) is not None
