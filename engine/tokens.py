"""Candidate access tokens: scoped to one sandbox's terminal, expiring with it (pure).

A token is ``sat_<sandbox id>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`` signed with
the engine's secret key, so it is checked without a database and cannot be widened: changing
the sandbox or the expiry breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from engine.settings import Settings

PREFIX = "sat_"


def secret_key(settings: Settings) -> bytes:
    """The configured key, or one generated once into the state folder (mode 0600)."""
    configured = settings.secret_key.get_secret_value()
    if configured:
        return configured.encode()
    path: Path = settings.state_path / "secret-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


def _sign(key: bytes, body: str) -> str:
    digest = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def issue(key: bytes, sandbox_id: str, expires_at: datetime) -> str:
    body = f"{sandbox_id}.{int(expires_at.timestamp())}"
    return f"{PREFIX}{body}.{_sign(key, body)}"


def verify(key: bytes, token: str, now: datetime | None = None) -> str | None:
    """The sandbox id the token opens, or None (malformed, forged or expired)."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    try:
        sandbox_id, expiry, signature = token[len(PREFIX) :].split(".")
        expires = int(expiry)
    except ValueError:
        return None
    if not hmac.compare_digest(signature, _sign(key, f"{sandbox_id}.{expiry}")):
        return None
    if (now or datetime.now(UTC)).timestamp() >= expires:
        return None
    return sandbox_id
