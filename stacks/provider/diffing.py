"""Diff of old inputs against new inputs: which properties changed, and whether each change can
be applied in place or forces a replacement. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from stacks.provider.wire import contains_unknown


class Kind(Enum):
    ADD = "ADD"
    ADD_REPLACE = "ADD_REPLACE"
    DELETE = "DELETE"
    DELETE_REPLACE = "DELETE_REPLACE"
    UPDATE = "UPDATE"
    UPDATE_REPLACE = "UPDATE_REPLACE"


@dataclass(frozen=True)
class Diff:
    detailed: dict[str, Kind]

    @property
    def changed(self) -> list[str]:
        return sorted(self.detailed)

    @property
    def replaces(self) -> list[str]:
        return sorted(k for k, kind in self.detailed.items() if kind.name.endswith("_REPLACE"))


def diff_inputs(
    olds: dict[str, Any],
    news: dict[str, Any],
    *,
    in_place: frozenset[str],
    computed: frozenset[str] = frozenset(),
) -> Diff:
    """Compare top-level properties. A value unknown during preview counts as a change.

    ``computed`` properties are optional inputs that Docker fills in when unset (a hostname, the
    IPAM subnet): leaving one out of the program keeps whatever value the object has.
    """
    detailed: dict[str, Kind] = {}
    for key in sorted(set(olds) | set(news)):
        old, new = olds.get(key), news.get(key)
        if (old == new or (_blank(old) and _blank(new))) and not contains_unknown(new):
            continue
        if key in computed and _blank(new):
            continue
        if _blank(old):
            kind = "ADD"
        elif _blank(new):
            kind = "DELETE"
        else:
            kind = "UPDATE"
        if key not in in_place:
            kind += "_REPLACE"
        detailed[key] = Kind[kind]
    return Diff(detailed)


def _blank(value: Any) -> bool:
    """Unset, and set to an empty list or map, mean the same to Docker."""
    return value is None or value == [] or value == {}
