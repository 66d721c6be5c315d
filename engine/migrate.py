"""Plain SQL migrations (``engine/migrations/NNNN_name.sql``), applied in order, once each.

A ``schema_version`` table records what ran. Each migration runs in its own transaction, and
an advisory lock keeps two processes starting at once from applying the same one twice.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

MIGRATIONS = Path(__file__).parent / "migrations"
# An arbitrary constant: the advisory lock every engine process takes while migrating.
LOCK_ID = 0x5A4E_D80C


def pending(conn: psycopg.Connection, folder: Path = MIGRATIONS) -> list[Path]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version int PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
    return [p for p in sorted(folder.glob("*.sql")) if int(p.name[:4]) not in done]


def migrate(conninfo: str, folder: Path = MIGRATIONS) -> list[str]:
    """Apply every pending migration; return the names applied."""
    if not any(folder.glob("*.sql")):
        # An installation without its SQL files (package data) would run on no schema at all.
        raise RuntimeError(f"no migrations in {folder}: the engine is installed incompletely")
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        try:
            for path in pending(conn, folder):
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute(
                        "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                        (int(path.name[:4]), path.stem),
                    )
                applied.append(path.stem)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    return applied
