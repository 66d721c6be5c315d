"""A sandbox's AI budget: what an exchange bills, what a request holds while in flight, and
whether it may start. Pure.

- **Billed tokens** of an exchange: input + cache creation + output tokens, plus a tenth of the
  cache-read tokens (rounded up) — cache reads cost a tenth of an input token, and Claude Code
  re-reads its cached prompt on every request, so counting them whole would spend a budget
  ten times faster than the bill.
- **A reservation** per request in flight: its output cap (``max_tokens``, as forwarded) plus a
  third of its body's bytes, an upper bound of its input tokens (a token is three bytes or
  more of the JSON that carries it; images are far more).
- **Admission**: a request may start while the tokens billed so far plus the reservations of
  the requests already in flight stay below the budget ("would it start over budget?").

The overshoot this allows: once the budget is reached nothing more starts, and every request
that started fit beside the others' reservations, so the total billed exceeds the budget by at
most one request's reservation — its ``max_tokens`` plus a third of its body — however many
requests arrive at once (tests/test_gateway.py sends 20 at the budget's edge).
"""

from __future__ import annotations

from collections.abc import Mapping

# Bytes of request body per reserved input token.
BYTES_PER_TOKEN = 3


def billed(usage: Mapping[str, int]) -> int:
    """Tokens an exchange counts against the budget (module docstring)."""
    cache_read = int(usage.get("cache_read_input_tokens", 0))
    return (
        int(usage.get("input_tokens", 0))
        + int(usage.get("cache_creation_input_tokens", 0))
        + int(usage.get("output_tokens", 0))
        + -(-cache_read // 10)
    )


def reservation(body_bytes: int, max_tokens: int) -> int:
    """What a request holds against the budget while it runs."""
    return max_tokens + -(-body_bytes // BYTES_PER_TOKEN)


def admits(*, used: int, reserved: int, budget: int) -> bool:
    """Whether a request may start: billed so far plus the others' reservations below it."""
    return used + reserved < budget


def overshoot_bound(body_bytes: int, max_tokens: int) -> int:
    """The most a sandbox's total can pass its budget by (module docstring)."""
    return reservation(body_bytes, max_tokens)
