"""A small description of each resource's properties: types, required ones, and which change
in place. Check validates inputs against it and names the property that is wrong; Diff uses the
in-place set to tell an update from a replacement, as the upstream schema does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stacks.provider.wire import UNKNOWN


@dataclass(frozen=True)
class T:
    """A property type: 'string' | 'integer' | 'boolean' | 'number', or a list/map/object."""

    kind: str
    item: T | None = None  # list and map items
    fields: dict[str, T] = field(default_factory=dict)  # object fields
    required: tuple[str, ...] = ()


STR = T("string")
INT = T("integer")
BOOL = T("boolean")


def list_of(item: T) -> T:
    return T("list", item=item)


def map_of(item: T) -> T:
    return T("map", item=item)


def obj(required: tuple[str, ...] = (), **fields: T) -> T:
    return T("object", fields=fields, required=required)


# Labels are a list of {label, value} on the wire, for every resource that has them.
LABELS = list_of(obj(("label", "value"), label=STR, value=STR))


def validate(value: Any, spec: T, path: str) -> list[tuple[str, str]]:
    """Failures as (property path, reason); unknown values pass (they are checked at apply)."""
    if value == UNKNOWN or value is None:
        return []
    kind = spec.kind
    if kind == "string":
        return [] if isinstance(value, str) else [(path, f"expected a string, got {_show(value)}")]
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [(path, f"expected an integer, got {_show(value)}")]
    if kind == "boolean":
        return (
            []
            if isinstance(value, bool)
            else [(path, f"expected true or false, got {_show(value)}")]
        )
    if kind == "list":
        if not isinstance(value, list):
            return [(path, f"expected a list, got {_show(value)}")]
        assert spec.item is not None
        return [f for i, v in enumerate(value) for f in validate(v, spec.item, f"{path}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [(path, f"expected a map, got {_show(value)}")]
        assert spec.item is not None
        return [f for k, v in value.items() for f in validate(v, spec.item, f"{path}.{k}")]
    # object
    if not isinstance(value, dict):
        return [(path, f"expected an object, got {_show(value)}")]
    return validate_object(value, spec, prefix=f"{path}.")


def validate_object(value: dict[str, Any], spec: T, prefix: str = "") -> list[tuple[str, str]]:
    failures = [(f"{prefix}{k}", "is required") for k in spec.required if value.get(k) is None]
    for key, item in value.items():
        if key not in spec.fields:
            failures.append((f"{prefix}{key}", "is not a property of this resource"))
        else:
            failures.extend(validate(item, spec.fields[key], f"{prefix}{key}"))
    return failures


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
