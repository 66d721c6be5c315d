"""Keys and tokens never reach the logs: the WebSocket takes them in the query string, which
uvicorn's access and connection logs would otherwise print."""

from __future__ import annotations

import logging
import re

SECRET = re.compile(r"(token=|api[_-]key=)[^&\s\"']+|\b(sek|sat)_[A-Za-z0-9_.\-]+", re.I)


def redact(text: str) -> str:
    return SECRET.sub(lambda m: f"{m.group(1)}***" if m.group(1) else f"{m.group(2)}_***", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "sandbox_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
