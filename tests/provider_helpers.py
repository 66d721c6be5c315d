"""Helpers for the provider tests: a fixture program copied to a temp folder, run as a stack."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

import docker
from pulumi import automation as auto

from engine.host.toolenv import pulumi_env, workspace_options
from engine.settings import Settings
from tests.conftest import ROOT, TEST_LABEL

FIXTURES = ROOT / "tests" / "fixtures"


def program_stack(
    settings: Settings,
    cmd: auto.PulumiCommand,
    fixture: str,
    tmp_path: Path,
    backend_url: str,
    config: dict[str, str],
) -> auto.Stack:
    work_dir = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, work_dir)
    stack = auto.create_stack(
        f"sbx-{secrets.token_hex(3)}",
        work_dir=str(work_dir),
        opts=workspace_options(settings, work_dir=work_dir, command=cmd, backend_url=backend_url),
    )
    stack.set_all_config({k: auto.ConfigValue(v) for k, v in config.items()})
    return stack


def cli_env(settings: Settings, backend_url: str) -> dict[str, str]:
    """The environment a platform engineer's shell has after `eval "$(make -s env)"`."""
    import os

    return {**os.environ, **pulumi_env(settings, backend_url=backend_url)}


def leftovers(client: docker.DockerClient, prefix: str) -> list[str]:
    # One list call, no inspect per container: another test's container may go in between.
    names = [n.lstrip("/") for c in client.api.containers(all=True) for n in c["Names"] or ()]
    found = [f"container {name}" for name in names if name.startswith(prefix)]
    found += [f"network {n.name}" for n in client.networks.list() if n.name.startswith(prefix)]
    found += [f"volume {v.name}" for v in client.volumes.list() if v.name.startswith(prefix)]
    return found


def labelled(client: docker.DockerClient) -> dict[str, Any]:
    return {c.name: c for c in client.containers.list(all=True, filters={"label": TEST_LABEL})}
