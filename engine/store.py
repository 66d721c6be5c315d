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
from datetime import datetime, timedelta
from enum import StrEnum

import orjson
import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads

from engine.ai import store as ai_store

# JSONB (sandbox outputs and metadata, decoded for every row a list returns) through orjson.
set_json_loads(orjson.loads)
set_json_dumps(orjson.dumps)

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


def create_client(
    conn: psycopg.Connection, *, name: str, role: Role, internal: bool = False
) -> tuple[Client, str]:
    """A new client and its key (the only time the key is seen). ``internal``: an identity of
    the engine's own, whose key nobody keeps (the local CLI's)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with conn.cursor(row_factory=class_row(Client)) as cur:
        cur.execute(
            "INSERT INTO api_clients (name, role, key_hash, key_prefix, internal)"
            " VALUES (%s, %s, %s, %s, %s)"
            " RETURNING id, name, role, key_prefix, created_at, last_used_at, revoked_at",
            (name, role.value, hash_key(key), key[:SHOWN_PREFIX], internal),
        )
        client = cur.fetchone()
    assert client is not None
    return client, key


_AUTHENTICATE = (
    "WITH found AS (SELECT id, name, role, key_prefix, created_at, last_used_at,"
    "  revoked_at FROM api_clients WHERE key_hash = %s AND revoked_at IS NULL),"
    " touched AS (UPDATE api_clients SET last_used_at = now() WHERE id IN"
    "  (SELECT id FROM found WHERE last_used_at IS NULL"
    "   OR last_used_at < now() - interval '1 minute') RETURNING last_used_at)"
    " SELECT id, name, role, key_prefix, created_at,"
    "  COALESCE((SELECT last_used_at FROM touched), last_used_at) AS last_used_at,"
    "  revoked_at FROM found"
)


async def authenticate(conn: psycopg.AsyncConnection, key: str) -> Client | None:
    """The live client holding this key, or None; marks the key as used, to the minute (a
    write, and its commit's flush, at most once a minute per key — not on every request).
    Async: it runs on the API's request path, on the event loop's own connection."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    async with conn.cursor(row_factory=class_row(Client)) as cur:
        await cur.execute(_AUTHENTICATE, (hash_key(key),))
        return await cur.fetchone()


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


def live_client(conn: psycopg.Connection, key: str) -> Client | None:
    """The live client holding this key, or None (no use recorded: a check, not a request)."""
    with conn.cursor(row_factory=class_row(Client)) as cur:
        cur.execute(
            "SELECT id, name, role, key_prefix, created_at, last_used_at, revoked_at"
            " FROM api_clients WHERE key_hash = %s AND revoked_at IS NULL",
            (hash_key(key),),
        )
        return cur.fetchone()


def has_held_admin(conn: psycopg.Connection) -> bool:
    """Whether a live admin key exists that someone holds (not an internal identity)."""
    row = conn.execute(
        "SELECT 1 FROM api_clients WHERE role = 'admin' AND revoked_at IS NULL"
        " AND NOT internal LIMIT 1"
    ).fetchone()
    return row is not None


def ensure_first_admin(conn: psycopg.Connection) -> str | None:
    """Create an admin key when no live admin that someone holds exists; return it (else
    None). The local CLI's identity does not count: nobody has its key."""
    # The lock makes two engine processes starting together create one admin, not two.
    conn.execute("LOCK TABLE api_clients IN SHARE ROW EXCLUSIVE MODE")
    if has_held_admin(conn):
        return None
    _, key = create_client(conn, name="first admin", role=Role.ADMIN)
    return key


# --- sandboxes -------------------------------------------------------------------------------


class SandboxState(StrEnum):
    CREATING = "creating"
    POOLED = "pooled"  # created ahead, no owner: the warm pool
    RUNNING = "running"
    REPAIRING = "repairing"
    LOST = "lost"  # its node is down (a swarm): back when the node is, or destroyed
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    EXPIRED = "expired"


class DestroyReason(StrEnum):
    REQUEST = "request"
    TTL = "ttl"
    ORPHANED = "orphaned"
    RECYCLED = "recycled"  # a pool sandbox past its age, stale or surplus
    SUBMITTED = "submitted"  # the candidate submitted and the template destroys on submit


LIVE_STATES = [
    s.value
    for s in (
        SandboxState.CREATING,
        SandboxState.RUNNING,
        SandboxState.REPAIRING,
        SandboxState.LOST,
    )
]
# States in which an engine process is working on the sandbox's stack (``worker`` names it).
IN_FLIGHT = [
    s.value for s in (SandboxState.CREATING, SandboxState.REPAIRING, SandboxState.DESTROYING)
]
# Which state may follow which; anything else is a conflict.
TRANSITIONS: dict[SandboxState, tuple[SandboxState, ...]] = {
    # A create is not interrupted (its stack is busy): DELETE answers 409 until it settles.
    SandboxState.CREATING: (SandboxState.RUNNING, SandboxState.POOLED, SandboxState.FAILED),
    # A pool sandbox becomes running by a claim (claim_pooled), or is recycled.
    SandboxState.POOLED: (SandboxState.DESTROYING,),
    SandboxState.RUNNING: (SandboxState.DESTROYING, SandboxState.REPAIRING, SandboxState.LOST),
    # Its node is down: started again on it once it is back (a repair), or destroyed.
    SandboxState.LOST: (SandboxState.REPAIRING, SandboxState.DESTROYING),
    # A repair (the stack brought back to its declared state) is not interrupted either.
    SandboxState.REPAIRING: (SandboxState.RUNNING, SandboxState.FAILED),
    SandboxState.FAILED: (SandboxState.DESTROYING,),
    SandboxState.DESTROYING: (SandboxState.DESTROYED, SandboxState.EXPIRED, SandboxState.FAILED),
    SandboxState.DESTROYED: (),
    SandboxState.EXPIRED: (),
}


@dataclass(frozen=True)
class SandboxRow:
    id: str
    owner_id: int | None  # None: a pool sandbox
    template: str
    state: str
    reason: str | None
    created_at: datetime
    expires_at: datetime
    destroyed_at: datetime | None
    outputs: dict[str, object] | None
    error: str | None
    metadata: dict[str, str]
    worker: str | None = None
    warned_for: datetime | None = None
    owner: str | None = None  # the owning key's name


SANDBOX_COLUMNS = (
    "id, owner_id, template, state, reason, created_at, expires_at, destroyed_at, outputs, error,"
    " metadata, worker, warned_for,"
    " (SELECT c.name FROM api_clients c WHERE c.id = sandboxes.owner_id) AS owner"
)


def _utc(column: str) -> str:
    return f"to_char(s.{column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


# A sandbox as the API shows it (api.schemas.SandboxPublic), built by PostgreSQL: a list of
# hundreds is encoded by the database in C, and the engine passes the bytes on untouched.
# Timestamps are written as pydantic writes them (UTC, microseconds, "Z").
SANDBOX_JSON = f"""json_build_object(
    'id', s.id, 'template', s.template, 'state', s.state, 'reason', s.reason,
    'owner', (SELECT c.name FROM api_clients c WHERE c.id = s.owner_id),
    'created_at', {_utc("created_at")}, 'expires_at', {_utc("expires_at")},
    'destroyed_at', CASE WHEN s.destroyed_at IS NULL THEN NULL ELSE {_utc("destroyed_at")} END,
    'endpoints', coalesce(s.outputs -> 'endpoints', '[]'::jsonb),
    'workspace', s.outputs ->> 'workspace',
    'error', s.error, 'metadata', s.metadata,
    'links', json_build_object(
        'self', '/api/v1/sandboxes/' || s.id,
        'events', '/api/v1/sandboxes/' || s.id || '/events',
        'terminal', '/api/v1/ws/terminal/' || s.id,
        'extend', '/api/v1/sandboxes/' || s.id || '/extend',
        'access_tokens', '/api/v1/sandboxes/' || s.id || '/access-tokens'))"""


_SANDBOX_JSON = (
    f"SELECT {SANDBOX_JSON}::text FROM sandboxes s WHERE s.id = %(id)s"
    " AND (%(owner)s::bigint IS NULL OR s.owner_id = %(owner)s)"
)
_SANDBOXES_JSON = (
    "SELECT json_build_object('items', coalesce(json_agg(j ORDER BY created_at DESC),"
    " '[]'))::text FROM ("
    f" SELECT {SANDBOX_JSON} AS j, s.created_at FROM sandboxes s"
    " WHERE (%(owner)s::bigint IS NULL OR s.owner_id = %(owner)s)"
    " AND (%(state)s::text IS NULL OR s.state = %(state)s)"
    " ORDER BY s.created_at DESC LIMIT %(limit)s) listed"
)


async def sandbox_json(
    conn: psycopg.AsyncConnection, sandbox_id: str, *, owner_id: int | None
) -> bytes | None:
    """The API's JSON of one sandbox (``owner_id``: only if that key owns it; None: any)."""
    cur = await conn.execute(_SANDBOX_JSON, {"id": sandbox_id, "owner": owner_id})
    row = await cur.fetchone()
    return str(row[0]).encode() if row else None


async def sandboxes_json(
    conn: psycopg.AsyncConnection, *, owner_id: int | None, state: str | None, limit: int = 200
) -> bytes:
    """``{"items": [...]}``: the API's list, newest first (``owner_id=None``: everyone's)."""
    params = {"owner": owner_id, "state": state, "limit": limit}
    row = await (await conn.execute(_SANDBOXES_JSON, params)).fetchone()
    assert row is not None
    return str(row[0]).encode()


def insert_sandbox(
    conn: psycopg.Connection,
    *,
    sandbox_id: str,
    owner_id: int | None,
    template: str,
    ttl_seconds: int,
    idempotency_key: str | None,
    metadata: dict[str, str] | None = None,
    worker: str | None = None,
    template_digest: str | None = None,
) -> SandboxRow:
    """A new sandbox in ``creating``; ``owner_id=None`` makes a pool sandbox (its "TTL" is
    then the pool's maximum age)."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "INSERT INTO sandboxes (id, owner_id, template, state, expires_at, idempotency_key,"
            " metadata, worker, template_digest)"
            " VALUES (%s, %s, %s, 'creating', now() + make_interval(secs => %s), %s, %s, %s, %s)"
            f" RETURNING {SANDBOX_COLUMNS}",
            (
                sandbox_id,
                owner_id,
                template,
                ttl_seconds,
                idempotency_key,
                Jsonb(metadata or {}),
                worker,
                template_digest,
            ),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def get_sandbox(conn: psycopg.Connection, sandbox_id: str) -> SandboxRow | None:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(f"SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = %s", (sandbox_id,))
        return cur.fetchone()


def find_idempotent(conn: psycopg.Connection, *, owner_id: int, key: str) -> SandboxRow | None:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            f"SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = %s AND idempotency_key = %s",
            (owner_id, key),
        )
        return cur.fetchone()


def list_sandboxes(
    conn: psycopg.Connection, *, owner_id: int | None, state: str | None, limit: int = 200
) -> list[SandboxRow]:
    """Newest first; ``owner_id=None`` lists everyone's (admins)."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            f"SELECT {SANDBOX_COLUMNS} FROM sandboxes"
            " WHERE (%(owner)s::bigint IS NULL OR owner_id = %(owner)s)"
            " AND (%(state)s::text IS NULL OR state = %(state)s)"
            " ORDER BY created_at DESC LIMIT %(limit)s",
            {"owner": owner_id, "state": state, "limit": limit},
        )
        return cur.fetchall()


def count_live(conn: psycopg.Connection, *, owner_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM sandboxes WHERE owner_id = %s AND state = ANY(%s)",
        (owner_id, LIVE_STATES),
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
    worker: str | None = None,
) -> SandboxRow | None:
    """Move a sandbox to ``to`` if its current state allows it; None when it does not.

    One conditional UPDATE: it locks the row and checks the state in the same step, so of two
    requests racing to start a destroy exactly one moves the row (the other sees no row).
    ``worker`` (the engine process taking on the operation) is recorded with the move.
    """
    allowed = [s.value for s, nexts in TRANSITIONS.items() if to in nexts]
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET state = %(to)s,"
            " worker = COALESCE(%(worker)s, worker),"
            " reason = COALESCE(%(reason)s, reason),"
            " outputs = COALESCE(%(outputs)s, outputs),"
            " error = COALESCE(%(error)s, error),"
            " destroyed_at = CASE WHEN %(to)s IN ('destroyed', 'expired') THEN now()"
            "   ELSE destroyed_at END"
            " WHERE id = %(id)s AND state = ANY(%(allowed)s)"
            f" RETURNING {SANDBOX_COLUMNS}",
            {
                "to": to.value,
                "worker": worker,
                "reason": reason,
                "error": error,
                "id": sandbox_id,
                "allowed": allowed,
                "outputs": Jsonb(outputs) if outputs is not None else None,
            },
        )
        row = cur.fetchone()
    if row is not None and to not in (SandboxState.RUNNING, SandboxState.REPAIRING):
        # A sandbox leaving its life (destroyed, expired, failed) takes its AI gateway token
        # along, in the same transaction (the gateway refuses a sandbox not running anyway).
        ai_store.revoke(conn, sandbox_id)
    return row


def begin_destroy(
    conn: psycopg.Connection,
    sandbox_id: str,
    reason: DestroyReason,
    *,
    worker: str | None,
    why: str = "",
) -> SandboxRow | None:
    """Move a sandbox to ``destroying`` with its reason, and say so in its events; None when its
    state does not allow it."""
    row = transition(conn, sandbox_id, SandboxState.DESTROYING, reason=reason.value, worker=worker)
    if row is not None:
        add_event(conn, sandbox_id, "state", f"destroying ({reason})" + (f": {why}" if why else ""))
    return row


def extend(conn: psycopg.Connection, sandbox_id: str, *, expires_at: datetime) -> SandboxRow | None:
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET expires_at = %s"
            f" WHERE id = %s AND state = ANY(%s) RETURNING {SANDBOX_COLUMNS}",
            (expires_at, sandbox_id, LIVE_STATES),
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


async def add_event_async(
    conn: psycopg.AsyncConnection, sandbox_id: str, kind: str, message: str = ""
) -> None:
    """``add_event`` on an async connection (the AI gateway's, the egress proxy's)."""
    await conn.execute(
        "INSERT INTO sandbox_events (sandbox_id, kind, message) VALUES (%s, %s, %s)",
        (sandbox_id, kind, message[:2000]),
    )
    await conn.execute("SELECT pg_notify('sandbox_events', %s)", (sandbox_id,))


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
            " FROM api_clients WHERE internal AND name = 'local cli' AND role = 'admin'"
            " AND revoked_at IS NULL"
        )
        found = cur.fetchone()
    if found:
        return found
    client, _ = create_client(conn, name="local cli", role=Role.ADMIN, internal=True)
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


def lock_expired(conn: psycopg.Connection, *, now: datetime, limit: int) -> list[SandboxRow]:
    """Lock up to ``limit`` running, failed or pooled sandboxes past their expiry (a pool
    sandbox's is its maximum age), skipping rows another transaction holds (the reaper's
    claim)."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            f"SELECT {SANDBOX_COLUMNS} FROM sandboxes"
            " WHERE state IN ('running', 'lost', 'failed', 'pooled') AND expires_at <= %s"
            " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, limit),
        )
        return cur.fetchall()


def engine_instance(conn: psycopg.Connection) -> str:
    """This engine's identity (made by the migrations), carried as a label by its objects."""
    row = conn.execute("SELECT id FROM engine_instance").fetchone()
    assert row is not None, "the engine_instance row is made by migration 0002"
    return str(row[0])


def should_warn(row: SandboxRow, now: datetime, before: timedelta) -> bool:
    """Running, within ``before`` of its expiry, and not yet warned about this expiry (an
    extension moves ``expires_at`` away from ``warned_for``: the old warning no longer counts)."""
    return (
        row.state == SandboxState.RUNNING
        and now < row.expires_at <= now + before
        and row.warned_for != row.expires_at
    )


def claim_warnings(
    conn: psycopg.Connection, *, now: datetime, before: timedelta, limit: int = 50
) -> list[SandboxRow]:
    """Mark the sandboxes due an expiry warning as warned and return them: one UPDATE, so of
    several engine processes exactly one sends each warning."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET warned_for = expires_at WHERE id IN ("
            " SELECT id FROM sandboxes WHERE state = 'running'"
            " AND expires_at > %(now)s AND expires_at <= %(until)s"
            " AND warned_for IS DISTINCT FROM expires_at"
            " ORDER BY expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            f" RETURNING {SANDBOX_COLUMNS}",
            {"now": now, "until": now + before, "limit": limit},
        )
        return cur.fetchall()


def in_flight(conn: psycopg.Connection) -> list[SandboxRow]:
    """Sandboxes some engine process is (or was, before it died) working on."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            f"SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = ANY(%s) ORDER BY created_at",
            (IN_FLIGHT,),
        )
        return cur.fetchall()


def take_over(
    conn: psycopg.Connection, sandbox_id: str, *, dead: str | None, worker: str
) -> SandboxRow | None:
    """Make ``worker`` the owner of an in-flight sandbox whose owner ``dead`` has died; None
    when another process took it over first (or it settled meanwhile)."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET worker = %s WHERE id = %s AND worker IS NOT DISTINCT FROM %s"
            f" AND state = ANY(%s) RETURNING {SANDBOX_COLUMNS}",
            (worker, sandbox_id, dead, IN_FLIGHT),
        )
        return cur.fetchone()


def states_of(conn: psycopg.Connection, ids: list[str]) -> dict[str, str]:
    rows = conn.execute("SELECT id, state FROM sandboxes WHERE id = ANY(%s)", (ids,)).fetchall()
    return {str(r[0]): str(r[1]) for r in rows}


def repairs_of(conn: psycopg.Connection, sandbox_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM sandbox_events WHERE sandbox_id = %s AND kind = 'repair'",
        (sandbox_id,),
    ).fetchone()
    return int(row[0]) if row else 0


# --- the warm pool ---------------------------------------------------------------------------


def claim_pooled(
    conn: psycopg.Connection,
    *,
    template: str,
    digest: str,
    owner_id: int,
    ttl_seconds: int,
    idempotency_key: str | None,
    metadata: dict[str, str] | None,
) -> SandboxRow | None:
    """Give the oldest ready pool sandbox of this template (made from this version of it) to
    ``owner_id``: running, created now, expiring ``ttl_seconds`` from now. One UPDATE over a
    ``SKIP LOCKED`` pick, so concurrent claims take different sandboxes. None: the pool is
    empty."""
    with conn.cursor(row_factory=class_row(SandboxRow)) as cur:
        cur.execute(
            "UPDATE sandboxes SET state = 'running', owner_id = %(owner)s, created_at = now(),"
            " expires_at = now() + make_interval(secs => %(ttl)s), warned_for = NULL,"
            " idempotency_key = %(key)s, metadata = %(metadata)s"
            " WHERE id = (SELECT id FROM sandboxes WHERE owner_id IS NULL AND state = 'pooled'"
            "  AND template = %(template)s AND template_digest = %(digest)s"
            "  AND expires_at > now() + interval '1 minute'"
            "  ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {SANDBOX_COLUMNS}",
            {
                "owner": owner_id,
                "ttl": ttl_seconds,
                "key": idempotency_key,
                "metadata": Jsonb(metadata or {}),
                "template": template,
                "digest": digest,
            },
        )
        return cur.fetchone()


@dataclass(frozen=True)
class PoolEntry:
    id: str
    template: str
    state: str
    template_digest: str | None
    created_at: datetime


def pool_entries(conn: psycopg.Connection, template: str | None = None) -> list[PoolEntry]:
    """Pool sandboxes being made or ready (of one template, or all), oldest first."""
    with conn.cursor(row_factory=class_row(PoolEntry)) as cur:
        cur.execute(
            "SELECT id, template, state, template_digest, created_at FROM sandboxes"
            " WHERE owner_id IS NULL AND state IN ('creating', 'pooled')"
            " AND (%(t)s::text IS NULL OR template = %(t)s) ORDER BY created_at",
            {"t": template},
        )
        return cur.fetchall()


def lock_pool(conn: psycopg.Connection, template: str) -> None:
    """Serialise pool decisions for one template across engine processes (until commit)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('sandbox-pool:' || %s))", (template,))


# --- the stack reserve -----------------------------------------------------------------------


def take_reserved_stack(conn: psycopg.Connection) -> str | None:
    """Take the oldest ready reserved stack (its id becomes the new sandbox's); None when the
    reserve is empty."""
    row = conn.execute(
        "DELETE FROM stack_reserve WHERE id = (SELECT id FROM stack_reserve WHERE ready"
        " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
    ).fetchone()
    return str(row[0]) if row else None


def plan_reserve(conn: psycopg.Connection, *, size: int, worker: str) -> list[str]:
    """Record the ids of the stacks to initialise so the reserve reaches ``size`` (under a
    lock: processes sharing the database do not overfill); returns them."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('sandbox-stack-reserve'))")
    row = conn.execute("SELECT count(*) FROM stack_reserve").fetchone()
    have = int(row[0]) if row else 0
    ids = [secrets.token_hex(5) for _ in range(max(0, size - have))]
    for sid in ids:
        conn.execute("INSERT INTO stack_reserve (id, worker) VALUES (%s, %s)", (sid, worker))
    return ids


def reserve_ready(conn: psycopg.Connection, sandbox_id: str) -> None:
    conn.execute("UPDATE stack_reserve SET ready = true WHERE id = %s", (sandbox_id,))


def drop_reserved(conn: psycopg.Connection, sandbox_id: str) -> None:
    conn.execute("DELETE FROM stack_reserve WHERE id = %s", (sandbox_id,))


def reserve_entries(conn: psycopg.Connection) -> list[tuple[str, bool, str | None]]:
    """(id, ready, worker) of every reserved stack."""
    rows = conn.execute("SELECT id, ready, worker FROM stack_reserve ORDER BY created_at")
    return [(str(r[0]), bool(r[1]), r[2]) for r in rows.fetchall()]
