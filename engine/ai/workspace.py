"""Claude Code inside a sandbox: configured by the engine, with no credential of the operator's.

- **Managed settings** (``/etc/claude-code/managed-settings.json``, root-owned, 0644): the
  template's ``claude.settings`` and, with ``access: gateway``, an ``env`` block pointing Claude
  Code at the engine's AI gateway with the sandbox's own token (``ANTHROPIC_BASE_URL``,
  ``ANTHROPIC_AUTH_TOKEN``), the pinned model for every role, the output cap, and no traffic
  but the model's. Managed settings override the user's; the candidate cannot change them.
- **The first screen**: ``~/.claude.json`` in the sandbox's own home, made once, from the
  operator's saved config (``config.json`` of the ``claude-auth`` volume) read as JSON with its
  keys allow-listed (an existing volume may hold what candidates planted in it before), plus
  onboarding done and the workdir trusted: Claude Code starts at its prompt.
- ``access: operator-login``: a copy of the volume's ``.credentials.json`` in the sandbox's
  ``~/.claude`` (for an operator's own trusted sandboxes only: whoever has the shell has it).

Nothing of the volume is mounted; the backend reads it through a container that is created,
never started, and removed (the engine may run in a container of its own, without the host's
paths).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from engine.backend import Backend
from engine.model.spec import proxy_env
from engine.model.templates import Template

log = logging.getLogger("sandbox_engine.ai")

MANAGED_SETTINGS = "/etc/claude-code/managed-settings.json"
# Keys of the operator's saved ~/.claude.json a sandbox gets: how Claude Code looks and
# behaves, never an account, a key, a project's history, an MCP server or a hook.
CONFIG_KEYS = frozenset(
    {
        "theme",
        "editorMode",
        "verbose",
        "preferredNotifChannel",
        "autoCompactEnabled",
        "diffTool",
        "todoFeatureEnabled",
        "messageIdleNotifThresholdMs",
        "hasCompletedOnboarding",
        "lastOnboardingVersion",
        "hasSeenTasksHint",
        "hasAcknowledgedCostThreshold",
        "shiftEnterKeyBindingInstalled",
        "showExpandedTodos",
    }
)
MAX_CONFIG = 256 * 1024  # bytes of config.json read
CONFIG_TTL = 60.0  # seconds the volume's config is kept before it is read again


def gateway_env(template: Template, *, base_url: str, token: str) -> dict[str, str]:
    """Claude Code's environment for the gateway (CLAUDE-CODE-NOTES: with these two traffic
    switches nothing but the model's requests leaves Claude Code)."""
    env = {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_AUTH_TOKEN": token,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(template.claude.max_tokens),
        "DISABLE_AUTOUPDATER": "1",
    }
    model = template.claude.model
    if model:  # every role Claude Code picks a model for: the pinned one
        for name in (
            "ANTHROPIC_MODEL",
            "ANTHROPIC_DEFAULT_OPUS_MODEL",
            "ANTHROPIC_DEFAULT_SONNET_MODEL",
            "ANTHROPIC_DEFAULT_HAIKU_MODEL",
            "ANTHROPIC_SMALL_FAST_MODEL",
            "CLAUDE_CODE_SUBAGENT_MODEL",
        ):
            env[name] = model
    if template.egress != "open":
        # The workspace's proxy variables send what leaves the sandbox to the egress proxy;
        # the gateway is not outside: Claude Code reaches it directly, from its own address.
        host = urlsplit(base_url).hostname or ""
        local = proxy_env(template, 0)["NO_PROXY"]
        env["NO_PROXY"] = env["no_proxy"] = f"{local},{host}"
    return env


def managed_settings(template: Template, env: dict[str, str] | None) -> dict[str, Any]:
    """The managed settings document: the template's settings, the engine's env over theirs."""
    settings = dict(template.claude.settings)
    if env:
        given = settings.get("env")
        settings["env"] = {**(given if isinstance(given, dict) else {}), **env}
    return settings


def first_screen(saved: dict[str, Any], workdir: str) -> dict[str, Any]:
    """``~/.claude.json``: the allow-listed part of the operator's saved config, onboarding done,
    the workdir trusted."""
    kept: dict[str, Any] = {
        k: v
        for k, v in saved.items()
        if k in CONFIG_KEYS and isinstance(v, str | int | float | bool) and len(str(v)) < 1024
    }
    kept["hasCompletedOnboarding"] = True
    kept["projects"] = {workdir: {"hasTrustDialogAccepted": True, "allowedTools": []}}
    return kept


def _tar(files: dict[str, tuple[bytes, int, int, int]]) -> bytes:
    """A tar of ``path: (content, mode, uid, gid)``, with the folders leading to each."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        made: set[str] = set()
        for path, (content, mode, uid, gid) in files.items():
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in made:
                    made.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, 0, 0
                    tar.addfile(info)
            info = tarfile.TarInfo(path.strip("/"))
            info.size, info.mode, info.uid, info.gid = len(content), mode, uid, gid
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class OperatorConfig:
    """The ``claude-auth`` volume's saved config, read through the backend (a container that
    never starts), once a minute at most."""

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self._lock = threading.Lock()
        self._at = 0.0
        self._config: dict[str, Any] = {}

    def config(self, backend: Backend, image: str) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at < CONFIG_TTL:
                return self._config
            raw = backend.read_volume_file(self.volume, image, "config.json", MAX_CONFIG)
            parsed: Any = {}
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    log.warning("%s/config.json is no JSON: not used", self.volume)
            self._config = parsed if isinstance(parsed, dict) else {}
            self._at = time.monotonic()
            return self._config


def configure(
    backend: Backend,
    container: str,
    template: Template,
    *,
    env: dict[str, str] | None,
    home: tuple[str, int, int] | None = None,
    saved: dict[str, Any] | None = None,
    credentials: bytes | None = None,
) -> None:
    """Write the managed settings (root's), and with ``home`` (path, uid, gid) the first
    screen's ``~/.claude.json`` (and ``credentials`` for operator-login) as the user's.

    Settings already there (a claim's, a repair's rewrite) are replaced in one rename: Docker
    unpacks a file by removing the old one first, and a ``claude`` starting in that moment
    would find none."""
    content = json.dumps(managed_settings(template, env), indent=2).encode()
    target = MANAGED_SETTINGS.removeprefix("/etc/")
    if home is not None:  # the first write: nothing to replace
        backend.put_files(container, "/etc", _tar({target: (content, 0o644, 0, 0)}))
    else:
        staged = f"{target}.new"
        backend.put_files(container, "/etc", _tar({staged: (content, 0o644, 0, 0)}))
        moved = backend.run(container, ["mv", "-f", f"/etc/{staged}", MANAGED_SETTINGS], user="0")
        if moved.exit_code != 0:
            raise RuntimeError(f"could not replace {MANAGED_SETTINGS}: {moved.output[-200:]!r}")
    if home is not None:
        path, uid, gid = home
        workdir = template.workspace.workdir
        mine = {
            ".claude.json": (
                json.dumps(first_screen(saved or {}, workdir), indent=2).encode(),
                0o600,
                uid,
                gid,
            )
        }
        if credentials is not None:
            mine[".claude/.credentials.json"] = (credentials, 0o600, uid, gid)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, (content, mode, u, g) in mine.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.gid = len(content), mode, u, g
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(content))
        backend.put_files(container, path, buffer.getvalue())


def home_of(backend: Backend, container: str, user: str) -> tuple[str, int, int]:
    """The workspace user's home, uid and gid (asked inside the container). Asked again when
    an exec answers nothing (seen once in 50 creates at once on a loaded host: exit 0, no
    output)."""
    for attempt in range(3):
        ran = backend.run(
            container, ["sh", "-c", 'printf "%s %s %s" "$HOME" "$(id -u)" "$(id -g)"'], user=user
        )
        if ran.exit_code != 0:
            raise RuntimeError(f"could not read the home of {user}: {ran.output[-200:]!r}")
        said = ran.text.split()
        if len(said) == 3 and said[1].isdigit() and said[2].isdigit():
            return said[0], int(said[1]), int(said[2])
        time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"could not read the home of {user}: the container said {ran.text!r}")
