"""A sandbox stack's config: the template and the request, which the Pulumi program turns into
the sandbox's spec (stacks/program.py), written where the plain ``pulumi`` CLI reads it."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pulumi import automation as auto

from engine.model.templates import Template
from engine.sandboxes.runs import PulumiRuns
from engine.settings import Settings


class StackConfig:
    def __init__(
        self,
        settings: Settings,
        runs: PulumiRuns,
        disk_of: Callable[[str], str] = lambda _: "",
        host_address: Callable[[], str] = lambda: "",
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.disk_of = disk_of  # a sandbox's disk mount point ("" without disks)
        self.host_address = host_address  # the host as containers reach it
        self._proxy_address = settings.egress_proxy_address
        settings.stack_config_path.mkdir(parents=True, exist_ok=True)

    def proxy_address(self) -> str:
        """The host's address restricted workspaces reach the egress proxy at (asked once)."""
        if not self._proxy_address:
            self._proxy_address = self.host_address()
        return self._proxy_address

    def path(self, name: str) -> Path:
        """The stack's config file (``Pulumi.<stack>.yaml``)."""
        return self.settings.stack_config_path / f"Pulumi.{name}.yaml"

    def values(
        self,
        template: Template,
        sandbox_id: str,
        owner: str,
        templates_dir: Path,
        instance: str,
        env: dict[str, str] | None = None,
    ) -> dict[str, auto.ConfigValue]:
        """The config of a sandbox's stack; ``instance``: the engine's, labelled on every
        object (empty: none, for a preview)."""
        settings = self.settings
        config = {
            "sandbox:id": auto.ConfigValue(sandbox_id),
            "sandbox:template": auto.ConfigValue(template.name),
            "sandbox:owner": auto.ConfigValue(owner),
            "sandbox:templatesDir": auto.ConfigValue(str(templates_dir.resolve())),
            "sandbox:domain": auto.ConfigValue(settings.domain),
            "sandbox:entrypoint": auto.ConfigValue(settings.entrypoint),
            "sandbox:tlsResolver": auto.ConfigValue(settings.tls_resolver),
            "sandbox:edgeNetwork": auto.ConfigValue(settings.edge_network),
            "sandbox:publicPort": auto.ConfigValue(str(settings.public_port)),
            "sandbox:runtime": auto.ConfigValue(settings.runtime),
        }
        disk = self.disk_of(sandbox_id)
        if disk:
            config["sandbox:disk"] = auto.ConfigValue(disk)
        if template.egress != "open":  # where its workspace finds the egress proxy
            config["sandbox:egressPort"] = auto.ConfigValue(str(settings.egress_port))
            config["sandbox:egressAddress"] = auto.ConfigValue(self.proxy_address())
        if settings.ca_bundle:
            config["sandbox:caBundle"] = auto.ConfigValue(settings.ca_bundle)
        if settings.backend == "swarm":  # the services through the manager's API (TLS)
            assert settings.swarm_tls is not None
            config["sandbox:backend"] = auto.ConfigValue("swarm")
            config["docker:host"] = auto.ConfigValue(settings.swarm_manager)
            config["docker:certPath"] = auto.ConfigValue(str(settings.swarm_tls.resolve()))
            config["sandbox:placementTimeout"] = auto.ConfigValue(
                str(round(settings.swarm_placement_timeout))
            )
            if settings.swarm_encrypt:
                config["sandbox:encrypt"] = auto.ConfigValue("true")
        if instance:
            config["sandbox:engine"] = auto.ConfigValue(instance)
        if "postgres" in template.services:
            config["sandbox:servicePassword"] = auto.ConfigValue(
                secrets.token_urlsafe(18), secret=True
            )
        if env:
            # Request env may carry credentials (an Anthropic key): a stack secret.
            config["sandbox:env"] = auto.ConfigValue(json.dumps(env), secret=True)
        return config

    def write(self, name: str, config: dict[str, auto.ConfigValue]) -> None:
        """Plain values written straight into the stack's config file (the file ``pulumi
        config set`` writes; no CLI run), secrets through the CLI, which encrypts them with
        the stack's key."""
        document = self._document(name)
        document["config"] = {k: v.value for k, v in config.items() if not v.secret}
        self._save(name, document)
        hidden = [f"{k}={v.value}" for k, v in config.items() if v.secret]
        if hidden:
            args = ["config", "set-all", "--stack", name]
            for pair in hidden:
                args += ["--secret", pair]
            self.runs.run(args)

    def set_plain(self, name: str, values: dict[str, str]) -> None:
        """Plain values added to (or replaced in) the stack's config file, the rest kept."""
        document = self._document(name)
        document.setdefault("config", {}).update(values)
        self._save(name, document)

    def ask_restart(self, name: str) -> None:
        """On a swarm, before a repair's up: a new task asked for (Swarm never starts one
        again by itself; it starts on the node its volumes are on: stacks/swarm.py)."""
        if self.settings.backend != "swarm":
            return
        restarts = int(self.plain(name, "sandbox:restarts") or 0) + 1
        self.set_plain(name, {"sandbox:restarts": str(restarts)})

    def plain(self, name: str, key: str) -> str | None:
        """A plain value of the stack's config file (None when unset)."""
        config = self._document(name).get("config")
        value = config.get(key) if isinstance(config, dict) else None
        return None if value is None else str(value)

    def _document(self, name: str) -> dict[str, Any]:
        """The stack's config file as YAML (empty when there is none yet)."""
        path = self.path(name)
        document = yaml.safe_load(path.read_text()) if path.exists() else None
        return document if isinstance(document, dict) else {}

    def _save(self, name: str, document: dict[str, Any]) -> None:
        """Written whole under another name, then renamed over the file."""
        path = self.path(name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(yaml.dump(document, Dumper=_QuotedDumper, sort_keys=True))
        tmp.replace(path)


class _QuotedDumper(yaml.SafeDumper):
    """Every string double-quoted: the CLI reads the file as YAML 1.2, where an unquoted
    ``0591488581`` (a sandbox id, say) is a number, not the string it was."""


_QuotedDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
)
