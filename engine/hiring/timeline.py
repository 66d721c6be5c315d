"""A sandbox's activity timeline, for the reviewer: its events read as what happened.

Events are the record (``sandbox_events``); the timeline keeps the ones a person reviewing a
candidate cares about, each as (when, what, detail): created, task seeded, running, terminal
connected/disconnected, idle periods, the candidate's AI exchanges (their prompts, the tools the
model asked for, its answers: engine/ai), connections its egress rules refused (engine/egress),
warned, extended, submitted, archived, destroying, destroyed or expired. Resource-level
progress lines are left out, and of a task's lines only the first (what was copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.store import Event


@dataclass(frozen=True)
class Entry:
    at: datetime
    what: str  # created, task, running, terminal, idle, warned, extended, submitted, ...
    detail: str


STATE_WORDS = {
    "creating": "created",
    "pooled": "pooled",
    "running": "running",
    "destroying": "destroying",
    "destroyed": "destroyed",
    "expired": "expired",
    "failed": "failed",
    "repairing": "repairing",
    "lost": "lost",
}


def entry(event: Event, seen_task: bool) -> Entry | None:
    kind, text = event.kind, event.message
    if kind == "state":
        word = text.split(":", 1)[0].split(" ", 1)[0]
        if text.startswith("running: claimed by "):
            claimed = text.removeprefix("running: claimed")
            return Entry(event.at, "created", "claimed from the warm pool" + claimed)
        return Entry(event.at, STATE_WORDS.get(word, word), text)
    if kind == "task":  # the first line says what was copied; a failure ends in a state
        return None if seen_task else Entry(event.at, "task", text)
    if kind == "terminal":
        return Entry(event.at, "idle" if text.startswith("idle") else "terminal", text)
    named = {
        "extended": "extended",
        "expiry_warning": "warned",
        "submit": "submitted",
        "archive": "archived",
        "repair": "repaired",
        "ai": "ai",
        "egress": "egress",  # a connection the egress rules refused (engine/egress/proxy.py)
    }
    if kind in named:
        return Entry(event.at, named[kind], text)
    return None  # progress lines, orphan sweeps and the like


def timeline(events: list[Event]) -> list[Entry]:
    out: list[Entry] = []
    seen_task = False
    for event in events:
        item = entry(event, seen_task)
        seen_task = seen_task or event.kind == "task"
        if item is not None:
            out.append(item)
    return out
