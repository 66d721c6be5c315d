"""The AI gateway's port, taken in turn by the tests whose sandboxes reach it: the host
firewall admits sandboxes to that one port (SANDBOX_GATEWAY_PORT), so their engines cannot
each listen on a port of their own."""

from __future__ import annotations

import fcntl
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.settings import Settings

LOCK = Path("/tmp/sandbox-engine-test-gateway.lock")


@contextmanager
def gateway_port(timeout_hint: str = "") -> Iterator[int]:
    """Hold the gateway's port for the block (other test processes wait their turn); fails
    naming it when something outside the tests listens there (a running `make run`)."""
    port = Settings().gateway_port
    with LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("0.0.0.0", port))
                except OSError:
                    pytest.fail(
                        f"port {port} (SANDBOX_GATEWAY_PORT) is taken: stop what listens there"
                        f" (a running `make run`?) {timeout_hint}".strip()
                    )
            yield port
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
