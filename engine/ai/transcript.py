"""A candidate's AI transcript: what each exchange adds, and the conversation a reviewer reads.
Pure.

Every request Claude Code makes carries the whole conversation so far. Kept whole, a two-hour
session would store its history hundreds of times over; so each exchange keeps only the
messages its request adds to the previous request of the same conversation (Claude Code's
session and agent): the user's new prompt, or the ``tool_result`` blocks of the tools the
previous answer asked for. The assistant message that repeats the previous answer is dropped
(that answer is kept with its own exchange). When the history does not continue the previous
one — a compaction rewrote it, or another conversation shares the session — the whole of it is
kept again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Characters of a prompt or a tool's result kept in a one-line summary (timeline).
SUMMARY_CHARS = 120


@dataclass(frozen=True)
class Prior:
    """What is remembered of a conversation's last request: how many messages it had, and
    digests of its first and last message (to tell a continuation from a rewrite)."""

    total: int
    first: str
    last: str


def _canonical(message: Any) -> Any:
    """A message as compared between requests: Claude Code moves its ``cache_control``
    markers along the history and sends the same content now as a string, now as text
    blocks."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(content, list):
        content = [
            {k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b
            for b in content
        ]
    return {**message, "content": content}


def digest(message: Any) -> str:
    canonical = json.dumps(
        _canonical(message), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def prior_of(messages: list[Any]) -> Prior | None:
    if not messages:
        return None
    return Prior(len(messages), digest(messages[0]), digest(messages[-1]))


def new_messages(messages: list[Any], prior: Prior | None) -> tuple[int, list[Any]]:
    """(index of the first message kept, the messages kept) for a request's history."""
    continues = (
        prior is not None
        and 0 < prior.total <= len(messages)
        and digest(messages[0]) == prior.first
        and digest(messages[prior.total - 1]) == prior.last
    )
    start = prior.total if continues and prior is not None else 0
    kept = messages[start:]
    if start and kept and isinstance(kept[0], dict) and kept[0].get("role") == "assistant":
        kept, start = kept[1:], start + 1  # the previous answer, kept with its exchange
    return start, kept


def is_side(body: dict[str, Any]) -> bool:
    """A side call (a title, a summary): Claude Code's conversations always offer tools."""
    return not body.get("tools")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(c.get("text") or c.get("content") or "") for c in content
                        if isinstance(c, dict))  # fmt: skip
    return ""


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def summary(kept: list[Any], answer: dict[str, Any]) -> str:
    """One line for the activity timeline: the prompt, or the tools' results, then what the
    answer did (its tool calls or its text)."""
    said = []
    for message in kept:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_result":
                said.append("tool result: " + _clip(_text_of(block.get("content"))))
            elif block.get("type") == "text" and not str(block.get("text", "")).startswith(
                "<system-reminder>"
            ):
                said.append("prompt: " + _clip(str(block.get("text", ""))))
    did = []
    for block in answer.get("content") or []:
        if block.get("type") == "tool_use":
            did.append(f"asks for {block.get('name')}: {_clip(json.dumps(block.get('input')))}")
        elif block.get("type") == "text" and block.get("text"):
            did.append("answers: " + _clip(str(block["text"])))
    return "; ".join(said[-1:] + did[:2]) or "an exchange"


def entry(row: dict[str, Any]) -> dict[str, Any]:
    """One exchange as the transcript shows it."""
    return {
        "id": row["id"],
        "at": row["started_at"],
        "finished_at": row["finished_at"],
        "session_id": row["session_id"],
        "agent_id": row["agent_id"],
        "side": row["side"],
        "model": row["model"],
        "status": row["status"],
        "refused": row["refused"],
        "usage": row["usage"] or {},
        "first_message": row["first_message"],
        "messages": row["messages"] or [],
        "answer": row["answer"],
        "error": row["error"],
    }
