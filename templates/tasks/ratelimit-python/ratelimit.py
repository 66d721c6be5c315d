"""A token bucket: `capacity` requests at once, refilled at `rate` requests per second."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = capacity
        self.clock = clock

    def allow(self, key: str) -> bool:
        """True when `key` may make one more request now."""
        raise NotImplementedError
