"""Conversions between the gRPC wire format and plain Python values.

Pulumi sends properties as ``google.protobuf.Struct``: every number is a float, and a value not
known during preview is a sentinel string.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

# The engine's marker for "not known until apply" (pulumi.runtime.rpc.UNKNOWN).
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"

Props = dict[str, Any]


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def from_struct(struct: struct_pb2.Struct | None) -> Props:
    """A Struct as a dict, with integral floats turned back into ints and nulls dropped."""
    if struct is None:
        return {}
    data = json_format.MessageToDict(struct)
    return {k: v for k, v in _ints(data).items() if v is not None}


def to_struct(props: Props) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({k: v for k, v in props.items() if v is not None})
    return struct


def contains_unknown(value: Any) -> bool:
    if value == UNKNOWN:
        return True
    if isinstance(value, dict):
        return any(contains_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_unknown(v) for v in value)
    return False
