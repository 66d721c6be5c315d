"""Worker leases: which engine processes are alive, told by PostgreSQL itself.

Every engine process (an API server, ``sandbox-engine reap``, a CLI command) takes a session
advisory lock on its own worker id, on a connection it keeps for its whole life, and records
that id on the sandboxes whose operations it runs. When the process dies — even by kill -9 —
its connection closes and PostgreSQL drops the lock at once. Another process finds a sandbox
stuck in ``creating``, ``repairing`` or ``destroying``, tries the lock of the worker named on
it, and only if it gets the lock (the owner is dead) settles the sandbox. No heartbeat and no
timeout: a slow operation of a live process is never taken over.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

import psycopg

_KEY = "SELECT hashtextextended(%s, 0)"


class WorkerLease:
    def __init__(self, conninfo: str) -> None:
        host = socket.gethostname()[:30]
        self.id = f"{host}-{os.getpid()}-{secrets.token_hex(3)}"
        self._conninfo = conninfo
        self._conn: psycopg.Connection | None = None
        self._guard = threading.Lock()
        self._leading: set[str] = set()  # duties this process holds the lock of

    def acquire(self) -> None:
        """Open the lease's connection and take the lock (idempotent; reconnects if the
        connection was lost, e.g. by a database restart)."""
        with self._guard:
            if self._conn is not None and not self._conn.closed:
                try:
                    self._conn.execute("SELECT 1")
                    return
                except psycopg.Error:
                    self._conn.close()
            conn = psycopg.connect(self._conninfo, autocommit=True, application_name=self.id)
            conn.execute(f"SELECT pg_advisory_lock(({_KEY}))", (self.id,))
            self._conn = conn
            self._leading.clear()  # a new session holds none of them

    def lead(self, duty: str) -> bool:
        """Whether this process does ``duty`` for every engine on the database (the reaper's
        pass: expiry, recovery, drift, pool refills, the orphan sweep): the first to ask takes
        its lock on the lease's connection and keeps it for its life; when it dies the next
        one to ask takes it over. Once per cluster, not once per engine."""
        self.acquire()
        with self._guard:
            if duty in self._leading:
                return True
            assert self._conn is not None
            row = self._conn.execute(
                f"SELECT pg_try_advisory_lock(({_KEY}))", (f"duty:{duty}",)
            ).fetchone()
            if row and row[0]:
                self._leading.add(duty)
                return True
            return False

    def release(self) -> None:
        with self._guard:
            if self._conn is not None:
                self._conn.close()  # closing the session releases the lock
                self._conn = None
            self._leading.clear()


def is_alive(conn: psycopg.Connection, worker: str) -> bool:
    """Whether the process holding ``worker``'s lease still lives. Must run on a connection
    other than that worker's own lease connection (a session's own lock is re-entrant)."""
    row = conn.execute(f"SELECT pg_try_advisory_lock(({_KEY}))", (worker,)).fetchone()
    if row and row[0]:
        conn.execute(f"SELECT pg_advisory_unlock(({_KEY}))", (worker,))
        return False
    return True
