"""Egress rules in the database: each restricted sandbox's addresses and rules (written by the
engine when its workspace runs), read by the proxy by a connection's address."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

# A sandbox's rules apply while it can run something: from its create (the task's commands
# run before it is `running`) until its destroy begins.
LIVE_STATES = ("creating", "pooled", "running", "repairing", "lost")


def record(conn: psycopg.Connection, sandbox_id: str, addresses: list[str], rules: Any) -> None:
    conn.execute(
        "INSERT INTO egress_rules (sandbox_id, addresses, rules) VALUES (%s, %s::inet[], %s)"
        " ON CONFLICT (sandbox_id) DO UPDATE SET addresses = excluded.addresses,"
        " rules = excluded.rules, updated_at = now()",
        (sandbox_id, addresses, Jsonb(rules)),
    )


async def rules_at(conn: psycopg.AsyncConnection, address: str) -> tuple[str, str, Any] | None:
    """(sandbox id, template, rules) of the live sandbox at this address, or None."""
    cur = await conn.execute(
        "SELECT r.sandbox_id, s.template, r.rules FROM egress_rules r"
        " JOIN sandboxes s ON s.id = r.sandbox_id"
        " WHERE r.addresses @> ARRAY[%s::inet] AND s.state = ANY(%s)"
        " ORDER BY r.updated_at DESC LIMIT 1",
        (address, list(LIVE_STATES)),
    )
    row = await cur.fetchone()
    return (str(row[0]), str(row[1]), row[2]) if row else None
