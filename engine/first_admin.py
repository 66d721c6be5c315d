"""The first admin key's file (``<state dir>/first-admin-key``): how a newcomer signs in.

The file only ever holds a live admin key of the database the engine uses. ``serve`` settles
it before it starts (``settle``): a file whose key this database does not know as a live admin
— revoked, or made for another database — is removed; when no admin key that someone holds
exists, one is made and written (0600, never to a log); when admin keys exist but the file is
gone, the one command that makes a key is printed. Revoking the key the file holds removes the
file (``forget_if_revoked``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psycopg

from engine import store
from engine.host.toolenv import ensure_secret_file

FILE_NAME = "first-admin-key"
MAKE_KEY = "sandbox-engine keys create --name <your name> --role admin"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (FileNotFoundError, IsADirectoryError):
        return None


def holds_live_admin(conn: psycopg.Connection, path: Path) -> bool:
    """Whether the file holds a key this database knows as a live admin."""
    key = _read(path)
    client = store.live_client(conn, key) if key else None
    return client is not None and client.role == store.Role.ADMIN


def forget_if_stale(conn: psycopg.Connection, path: Path) -> bool:
    """Remove the file unless it holds a live admin key of this database; True if removed.
    Only for the engine that owns the database and the file (``serve`` at its start)."""
    if path.exists() and not holds_live_admin(conn, path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True
    return False


def forget_if_revoked(conn: psycopg.Connection, path: Path, client_id: int) -> bool:
    """Remove the file when it holds the key of ``client_id`` (just revoked); True if removed.
    A file of another key — another database's, say — is left alone."""
    key = _read(path)
    row = conn.execute("SELECT key_hash FROM api_clients WHERE id = %s", (client_id,)).fetchone()
    if key and row and bytes(row[0]) == store.hash_key(key):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True
    return False


def settle(conn: psycopg.Connection, path: Path) -> str:
    """Make the file right for this database (module docstring); returns the line to print."""
    # The lock makes two engine processes starting together create one admin, not two.
    conn.execute("LOCK TABLE api_clients IN SHARE ROW EXCLUSIVE MODE")
    removed = forget_if_stale(conn, path)
    if path.exists():
        return f"Admin API key: {path} (mode 0600) holds a live admin key of this database"
    gone = (
        f"Removed {path}: its key was no live admin key of this database (revoked, or made "
        "for another one). "
        if removed
        else ""
    )
    if store.has_held_admin(conn):
        return f"{gone}This database has admin keys already; to make one for you: {MAKE_KEY}"
    key = store.ensure_first_admin(conn)
    assert key is not None  # no held admin, under the table lock
    ensure_secret_file(path, key + "\n")
    return (
        f"{gone}First admin API key written to {path} (mode 0600): read it, keep it elsewhere, "
        "delete the file"
    )
