"""A sandbox stack's outputs, the same on one host and on a swarm (the engine reads them)."""

from __future__ import annotations

from typing import Any

from engine.model.spec import SandboxSpec


def outputs(spec: SandboxSpec, network: Any, workspace: Any) -> dict[str, Any]:
    """``network`` and ``workspace``: the names (outputs) of the declared network and workspace."""
    return {
        "sandboxId": spec.sandbox_id,
        "template": spec.template,
        "network": network,
        "workspace": workspace,
        "containers": {c.key: c.name for c in spec.containers},
        "endpoints": [{"port": e.port, "public": e.public, "url": e.url} for e in spec.endpoints],
    }
