"""Repository functions over PostgreSQL. Each takes the connection first; the caller owns the
transaction.

API keys: a key is ``sek_`` and 43 random URL-safe characters (256 bits). Only its SHA-256 is
stored (a key has far too much entropy for a slow hash to matter), with its first characters
to recognise it in lists. The plaintext exists once: in the answer to its creation.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import psycopg
from psycopg.rows import class_row

KEY_PREFIX = "sek_"
SHOWN_PREFIX = 12  # characters of a key kept to recognise it ("sek_" and 8 more)


class Role(StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


@dataclass(frozen=True)
class Client:
    id: int
    name: str
    role: str
    key_prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_client(conn: psycopg.Connection, *, name: str, role: Role) -> tuple[Client, str]:
    """A new client and its key (the only time the key is seen)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with conn.cursor(row_factory=class_row(Client)) as cur:
        cur.execute(
            "INSERT INTO api_clients (name, role, key_hash, key_prefix) VALUES (%s, %s, %s, %s)"
            " RETURNING id, name, role, key_prefix, created_at, last_used_at, revoked_at",
            (name, role.value, hash_key(key), key[:SHOWN_PREFIX]),
        )
        client = cur.fetchone()
    assert client is not None
    return client, key


def authenticate(conn: psycopg.Connection, key: str) -> Client | None:
    """The live client holding this key, or None; marks the key as used."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    with conn.cursor(row_factory=class_row(Client)) as cur:
        cur.execute(
            "UPDATE api_clients SET last_used_at = now()"
            " WHERE key_hash = %s AND revoked_at IS NULL"
            " RETURNING id, name, role, key_prefix, created_at, last_used_at, revoked_at",
            (hash_key(key),),
        )
        return cur.fetchone()


def list_clients(conn: psycopg.Connection) -> list[Client]:
    with conn.cursor(row_factory=class_row(Client)) as cur:
        cur.execute(
            "SELECT id, name, role, key_prefix, created_at, last_used_at, revoked_at"
            " FROM api_clients ORDER BY id"
        )
        return cur.fetchall()


def revoke_client(conn: psycopg.Connection, client_id: int) -> bool:
    """Revoke a key at once; False when there is no such live key."""
    cur = conn.execute(
        "UPDATE api_clients SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
        (client_id,),
    )
    return cur.rowcount == 1


def ensure_first_admin(conn: psycopg.Connection) -> str | None:
    """Create an admin key when no live admin exists; return it (else None)."""
    # The lock makes two engine processes starting together create one admin, not two.
    conn.execute("LOCK TABLE api_clients IN SHARE ROW EXCLUSIVE MODE")
    row = conn.execute(
        "SELECT 1 FROM api_clients WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1"
    ).fetchone()
    if row:
        return None
    _, key = create_client(conn, name="first admin", role=Role.ADMIN)
    return key
