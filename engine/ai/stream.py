"""An answer of the Messages API read as it passes through: pure, no I/O.

``Assembler.feed`` takes the bytes of a streamed answer in whatever chunks they arrive (a
chunk boundary is no event boundary: events are buffered to their blank line) and keeps the
usage and the content blocks as they are built: text, thinking, ``tool_use`` with its input
(from the ``input_json_delta`` parts). ``from_message`` reads a non-streamed answer the same
way. Usage: ``message_start`` carries the input and cache counts; every ``message_delta``
carries cumulative counts, so the last one overwrites (it is never added).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Bytes of one event kept waiting for its end before the stream is no longer read (the
# answer still passes through untouched; only its record stops).
MAX_EVENT = 4 << 20


@dataclass
class Answer:
    """What the engine keeps of one answer."""

    message_id: str = ""
    model: str = ""
    stop_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    content: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None  # an error event in the stream

    def public(self) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "model": self.model,
            "stop_reason": self.stop_reason,
            "content": self.content,
            **({"error": self.error} if self.error else {}),
        }


def _usage(into: dict[str, int], given: Any) -> None:
    if isinstance(given, dict):
        for name in USAGE_FIELDS:
            value = given.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                into[name] = value


def _block(raw: Any) -> dict[str, Any]:
    """A content block as kept: its type and what a reviewer reads (no signatures)."""
    if not isinstance(raw, dict):
        return {"type": "unknown"}
    kept = {k: v for k, v in raw.items() if k not in ("signature",)}
    kind = kept.get("type")
    if kind == "text":
        kept.setdefault("text", "")
    elif kind == "thinking":
        kept.setdefault("thinking", "")
    elif kind in ("tool_use", "server_tool_use"):
        kept["input"] = kept.get("input") or {}
    return kept


def from_message(message: Any) -> Answer:
    """A non-streamed answer (the JSON body of a 200)."""
    answer = Answer()
    if not isinstance(message, dict):
        return answer
    answer.message_id = str(message.get("id") or "")
    answer.model = str(message.get("model") or "")
    answer.stop_reason = message.get("stop_reason")
    _usage(answer.usage, message.get("usage"))
    answer.content = [_block(b) for b in message.get("content") or []]
    return answer


class Assembler:
    """Feed it a streamed answer's bytes; ``result()`` is what it said so far."""

    def __init__(self) -> None:
        self.answer = Answer()
        self._pending = b""
        self._blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, list[str]] = {}
        # Text and thinking deltas, joined once at the end (not one concatenation a delta).
        self._parts: dict[tuple[int, str], list[str]] = {}
        self._broken = False
        self.events = 0

    def result(self) -> Answer:
        """The answer so far, its blocks assembled."""
        content = []
        for index in sorted(self._blocks):
            block = dict(self._blocks[index])
            for key in ("text", "thinking"):
                parts = self._parts.get((index, key))
                if parts:
                    block[key] = block.get(key, "") + "".join(parts)
            content.append(block)
        self.answer.content = content
        return self.answer

    def feed(self, chunk: bytes) -> None:
        if self._broken:
            return
        self._pending += chunk
        while True:
            end, size = _boundary(self._pending)
            if end < 0:
                if len(self._pending) > MAX_EVENT:
                    self._broken = True  # not a stream we read any more
                    self._pending = b""
                return
            raw, self._pending = self._pending[:end], self._pending[end + size :]
            self._event(raw)

    def _event(self, raw: bytes) -> None:
        data_lines = []
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
        if not data_lines:
            return
        try:
            data = json.loads("\n".join(data_lines))
        except ValueError:
            return
        if isinstance(data, dict):
            self.events += 1
            self._apply(data)

    def _apply(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        answer = self.answer
        if kind == "message_start":
            message = data.get("message") or {}
            answer.message_id = str(message.get("id") or "")
            answer.model = str(message.get("model") or "")
            _usage(answer.usage, message.get("usage"))
        elif kind == "content_block_start":
            index = data.get("index")
            if isinstance(index, int):
                self._blocks[index] = _block(data.get("content_block"))
        elif kind == "content_block_delta":
            self._delta(data.get("index"), data.get("delta") or {})
        elif kind == "content_block_stop":
            index = data.get("index")
            parts = self._json.pop(index, None) if isinstance(index, int) else None
            if parts is not None and index in self._blocks:
                text = "".join(parts)
                try:
                    self._blocks[index]["input"] = json.loads(text) if text else {}
                except ValueError:
                    self._blocks[index]["input"] = {"_unparsed": text}
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            if "stop_reason" in delta:
                answer.stop_reason = delta.get("stop_reason")
            _usage(answer.usage, data.get("usage"))  # cumulative: overwrites
        elif kind == "error":
            error = data.get("error")
            answer.error = error if isinstance(error, dict) else {"message": str(error)}

    def _delta(self, index: Any, delta: dict[str, Any]) -> None:
        if not isinstance(index, int):
            return
        block = self._blocks.setdefault(index, {"type": "unknown"})
        kind = delta.get("type")
        if kind == "text_delta":
            self._parts.setdefault((index, "text"), []).append(str(delta.get("text", "")))
        elif kind == "thinking_delta":
            self._parts.setdefault((index, "thinking"), []).append(str(delta.get("thinking", "")))
        elif kind == "input_json_delta":
            self._json.setdefault(index, []).append(str(delta.get("partial_json", "")))
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta.get("citation"))


def _boundary(buffer: bytes) -> tuple[int, int]:
    """Where the first event ends (its blank line) and the separator's length; -1 if none."""
    found = [(i, n) for sep, n in ((b"\n\n", 2), (b"\r\n\r\n", 4)) if (i := buffer.find(sep)) >= 0]
    return min(found) if found else (-1, 0)
