"""Candidate access tokens: scoped to one sandbox's terminal, expiring with it (pure).

A token is ``sat_<sandbox id>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`` signed with
the engine's secret key, so it is checked without a database and cannot be widened: changing
the sandbox or the expiry breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

from engine.host.toolenv import ensure_secret_file
from engine.settings import Settings

PREFIX = "sat_"


def secret_key(settings: Settings) -> bytes:
    """The configured key, or one generated once into the state folder (mode 0600)."""
    configured = settings.secret_key.get_secret_value()
    if configured:
        return configured.encode()
    return ensure_secret_file(settings.state_path / "secret-key").read_text().strip().encode()


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
