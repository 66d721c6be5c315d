"""The activity timeline reads a sandbox's events as what happened (a pure function)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from engine.hiring.timeline import timeline
from engine.store import Event

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
EVENTS = [
    ("state", "creating"),
    ("progress", "create docker:index/network:Network network"),
    ("task", "copied 3 files of tasks/hello into /home/coder/workspace"),
    ("task", "$ python3 -m unittest"),
    ("task", "exit 0: python3 -m unittest"),
    ("state", "running"),
    ("terminal", "connected: candidate"),
    ("terminal", "idle 7 min: 12:10-12:17 UTC"),
    ("expiry_warning", "Sandbox expires in 5 min"),
    ("extended", "expires 2026-11-27T13:30:00Z"),
    ("terminal", "disconnected: candidate after 40 min"),
    ("submit", "submitted by candidate"),
    ("archive", "archived: 12 files, 34 KiB (submitted)"),
    ("orphan", "swept"),
    ("state", "destroying (ttl)"),
    ("progress", "delete docker:index/container:Container workspace"),
    ("state", "expired"),
]


def test_a_timeline_keeps_what_a_reviewer_needs_in_order() -> None:
    events = [
        Event(id=i, sandbox_id="abc123", at=T0 + timedelta(minutes=i), kind=k, message=m)
        for i, (k, m) in enumerate(EVENTS)
    ]
    got = [(e.what, e.detail) for e in timeline(events)]
    assert got == [
        ("created", "creating"),
        ("task", "copied 3 files of tasks/hello into /home/coder/workspace"),
        ("running", "running"),
        ("terminal", "connected: candidate"),
        ("idle", "idle 7 min: 12:10-12:17 UTC"),
        ("warned", "Sandbox expires in 5 min"),
        ("extended", "expires 2026-11-27T13:30:00Z"),
        ("terminal", "disconnected: candidate after 40 min"),
        ("submitted", "submitted by candidate"),
        ("archived", "archived: 12 files, 34 KiB (submitted)"),
        ("destroying", "destroying (ttl)"),
        ("expired", "expired"),
    ]
    assert [e.at for e in timeline(events)] == sorted(e.at for e in timeline(events))


def test_a_pool_claim_and_a_failure_read_as_such() -> None:
    events = [
        Event(id=1, sandbox_id="abc123", at=T0, kind="state", message="running: claimed by alice"),
        Event(id=2, sandbox_id="abc123", at=T0, kind="state", message="failed: task: exited 3"),
    ]
    assert [(e.what, e.detail) for e in timeline(events)] == [
        ("created", "claimed from the warm pool by alice"),
        ("failed", "failed: task: exited 3"),
    ]
