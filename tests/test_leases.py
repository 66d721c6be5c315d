"""Cluster duties: of several engine processes on one database exactly one leads the reaper's
pass, and when it dies (its session ends) the next one to ask takes over."""

from __future__ import annotations

import subprocess
import sys
import time

from engine.workers import WorkerLease

# A process that takes the lead and then waits to be killed.
LEADER = """
import sys, time
from engine.workers import WorkerLease
lease = WorkerLease(sys.argv[1])
print(lease.lead("reaper"), flush=True)
time.sleep(600)
"""


def test_one_engine_leads_and_another_takes_over_when_it_dies(database: str) -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, database], stdout=subprocess.PIPE, text=True
    )
    other = WorkerLease(database)
    try:
        assert leader.stdout is not None
        assert leader.stdout.readline().strip() == "True"
        assert other.lead("reaper") is False
        assert other.lead("reaper") is False  # asked again each pass: still not
        assert other.lead("another duty") is True  # duties are separate
        leader.kill()  # as kill -9: no clean-up of its own
        leader.wait(10)
        deadline = time.monotonic() + 10
        while not other.lead("reaper"):
            assert time.monotonic() < deadline, "the dead leader's duty was never taken over"
            time.sleep(0.1)
        assert other.lead("reaper") is True  # kept, not taken again
        third = WorkerLease(database)
        try:
            assert third.lead("reaper") is False
        finally:
            third.release()
    finally:
        leader.kill()
        other.release()
