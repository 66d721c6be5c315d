"""The Pulumi program behind every sandbox stack (``sbx-<id>``), as one function.

The stack's config names the template and the request; the spec is computed from them here
(``engine.model.spec``, pure), so a change to a template shows in ``pulumi preview --diff`` of every
sandbox made from it. ``stacks/sandbox.py`` maps the spec to resources.

Two callers run exactly this function: ``stacks/__main__.py`` when the plain ``pulumi`` CLI (or
the engine's preview, refresh and repair) runs the project from the repository root, and the
engine's create, which runs it inside the engine process (an inline program: no language host
and no interpreter start per sandbox).
"""

from __future__ import annotations

from pathlib import Path

import pulumi

from engine.model.spec import SandboxRequest, SpecSettings, build_spec
from engine.model.templates import load
from stacks.sandbox import declare
from stacks.swarm import Placement


def program() -> None:
    cfg = pulumi.Config("sandbox")
    template = load(Path(cfg.require("templatesDir")) / f"{cfg.require('template')}.yaml")
    spec = build_spec(
        template,
        SandboxRequest(sandbox_id=cfg.require("id"), owner=cfg.get("owner") or "cli"),
        SpecSettings(
            domain=cfg.get("domain") or "localhost",
            entrypoint=cfg.get("entrypoint") or "web",
            tls_resolver=cfg.get("tlsResolver") or "",
            engine=cfg.get("engine") or "",
            edge_network=cfg.get("edgeNetwork") or "sandbox-edge",
            public_port=cfg.get_int("publicPort") or 0,
            runtime=cfg.get("runtime") or "runc",
            disk=cfg.get("disk") or "",
            egress_port=cfg.get_int("egressPort") or 8792,
            egress_address=cfg.get("egressAddress") or "",
            ca_bundle=cfg.get("caBundle") or "",
        ),
    )
    password = cfg.require_secret("servicePassword") if "postgres" in template.services else None
    extra_env = cfg.get_secret_object("env")  # the create request's env, a secret
    backend = cfg.get("backend") or "docker"
    placement = Placement(
        timeout=cfg.get_int("placementTimeout") or 60,
        restarts=cfg.get_int("restarts") or 0,
        encrypt=cfg.get_bool("encrypt") or False,
    )
    for key, value in declare(spec, password, extra_env, backend, placement).items():
        pulumi.export(key, value)
