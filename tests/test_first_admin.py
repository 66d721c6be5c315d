"""The first admin key's file: after test-style runs, local CLI use, revocations and another
database's key, ``serve`` leaves a file whose key signs in — or no file and the command that
makes a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg

from engine import first_admin
from engine.migrate import migrate
from engine.store import Role, create_client, ensure_first_admin, local_client
from tests.api_server import Engine
from tests.conftest import ROOT


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def _signs_in(engine: Engine, key: str) -> int:
    return httpx.get(
        f"http://127.0.0.1:{engine.port}/api/v1/keys",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ).status_code


def test_the_local_cli_identity_is_no_admin_anyone_holds(database: str) -> None:
    migrate(database)
    with psycopg.connect(database) as conn:
        local_client(conn)  # any local CLI command makes it
        assert ensure_first_admin(conn) is not None
        assert ensure_first_admin(conn) is None


def test_serve_leaves_a_key_that_signs_in_or_the_hint(
    database: str, module_database: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    path = state / first_admin.FILE_NAME
    env = {
        **os.environ,
        "SANDBOX_DATABASE_URL": database,
        "SANDBOX_PULUMI_BACKEND_URL": f"file://{tmp_path}",
        "SANDBOX_STATE_DIR": str(state),
        "SANDBOX_REAP_INTERVAL": "0",
    }
    # A test-style run first: an engine on another (throwaway) database wrote its key here.
    migrate(module_database)
    with psycopg.connect(module_database) as conn:
        first_admin.settle(conn, path)
    foreign = path.read_text().strip()
    # Then the local CLI on this database (it makes the local CLI's identity, an admin).
    listed = _cli(env, "sandbox", "list")
    assert listed.returncode == 0, listed.stderr

    engine = Engine(env, tmp_path / "engine.log")
    engine.start()
    try:
        key = path.read_text().strip()
        assert key != foreign
        assert path.stat().st_mode & 0o777 == 0o600
        assert _signs_in(engine, key) == 200
        assert _signs_in(engine, foreign) == 401
    finally:
        engine.stop()
    log = engine.log.read_text()
    assert "Removed" in log and "First admin API key written" in log, log
    assert key not in log and foreign not in log  # never in a log

    # Revoking the key the file holds removes the file (the CLI here; the API below).
    with psycopg.connect(database) as conn:
        (key_id,) = conn.execute(
            "SELECT id FROM api_clients WHERE name = 'first admin' AND revoked_at IS NULL"
        ).fetchone() or (None,)
    revoked = _cli(env, "keys", "revoke", str(key_id))
    assert revoked.returncode == 0, revoked.stderr
    assert not path.exists(), revoked.stdout

    # No admin anyone holds is left: the next start makes a new first key, which signs in.
    engine.start()
    try:
        second = path.read_text().strip()
        assert _signs_in(engine, second) == 200
        listed_keys = httpx.get(
            f"http://127.0.0.1:{engine.port}/api/v1/keys",
            headers={"X-API-Key": second},
            timeout=30,
        ).json()
        [mine] = [k for k in listed_keys if k["name"] == "first admin" and not k["revoked_at"]]
        gone = httpx.delete(
            f"http://127.0.0.1:{engine.port}/api/v1/keys/{mine['id']}",
            headers={"X-API-Key": second},
            timeout=30,
        )
        assert gone.status_code == 204
        assert not path.exists()
        # An admin makes a key for a colleague: admins exist that someone holds.
        made = _cli(env, "keys", "create", "--name", "ops", "--role", "admin", "--json")
        assert made.returncode == 0, made.stderr
        colleague = json.loads(made.stdout)["key"]
    finally:
        engine.stop()

    # Admins exist, the file is gone: no new first key, and the one command that makes one.
    before = len(engine.log.read_text())
    engine.start()
    try:
        assert not path.exists()
        assert _signs_in(engine, colleague) == 200
    finally:
        engine.stop()
    started = engine.log.read_text()[before:]
    assert f"to make one for you: {first_admin.MAKE_KEY}" in started, started


def test_a_file_of_a_live_admin_key_is_kept(database: str, tmp_path: Path) -> None:
    migrate(database)
    path = tmp_path / first_admin.FILE_NAME
    with psycopg.connect(database) as conn:
        assert "written" in first_admin.settle(conn, path)
        key = path.read_text()
        assert "holds a live admin key" in first_admin.settle(conn, path)
        assert path.read_text() == key
        # Revoking another key (a colleague's, or one of another database) leaves it alone.
        other, _ = create_client(conn, name="other", role=Role.ADMIN)
        assert not first_admin.forget_if_revoked(conn, path, other.id)
        assert path.read_text() == key
        # A member's key in the file (copied by hand) is no admin's: removed, then the hint
        # (an admin someone holds exists: the first one).
        _, member = create_client(conn, name="m", role=Role.MEMBER)
        path.write_text(member + "\n")
        said = first_admin.settle(conn, path)
    assert said.startswith("Removed") and first_admin.MAKE_KEY in said, said
    assert not path.exists()
