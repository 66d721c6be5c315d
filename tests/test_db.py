"""The project's PostgreSQL cluster."""

from __future__ import annotations

import psycopg

from engine.settings import Settings


def test_psycopg_connects_to_the_project_database(settings: Settings) -> None:
    with psycopg.connect(settings.database_url.get_secret_value(), connect_timeout=5) as conn:
        row = conn.execute("select current_database(), current_user, version()").fetchone()
    assert row is not None
    database, user, server = row
    assert (database, user) == ("sandbox", "sandbox")
    assert server.startswith("PostgreSQL")
