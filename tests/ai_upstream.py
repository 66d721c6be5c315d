"""A stand-in for the Anthropic Messages API (this machine cannot reach the real one): the one
fake of the AI tests, at the narrowest seam, the upstream the gateway forwards to.

It speaks the wire format Claude Code uses — ``POST /v1/messages`` streamed (server-sent
events: message_start, ping, content blocks with text and input_json deltas, message_delta
with cumulative usage, message_stop) or not, ``POST /v1/messages/count_tokens``, ``HEAD /`` —
and records every request it gets (path, headers, body). What it answers:

- a last user message with a ``tool_result``: text quoting the tool's output;
- a prompt containing ``RUN: <command>``: a ``Bash`` tool_use running the command;
- anything else: a text greeting naming the prompt.

Usage is made up but consistent: input tokens from the body's size, output from the answer's.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.threaded_server import threaded_server

RUN = re.compile(r"RUN: (.+)")


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


@dataclass
class Upstream:
    """The stand-in's behaviour (tests change it between requests) and what it saw."""

    seen: list[Seen] = field(default_factory=list)
    # (status, body) answers to give next, before the scripted ones.
    errors: list[tuple[int, bytes]] = field(default_factory=list)
    # Fixed usage for every answer (None: derived from sizes).
    usage: dict[str, int] | None = None
    # Seconds between streamed events (to see the gateway pass each on as it comes).
    pause: float = 0.0
    # Text deltas a text answer is cut into.
    pieces: int = 4
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the answers -------------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """(content blocks, stop reason) for a request."""
        messages = body.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users else {}
        content = last.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            said = _text(results[-1].get("content"))
            return [{"type": "text", "text": f"The tool said: {said.strip()}"}], "end_turn"
        prompt = " ".join(_text(b.get("text")) for b in blocks if isinstance(b, dict)
                          and b.get("type") == "text")  # fmt: skip
        found = RUN.search(prompt)
        if found and body.get("tools"):
            tool = {
                "type": "tool_use",
                "id": f"toolu_{secrets.token_hex(8)}",
                "name": "Bash",
                "input": {"command": found.group(1).strip(), "description": "Run the command"},
            }
            return [tool], "tool_use"
        clean = " ".join(prompt.split())[-80:]
        return [{"type": "text", "text": f"Hello from the stand-in model. You said: {clean}"}], (
            "end_turn"
        )

    def usage_for(self, raw: bytes, content: list[dict[str, Any]]) -> dict[str, int]:
        if self.usage is not None:
            return dict(self.usage)
        out = sum(len(json.dumps(b)) for b in content) // 4 + 1
        return {
            "input_tokens": len(raw) // 5,
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    # --- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        if request.method == "HEAD":
            await Response(status_code=200)(scope, receive, send)
            return
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        with self.lock:
            self.seen.append(Seen(request.url.path, dict(request.headers), body, raw))
            error = self.errors.pop(0) if self.errors else None
        if error is not None:
            status, text = error
            await Response(text, status_code=status, media_type="application/json")(
                scope, receive, send
            )
            return
        if request.url.path.endswith("/count_tokens"):
            await JSONResponse({"input_tokens": len(raw) // 5})(scope, receive, send)
            return
        if request.url.path != "/v1/messages":
            await JSONResponse({"type": "error"}, status_code=404)(scope, receive, send)
            return
        content, stop = self.answer(body)
        usage = self.usage_for(raw, content)
        model = str(body.get("model") or "claude-stand-in")
        mid = f"msg_{secrets.token_hex(8)}"
        if not body.get("stream"):
            message = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": usage,
            }
            await JSONResponse(message, headers={"request-id": f"req_{mid}"})(scope, receive, send)
            return
        response = StreamingResponse(
            self._events(mid, model, content, stop, usage),
            media_type="text/event-stream",
            headers={"request-id": f"req_{mid}", "cache-control": "no-cache"},
        )
        await response(scope, receive, send)

    async def _events(
        self,
        mid: str,
        model: str,
        content: list[dict[str, Any]],
        stop: str,
        usage: dict[str, int],
    ) -> AsyncIterator[bytes]:
        start_usage = {**usage, "output_tokens": 1}
        yield _sse("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}})  # fmt: skip
        yield _sse("ping", {"type": "ping"})
        for index, block in enumerate(content):
            await asyncio.sleep(self.pause)
            if block["type"] == "text":
                yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                           "content_block": {"type": "text", "text": ""}})  # fmt: skip
                text = block["text"]
                step = max(1, -(-len(text) // self.pieces))
                for at in range(0, len(text), step):
                    await asyncio.sleep(self.pause)
                    delta = {"type": "text_delta", "text": text[at : at + step]}
                    yield _sse("content_block_delta", {"type": "content_block_delta",
                               "index": index, "delta": delta})  # fmt: skip
            else:
                yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                           "content_block": {**block, "input": {}}})  # fmt: skip
                encoded = json.dumps(block["input"])
                half = len(encoded) // 2
                for part in (encoded[:half], encoded[half:]):
                    await asyncio.sleep(self.pause)
                    delta = {"type": "input_json_delta", "partial_json": part}
                    yield _sse("content_block_delta", {"type": "content_block_delta",
                               "index": index, "delta": delta})  # fmt: skip
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
        yield _sse("message_stop", {"type": "message_stop"})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(c.get("text") if isinstance(c, dict) else c) for c in content)
    return ""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@contextmanager
def serving(
    upstream: Upstream | None = None, host: str = "127.0.0.1"
) -> Iterator[tuple[str, Upstream]]:
    """The stand-in on a free port of ``host``; yields (its base URL, its state)."""
    upstream = upstream or Upstream()
    with threaded_server(
        upstream,
        host,
        what="the stand-in upstream",
        start_timeout=30,
        stop_timeout=30,
        log_level="warning",
        lifespan="off",
    ) as port:
        yield f"http://{host}:{port}", upstream


if __name__ == "__main__":  # python -m tests.ai_upstream PORT [PIECES [PAUSE]]: alone (benchmarks)
    import sys

    pieces = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    uvicorn.run(
        Upstream(pieces=pieces, pause=pause),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
