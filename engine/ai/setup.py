"""Claude Code set up in a sandbox when it is handed out (engine/ai/workspace.py says what it
gets): at a cold create, at a warm-pool claim, after a repair's new container."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engine import store
from engine.ai import store as ai_store
from engine.ai import workspace
from engine.backend import Backend
from engine.errors import describe
from engine.model.templates import Template
from engine.sandboxes.jobs import Jobs
from engine.settings import Settings
from engine.store import SandboxRow

log = logging.getLogger("sandbox_engine.ai")


class ClaudeSetup:
    def __init__(self, settings: Settings, jobs: Jobs, backend: Backend) -> None:
        self.settings = settings
        self.jobs = jobs
        self.backend = backend
        # Where sandboxes reach the AI gateway (its actual port once it listens: 0 asks for
        # any free one; the API's lifespan sets it), and the operator's saved config.
        self.gateway_port = settings.gateway_port
        self.operator_config = workspace.OperatorConfig(settings.claude_auth_volume)

    async def claimed(self, row: SandboxRow, template: Template) -> None:
        """A pool sandbox just claimed: its token is the claimer's (a background job: the
        claim is answered first)."""
        try:
            await self.set_up(row, template, row.outputs or {}, first=False)
        except Exception as exc:
            log.warning("sandbox %s: Claude Code could not be set up: %s", row.id, exc)
            await self.jobs.event(row.id, "progress", f"claude: not set up: {describe(exc)}")

    async def set_up(
        self, row: SandboxRow, template: Template, outputs: dict[str, Any], *, first: bool
    ) -> None:
        """``first`` (at create): the first screen in the home, and for operator-login the
        copy of the login. With ``access: gateway`` and an owner (a cold create, a claim, a
        repair): a new token of this sandbox, good from its own addresses only, in root's
        managed settings."""
        claude = template.claude
        container = str(outputs.get("workspace") or "")
        if not container:
            return
        env = None
        if claude.access == "gateway" and row.owner_id is not None:
            network = str(outputs.get("network") or "")
            place = await asyncio.to_thread(self.backend.place, container, network)
            token = await self.jobs.db_through_restarts(
                ai_store.mint,
                what=f"the AI gateway token of {row.id}",
                sandbox_id=row.id,
                owner_id=row.owner_id,
                template=template.name,
                model=claude.model,
                max_tokens=claude.max_tokens,
                budget_tokens=claude.budget_tokens,
                addresses=list(place.addresses),
            )
            base_url = f"http://{place.host}:{self.gateway_port}"
            env = workspace.gateway_env(template, base_url=base_url, token=token)
        await asyncio.to_thread(self._write, container, template, env, first=first)
        if env is not None:
            await self.jobs.db_through_restarts(
                store.add_event,
                row.id,
                "progress",
                f"claude: through the AI gateway, budget {claude.budget_tokens:,} tokens"
                + (f", model {claude.model}" if claude.model else ""),
                what=f"an event of {row.id}",
            )

    def _write(
        self, container: str, template: Template, env: dict[str, str] | None, *, first: bool
    ) -> None:
        home = saved = credentials = None
        if first:
            home = workspace.home_of(self.backend, container, template.workspace.user)
            saved = self.operator_config.config(self.backend, template.base_image)
            if template.claude.access == "operator-login":
                credentials = self.backend.read_volume_file(
                    self.settings.claude_auth_volume,
                    template.base_image,
                    ".credentials.json",
                    workspace.MAX_CONFIG,
                )
        workspace.configure(
            self.backend,
            container,
            template,
            env=env,
            home=home,
            saved=saved,
            credentials=credentials,
        )
