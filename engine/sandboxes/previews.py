"""Previews: what an update of a stack would change, resource by resource (nothing changes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pulumi import automation as auto

from engine.errors import StackError
from engine.sandboxes.pulumi_cli import describe_command_error
from engine.sandboxes.runs import counts


@dataclass(frozen=True)
class Change:
    """One resource in a preview: what would happen to it and which properties differ."""

    op: str  # create | update | replace | delete | same | …
    type: str
    name: str
    properties: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preview:
    changes: tuple[Change, ...]
    summary: dict[str, int] = field(default_factory=dict)


def preview_of(stack: auto.Stack) -> Preview:
    changes: list[Change] = []

    def on_event(event: auto.EngineEvent) -> None:
        pre = event.resource_pre_event
        if pre and pre.metadata and pre.metadata.type != "pulumi:pulumi:Stack":
            m = pre.metadata
            props = tuple(sorted((m.detailed_diff or {}).keys() or (m.diffs or [])))
            changes.append(Change(m.op.value, m.type, m.urn.rsplit("::", 1)[-1], props))

    try:
        result = stack.preview(on_event=on_event)
    except auto.CommandError as exc:
        raise StackError(describe_command_error(exc)) from exc
    return Preview(tuple(changes), counts(result.change_summary))
