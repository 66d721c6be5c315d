"""The AI gateway's tables: per-sandbox tokens, budgets and usage, and the exchanges.

A token is ``sgt_`` and 43 random URL-safe characters; only its SHA-256 is stored, with the
workspace's own addresses (the only peers it is good from). A token is good while its sandbox
is ``running`` and it is not revoked (destroy and expiry revoke it; admission checks the state
as well, so a sandbox on its way out is refused even before its revocation commits).
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from engine.ai.budget import admits
from engine.ai.transcript import Prior
from engine.ai.transcript import entry as transcript_entry

TOKEN_PREFIX = "sgt_"  # noqa: S105 (a prefix, not a secret)
# Exchanges still open after this long are a gateway that died mid-answer: their reservation
# no longer holds the budget.
STALE_RESERVATION = timedelta(minutes=15)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def mint(
    conn: psycopg.Connection,
    *,
    sandbox_id: str,
    owner_id: int | None,
    template: str,
    model: str | None,
    max_tokens: int,
    budget_tokens: int,
    addresses: list[str],
) -> str:
    """A new token for the sandbox (replacing any earlier one) and its budget row; returns
    the token, which goes into the sandbox and nowhere else."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO ai_tokens (sandbox_id, token_hash, addresses) VALUES (%s, %s, %s::inet[])"
        " ON CONFLICT (sandbox_id) DO UPDATE SET token_hash = excluded.token_hash,"
        " addresses = excluded.addresses, created_at = now(), revoked_at = NULL",
        (sandbox_id, hash_token(token), addresses),
    )
    conn.execute(
        "INSERT INTO ai_usage (sandbox_id, owner_id, template, model, max_tokens, budget_tokens)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (sandbox_id) DO UPDATE SET"
        " owner_id = excluded.owner_id, template = excluded.template, model = excluded.model,"
        " max_tokens = excluded.max_tokens, budget_tokens = excluded.budget_tokens",
        (sandbox_id, owner_id, template, model, max_tokens, budget_tokens),
    )
    return token


def revoke(conn: psycopg.Connection, sandbox_id: str) -> bool:
    """The sandbox's token stops working at once; True if there was a live one."""
    cur = conn.execute(
        "UPDATE ai_tokens SET revoked_at = now() WHERE sandbox_id = %s AND revoked_at IS NULL",
        (sandbox_id,),
    )
    return cur.rowcount == 1


# --- the gateway's request path (async: it runs on the event loop's own connections) --------


@dataclass(frozen=True)
class Admission:
    """A request allowed to start (``exchange`` set) or refused (``refused`` set)."""

    sandbox_id: str | None
    template: str | None
    model: str | None
    max_tokens: int
    exchange: int | None = None
    refused: str | None = None  # token | address | model | budget | wait (nothing recorded)
    detail: str = ""


# One statement, one round trip: the budget row is updated only if the request may start,
# and its reservation added in the same step. A concurrent admission of the same sandbox waits
# for the row and re-checks the condition against the row as the other left it (PostgreSQL's
# re-evaluation of UPDATE ... WHERE under READ COMMITTED), so two requests never pass the
# budget together.
_ADMIT = """
WITH tok AS (
    SELECT t.sandbox_id, t.addresses FROM ai_tokens t JOIN sandboxes s ON s.id = t.sandbox_id
     WHERE t.token_hash = %(hash)s AND t.revoked_at IS NULL AND s.state = 'running'
), admitted AS (
    UPDATE ai_usage u SET reserved_tokens = u.reserved_tokens + %(reserved)s
      FROM tok
     WHERE u.sandbox_id = tok.sandbox_id
       AND %(peer)s::inet = ANY(tok.addresses)
       AND (u.model IS NULL OR %(model)s::text IS NULL OR u.model = %(model)s::text)
       AND (%(kind)s <> 'messages' OR u.used_tokens + u.reserved_tokens < u.budget_tokens)
    RETURNING u.sandbox_id, u.template, u.model, u.max_tokens
), opened AS (
    INSERT INTO ai_exchanges (sandbox_id, kind, reserved, session_id, agent_id, side, model,
                              stream)
    SELECT sandbox_id, %(kind)s, %(reserved)s, %(session)s, %(agent)s, %(side)s, %(model)s,
           %(stream)s FROM admitted
    RETURNING id, sandbox_id
)
SELECT a.sandbox_id, a.template, a.model, a.max_tokens, o.id
  FROM admitted a JOIN opened o USING (sandbox_id)
"""

# Why a request was not admitted (the slow path: refusals only).
_WHY = """
SELECT t.sandbox_id, t.addresses::text[] AS addresses, u.template, u.model, u.max_tokens,
       u.budget_tokens, u.used_tokens, u.reserved_tokens AS reserved, s.state
  FROM ai_tokens t
  JOIN ai_usage u ON u.sandbox_id = t.sandbox_id
  LEFT JOIN sandboxes s ON s.id = t.sandbox_id
 WHERE t.token_hash = %(hash)s AND t.revoked_at IS NULL
"""

_REFUSED = """
INSERT INTO ai_exchanges (sandbox_id, kind, session_id, agent_id, side, model, stream, refused,
                          error, finished_at)
VALUES (%(sandbox)s, %(kind)s, %(session)s, %(agent)s, %(side)s, %(model)s, %(stream)s,
        %(refused)s, %(error)s, now())
"""


async def admit(
    conn: psycopg.AsyncConnection,
    *,
    token: str,
    peer: str,
    kind: str,
    model: str | None,
    reserve: int,
    session: str | None,
    agent: str | None,
    side: bool,
    stream: bool,
    final: bool = True,
) -> Admission:
    """Check the token (live, its sandbox running, from its sandbox's own address), the model
    and the budget, and open the exchange holding ``reserve`` tokens (the statement above:
    concurrent requests cannot pass the budget together). A refused request is recorded as
    such, with the reason. Not ``final``: a request the budget refuses only for the
    reservations of requests still in flight is answered ``wait`` (nothing recorded): they
    may end under their reservations and leave it room. ``conn`` is in autocommit mode."""
    params = {
        "hash": hash_token(token),
        "peer": peer or "0.0.0.0",  # noqa: S104 (an address no token is good from)
        "model": model,
        "kind": kind,
        "reserved": reserve if kind == "messages" else 0,
        "session": session,
        "agent": agent,
        "side": side,
        "stream": stream,
    }
    try:
        cur = await conn.execute(_ADMIT, params)
    except psycopg.errors.InvalidTextRepresentation:  # the peer is no address at all
        return Admission(None, None, None, 0, refused="token", detail="unknown or revoked")
    found = await cur.fetchone()
    if found is not None:
        return Admission(found[0], found[1], found[2], found[3], exchange=found[4])
    why = await (await conn.cursor(row_factory=dict_row).execute(_WHY, params)).fetchone()
    if why is None or why["state"] != "running":
        return Admission(None, None, None, 0, refused="token", detail="unknown or revoked")
    refused, detail = _decide(why, peer=peer, kind=kind, model=model)
    if refused is None:  # admitted meanwhile by the numbers: a race with a finish; try again
        refused, detail = "budget", "busy"
    if refused == "budget" and (not final) and why["used_tokens"] < why["budget_tokens"]:
        return Admission(why["sandbox_id"], why["template"], why["model"], 0, refused="wait")
    async with conn.transaction():
        await conn.execute(_REFUSED, {**params, "sandbox": why["sandbox_id"], "refused": refused,
                                      "error": detail})  # fmt: skip
        await conn.execute(
            "UPDATE ai_usage SET refused = refused + 1 WHERE sandbox_id = %s", (why["sandbox_id"],)
        )
    return Admission(why["sandbox_id"], why["template"], why["model"], why["max_tokens"],
                     refused=refused, detail=detail)  # fmt: skip


def _decide(
    row: dict[str, Any], *, peer: str, kind: str, model: str | None
) -> tuple[str | None, str]:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return "address", f"from {peer!r}"
    allowed = {ipaddress.ip_address(a.split("/")[0]) for a in row["addresses"] or []}
    if address not in allowed:
        return "address", f"from {peer}, not from its sandbox"
    if row["model"] and model and model != row["model"]:
        return "model", f"this sandbox may use the model {row['model']} only, not {model}"
    if kind == "messages" and not admits(
        used=row["used_tokens"], reserved=row["reserved"], budget=row["budget_tokens"]
    ):
        return "budget", (
            f"this sandbox's AI budget is used up ({row['used_tokens']:,} of"
            f" {row['budget_tokens']:,} tokens)"
        )
    return None, ""


async def prior(
    conn: psycopg.AsyncConnection, sandbox_id: str, session: str | None, agent: str | None
) -> Prior | None:
    """The conversation's last recorded request (for the next request's delta)."""
    cur = await conn.execute(
        "SELECT message_count, first_digest, last_digest FROM ai_exchanges"
        " WHERE sandbox_id = %s AND session_id IS NOT DISTINCT FROM %s"
        " AND agent_id IS NOT DISTINCT FROM %s AND kind = 'messages' AND message_count > 0"
        " AND refused IS NULL ORDER BY id DESC LIMIT 1",
        (sandbox_id, session, agent),
    )
    found = await cur.fetchone()
    return Prior(found[0], found[1], found[2]) if found else None


@dataclass(frozen=True)
class Finished:
    status: int
    usage: dict[str, int]
    billed: int
    model: str | None
    message_count: int
    first_digest: str | None
    last_digest: str | None
    first_message: int
    messages: list[Any]
    answer: dict[str, Any] | None
    error: str | None
    first_byte_ms: float | None
    upstream_ms: float | None


async def finish(
    conn: psycopg.AsyncConnection,
    exchange: int,
    sandbox_id: str,
    done: Finished,
    *,
    event: str | None = None,
) -> None:
    """Close an exchange: what it said and billed; the sandbox's usage grows by it, its
    reservation is given back; ``event``: a line for the sandbox's activity timeline. One
    transaction, its statements sent at once."""
    u = done.usage
    async with conn.transaction(), conn.pipeline():
        await conn.execute(
            "WITH closed AS (UPDATE ai_exchanges e SET finished_at = now(), status = %s,"
            " usage = %s, billed = %s, model = coalesce(%s, e.model), message_count = %s,"
            " first_digest = %s, last_digest = %s, first_message = %s, messages = %s,"
            " answer = %s, error = %s, first_byte_ms = %s, upstream_ms = %s, reserved = 0"
            " FROM (SELECT id, reserved AS held FROM ai_exchanges WHERE id = %s"
            " AND finished_at IS NULL FOR UPDATE) old WHERE e.id = old.id RETURNING old.held)"
            " UPDATE ai_usage SET used_tokens = used_tokens + %s, requests = requests + 1,"
            " input_tokens = input_tokens + %s, output_tokens = output_tokens + %s,"
            " cache_creation_tokens = cache_creation_tokens + %s,"
            " cache_read_tokens = cache_read_tokens + %s,"
            " reserved_tokens = greatest(0, reserved_tokens - (SELECT held FROM closed))"
            " WHERE sandbox_id = %s AND EXISTS (SELECT 1 FROM closed)",
            (done.status, Jsonb(done.usage), done.billed, done.model, done.message_count,
             done.first_digest, done.last_digest, done.first_message, Jsonb(done.messages),
             Jsonb(done.answer) if done.answer is not None else None, done.error,
             done.first_byte_ms, done.upstream_ms, exchange,
             done.billed, u.get("input_tokens", 0), u.get("output_tokens", 0),
             u.get("cache_creation_input_tokens", 0), u.get("cache_read_input_tokens", 0),
             sandbox_id),
        )  # fmt: skip
        if event:
            await conn.execute(
                "INSERT INTO sandbox_events (sandbox_id, kind, message) VALUES (%s, 'ai', %s)",
                (sandbox_id, event[:2000]),
            )
            await conn.execute("SELECT pg_notify('sandbox_events', %s)", (sandbox_id,))


def release_stale(conn: psycopg.Connection) -> int:
    """Exchanges a gateway left open when it died (older than STALE_RESERVATION) are closed
    and their reservations given back (the reaper, every pass); how many."""
    cur = conn.execute(
        "WITH stale AS (UPDATE ai_exchanges e SET finished_at = now(), reserved = 0,"
        " error = coalesce(e.error, 'the gateway stopped before the answer ended')"
        " FROM (SELECT id, reserved AS held FROM ai_exchanges WHERE finished_at IS NULL"
        " AND started_at < now() - %s FOR UPDATE) old WHERE e.id = old.id"
        " RETURNING e.sandbox_id, old.held)"
        " UPDATE ai_usage u SET reserved_tokens = greatest(0, u.reserved_tokens - s.total)"
        " FROM (SELECT sandbox_id, sum(held) AS total FROM stale GROUP BY sandbox_id) s"
        " WHERE u.sandbox_id = s.sandbox_id RETURNING u.sandbox_id",
        (STALE_RESERVATION,),
    )
    return len(cur.fetchall())


# --- reading (the API: the owner and admins) -------------------------------------------------


def usage(conn: psycopg.Connection, sandbox_id: str) -> dict[str, Any] | None:
    """The sandbox's budget, usage and Claude Code sessions; None when it never had a token."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT owner_id, template, model, max_tokens, budget_tokens, used_tokens,"
            " input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens, requests,"
            " refused FROM ai_usage WHERE sandbox_id = %s",
            (sandbox_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute(
            "SELECT session_id, min(started_at) AS started_at, max(coalesce(finished_at,"
            " started_at)) AS last_at, count(*) AS exchanges,"
            " count(*) FILTER (WHERE refused IS NOT NULL) AS refused,"
            " coalesce(sum(billed), 0)::bigint AS billed,"
            " array_remove(array_agg(DISTINCT agent_id), NULL) AS agents"
            " FROM ai_exchanges WHERE sandbox_id = %s AND kind = 'messages'"
            " GROUP BY session_id ORDER BY min(started_at)",
            (sandbox_id,),
        )
        row["sessions"] = cur.fetchall()
    return row


def exchanges(conn: psycopg.Connection, sandbox_id: str) -> list[dict[str, Any]]:
    """Every exchange of the sandbox's conversations, in order (count_tokens calls left out)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT id, started_at, finished_at, session_id, agent_id, side, model, status,"
            " refused, usage, first_message, messages, answer, error FROM ai_exchanges"
            " WHERE sandbox_id = %s AND kind = 'messages' ORDER BY id",
            (sandbox_id,),
        )
        return cur.fetchall()


def owner_of(conn: psycopg.Connection, sandbox_id: str) -> tuple[bool, int | None]:
    """(whether the sandbox has AI usage at all, its owner when it had)."""
    row = conn.execute(
        "SELECT owner_id FROM ai_usage WHERE sandbox_id = %s", (sandbox_id,)
    ).fetchone()
    return (row is not None, row[0] if row else None)


def prune(conn: psycopg.Connection, *, now: datetime, retention: timedelta) -> int:
    """Delete usage and exchanges of sandboxes whose usage began before the retention period
    (recordings' retention: the transcript goes with the terminal sessions)."""
    cur = conn.execute(
        "DELETE FROM ai_usage WHERE created_at < %s RETURNING sandbox_id", (now - retention,)
    )
    gone = [r[0] for r in cur.fetchall()]
    if gone:
        conn.execute("DELETE FROM ai_exchanges WHERE sandbox_id = ANY(%s)", (gone,))
        conn.execute("DELETE FROM ai_tokens WHERE sandbox_id = ANY(%s)", (gone,))
    return len(gone)


def document(conn: psycopg.Connection, sandbox_id: str) -> bytes | None:
    """The sandbox's AI usage and transcript as one JSON document (the archive's copy); None
    when it never used the gateway."""
    found = usage(conn, sandbox_id)
    rows = exchanges(conn, sandbox_id) if found is not None else []
    if found is None or not rows:
        return None
    found.pop("owner_id", None)
    entries = [transcript_entry(row) for row in rows]
    return orjson.dumps({"sandbox": sandbox_id, "usage": found, "exchanges": entries},
                        option=orjson.OPT_INDENT_2)  # fmt: skip
