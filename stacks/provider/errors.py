"""Errors a resource raises; the server turns them into gRPC errors or check failures.

ProviderError            an operation failed; message for the user
├── PropertyError        …because of one property's value (named in the message)
└── NotFound             the Docker object does not exist (delete treats it as success)
"""

from __future__ import annotations


class ProviderError(Exception):
    pass


class PropertyError(ProviderError):
    def __init__(self, prop: str, reason: str) -> None:
        super().__init__(f"property {prop!r}: {reason}")
        self.prop = prop
        self.reason = reason


class NotFound(ProviderError):
    pass


class CheckFailures(ProviderError):
    """Input validation found problems; each is (property, reason)."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {r}" for p, r in failures))
        self.failures = failures
