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
from psycopg.types.json import Jsonb

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


# --- sandboxes -------------------------------------------------------------------------------


class SandboxState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    EXPIRED = "expired"


class DestroyReason(StrEnum):
    REQUEST = "request"
    TTL = "ttl"
    ORPHANED = "orphaned"


LIVE_STATES = (SandboxState.CREATING, SandboxState.RUNNING)
# Which state may follow which; anything else is a conflict.
TRANSITIONS: dict[SandboxState, tuple[SandboxState, ...]] = {
    # A create is not interrupted (its stack is busy): DELETE answers 409 until it settles.
    SandboxState.CREATING: (SandboxState.RUNNING, SandboxState.FAILED),
    SandboxState.RUNNING: (SandboxState.DESTROYING,),
    SandboxState.FAILED: (SandboxState.DESTROYING,),
    SandboxState.DESTROYING: (SandboxState.DESTROYED, SandboxState.EXPIRED, SandboxState.FAILED),
    SandboxState.DESTROYED: (),
    SandboxState.EXPIRED: (),
}


@dataclass(frozen=True)
class SandboxRow:
    id: str
    owner_id: int
    template: str
    state: str
    reason: str | None
    created_at: datetime
    expires_at: datetime
    destroyed_at: datetime | None
    outputs: dict[str, object] | None
    error: str | None
    metadata: dict[str, str]


_SANDBOX_COLUMNS = (
    "id, owner_id, template, state, reason, created_at, expires_at, destroyed_at, outputs, error,"
    " metadata"
)


def insert_sandbox(
    conn: psycopg.Connection,
    *,
    sandbox_id: str,
    owner_id: int,
    template: str,
    ttl_seconds: int,
    idempotency_key: str | None,
    metadata: dict[str, str] | None = None,
) -> SandboxRow:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "INSERT INTO sandboxes"
            " (id, owner_id, template, state, expires_at, idempotency_key, metadata)"
            " VALUES (%s, %s, %s, 'creating', now() + make_interval(secs => %s), %s, %s)"
            f" RETURNING {_SANDBOX_COLUMNS}",
            (sandbox_id, owner_id, template, ttl_seconds, idempotency_key, Jsonb(metadata or {})),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def get_sandbox(conn: psycopg.Connection, sandbox_id: str) -> SandboxRow | None:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE id = %s", (sandbox_id,))
        return cur.fetchone()


def find_idempotent(conn: psycopg.Connection, *, owner_id: int, key: str) -> SandboxRow | None:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes"
            " WHERE owner_id = %s AND idempotency_key = %s",
            (owner_id, key),
        )
        return cur.fetchone()


def list_sandboxes(
    conn: psycopg.Connection, *, owner_id: int | None, state: str | None, limit: int = 200
) -> list[SandboxRow]:
    """Newest first; ``owner_id=None`` lists everyone's (admins)."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes"
            " WHERE (%(owner)s::bigint IS NULL OR owner_id = %(owner)s)"
            " AND (%(state)s::text IS NULL OR state = %(state)s)"
            " ORDER BY created_at DESC LIMIT %(limit)s",
            {"owner": owner_id, "state": state, "limit": limit},
        )
        return cur.fetchall()


def count_live(conn: psycopg.Connection, *, owner_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM sandboxes WHERE owner_id = %s AND state IN ('creating', 'running')",
        (owner_id,),
    ).fetchone()
    return int(row[0]) if row else 0


def transition(
    conn: psycopg.Connection,
    sandbox_id: str,
    to: SandboxState,
    *,
    reason: str | None = None,
    outputs: dict[str, object] | None = None,
    error: str | None = None,
) -> SandboxRow | None:
    """Move a sandbox to ``to`` if its current state allows it; None when it does not.

    One conditional UPDATE: it locks the row and checks the state in the same step, so of two
    requests racing to start a destroy exactly one moves the row (the other sees no row).
    """
    allowed = [s.value for s, nexts in TRANSITIONS.items() if to in nexts]
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET state = %(to)s,"
            " reason = COALESCE(%(reason)s, reason),"
            " outputs = COALESCE(%(outputs)s, outputs),"
            " error = COALESCE(%(error)s, error),"
            " destroyed_at = CASE WHEN %(to)s IN ('destroyed', 'expired') THEN now()"
            "   ELSE destroyed_at END"
            " WHERE id = %(id)s AND state = ANY(%(allowed)s)"
            f" RETURNING {_SANDBOX_COLUMNS}",
            {
                "to": to.value,
                "reason": reason,
                "error": error,
                "id": sandbox_id,
                "allowed": allowed,
                "outputs": Jsonb(outputs) if outputs is not None else None,
            },
        )
        return cur.fetchone()


def extend(conn: psycopg.Connection, sandbox_id: str, *, expires_at: datetime) -> SandboxRow | None:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET expires_at = %s"
            " WHERE id = %s AND state IN ('creating', 'running')"
            f" RETURNING {_SANDBOX_COLUMNS}",
            (expires_at, sandbox_id),
        )
        return cur.fetchone()


@dataclass(frozen=True)
class Event:
    id: int
    sandbox_id: str
    at: datetime
    kind: str
    message: str


def add_event(conn: psycopg.Connection, sandbox_id: str, kind: str, message: str = "") -> None:
    conn.execute(
        "INSERT INTO sandbox_events (sandbox_id, kind, message) VALUES (%s, %s, %s)",
        (sandbox_id, kind, message[:2000]),
    )
    # Wakes the event streams of this sandbox (they LISTEN on the channel).
    conn.execute("SELECT pg_notify('sandbox_events', %s)", (sandbox_id,))


def list_events(conn: psycopg.Connection, sandbox_id: str, *, after: int = 0) -> list[Event]:
    with conn.cursor(row_factory=class_row(Event)) as cur:
        cur.execute(
            "SELECT id, sandbox_id, at, kind, message FROM sandbox_events"
            " WHERE sandbox_id = %s AND id > %s ORDER BY id",
            (sandbox_id, after),
        )
        return cur.fetchall()


def local_client(conn: psycopg.Connection) -> Client:
    """The admin identity of the local ``sandbox-engine`` CLI (its key is never shown)."""
    with conn.cursor(row_factory=class_row(Client)) as cur:
        cur.execute(
            "SELECT id, name, role, key_prefix, created_at, last_used_at, revoked_at"
            " FROM api_clients WHERE name = 'local cli' AND role = 'admin' AND revoked_at IS NULL"
        )
        found = cur.fetchone()
    if found:
        return found
    client, _ = create_client(conn, name="local cli", role=Role.ADMIN)
    return client


def prune_destroyed(conn: psycopg.Connection, *, older_than_days: int) -> int:
    """Delete sandboxes destroyed (or expired, or failed and cleaned) longer ago than the
    retention period, with their events; returns how many."""
    cur = conn.execute(
        "DELETE FROM sandboxes WHERE destroyed_at IS NOT NULL"
        " AND destroyed_at < now() - make_interval(days => %s)",
        (older_than_days,),
    )
    return cur.rowcount
