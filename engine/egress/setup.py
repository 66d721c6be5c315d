"""A restricted sandbox's rules put where the egress proxy finds them: when its workspace
first runs (before the task's commands, which may install packages) and after a repair (a new
container, new addresses)."""

from __future__ import annotations

import asyncio
from typing import Any

from engine.backend import Backend
from engine.egress import store
from engine.egress.presets import Presets
from engine.model.egress import PRESETS, Rules
from engine.model.templates import Template
from engine.sandboxes.jobs import Jobs
from engine.settings import Settings
from engine.store import SandboxRow


class EgressSetup:
    def __init__(self, settings: Settings, jobs: Jobs, backend: Backend) -> None:
        self.settings = settings
        self.jobs = jobs
        self.backend = backend
        self.presets = Presets(backend, settings.egress_presets)

    def rules(self, container: str, template: Template) -> Rules:
        """The sandbox's rules, its presets read (blocking)."""
        if template.egress == "none":
            return Rules("none")
        entries = [*template.network.allow, *self.settings.egress_allow]
        listed = [e for e in dict.fromkeys(entries) if e in PRESETS]
        presets = self.presets.read(container, template.base_image, template.workspace.user, listed)
        return Rules.of("allow", entries, presets)

    async def apply(self, row: SandboxRow, template: Template, outputs: dict[str, Any]) -> None:
        if template.egress == "open":
            return
        container = str(outputs.get("workspace") or "")
        network = str(outputs.get("network") or "")
        place = await asyncio.to_thread(self.backend.place, container, network)
        rules = await asyncio.to_thread(self.rules, container, template)
        await self.jobs.db_through_restarts(
            store.record,
            row.id,
            list(place.addresses),
            rules.to_json(),
            what=f"the egress rules of {row.id}",
        )
        await self.jobs.event(row.id, "progress", f"egress: {describe(rules)}")


def describe(rules: Rules) -> str:
    """One line for the events: what the sandbox may reach."""
    if rules.mode == "none":
        return "none (its own services and the AI gateway only)"
    parts = [f"{name} ({', '.join(hosts)})" for name, hosts in sorted(rules.presets.items())]
    preset_hosts = {h for hosts in rules.presets.values() for h in hosts}
    parts += sorted(h for h in rules.hosts if h not in preset_hosts)
    parts += sorted(f"*.{d}" for d in rules.domains if f"*.{d}" not in preset_hosts)
    parts += [str(n) for n in rules.networks]
    return "allow " + ", ".join(parts) + ", through the egress proxy"
