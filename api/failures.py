"""Authentication failures counted per client address; past the limit, the address is refused
(429 with Retry-After) before its credential is even looked at.

While an address is limited, every request from it that needs a credential is refused, a valid
key's too: the usual rule, and the simple one (a guesser learns nothing from the answers), and
the address is let in again once its oldest failure is a minute old. Requests that need no
credential (health, metrics, the UI's files) are never limited. The address is the
connection's peer as uvicorn reports it: ``X-Forwarded-For`` counts only from the proxies
uvicorn trusts (``FORWARDED_ALLOW_IPS``, default 127.0.0.1).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from starlette.requests import HTTPConnection

WINDOW = 60.0  # seconds
# Addresses remembered at most: past this, addresses with no failure in the window are dropped
# first, then the oldest (a spray from many addresses must not grow the table without bound).
MAX_ADDRESSES = 100_000


class AuthFailures:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def _window(self, address: str, now: float) -> deque[float] | None:
        window = self._seen.get(address)
        while window and now - window[0] >= WINDOW:
            window.popleft()
        return window

    def retry_after(self, address: str) -> int | None:
        """Seconds until the address may try again, or None when it is not limited."""
        now = self.clock()
        window = self._window(address, now)
        if not window or len(window) < self.per_minute:
            return None
        return max(1, math.ceil(window[0] + WINDOW - now))

    def failed(self, address: str) -> None:
        now = self.clock()
        window = self._window(address, now)
        if window is None:
            if len(self._seen) >= MAX_ADDRESSES:
                self._forget(now)
            window = self._seen[address] = deque()
        window.append(now)
        # Failures past the limit need not be kept: the window only has to reach it.
        while len(window) > self.per_minute:
            window.popleft()

    def _forget(self, now: float) -> None:
        for address in [a for a, w in self._seen.items() if not w or now - w[-1] >= WINDOW]:
            del self._seen[address]
        while len(self._seen) >= MAX_ADDRESSES:
            del self._seen[next(iter(self._seen))]


def address(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else ""
