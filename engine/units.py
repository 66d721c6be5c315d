"""Parsing of the units templates use (pure): memory, CPU cores and durations."""

from __future__ import annotations

import re
from datetime import timedelta

_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_DURATION = re.compile(r"(\d+)(h|m|s)")


def parse_memory(text: str) -> int:
    """Kubernetes-style quantity ("4Gi", "512Mi", "1G", "1048576") to bytes."""
    match = _MEMORY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a memory size like 512Mi or 4Gi")
    number, unit = float(match.group(1)), match.group(2)
    factor = _BINARY.get(unit or "", _DECIMAL.get(unit or "", 1))
    value = int(number * factor)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return value


def format_memory(size: int) -> str:
    """Bytes as the largest binary unit that keeps a whole number or one decimal: 10.0 GiB."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def parse_cpus(text: str) -> float:
    """CPU cores as a decimal ("2", "0.5"); millicores ("500m") are accepted too."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of CPU cores like 2 or 0.5") from None
    if not 0 < value <= 256:
        raise ValueError(f"{text!r} must be between 0 and 256 cores")
    return value


def parse_duration(text: str) -> timedelta:
    """Go-style duration of hours, minutes and seconds ("4h", "1h30m", "90s")."""
    raw = text.strip()
    if not raw or _DURATION.sub("", raw):
        raise ValueError(f"{text!r} is not a duration like 4h, 30m or 1h30m")
    seconds = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in _DURATION.findall(raw))
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


def format_duration_short(seconds: int) -> str:
    """A span as a person reads it in a message: "3 min" from two minutes on, else "42 s"."""
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"
