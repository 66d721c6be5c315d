"""The environment every Pulumi run of the engine gets, and the CLI handle built from it.

One place decides where the CLI, its language host and the state backend are, so that the
engine, ``sandbox-engine env`` (for a platform engineer's shell) and the tests agree.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from importlib.metadata import version as dist_version
from pathlib import Path

from pulumi import automation as auto

from engine.sandboxes.pulumi_cli import EngineCommand
from engine.settings import Settings

# Workers of Pulumi's DIY backend listing stacks at once (PULUMI_DIY_BACKEND_PARALLEL, default
# 10). Its PostgreSQL bucket keeps a listing's rows open on one connection while it asks for a
# second one per stack, from a pool of max(2 x GOMAXPROCS, 2) connections: with as many
# workers as connections each holds one and waits for another for ever (`pulumi stack ls`
# hung with four stacks or more on two cores; Pulumi v3.260.0 to v3.276.0). One worker always
# finds its second connection, on any core count; 60 stacks list in well under a second.
DIY_BACKEND_PARALLEL = "1"


def ensure_secret_file(path: Path, value: str | None = None) -> Path:
    """A secret in ``path`` (``value``, or a random one), written once with mode 0600 and kept
    from then on."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value if value is not None else secrets.token_urlsafe(32))
    return path


def ensure_passphrase_file(settings: Settings) -> Path:
    """The passphrase that encrypts stack secrets, created on first use."""
    return ensure_secret_file(settings.passphrase_file)


# The module the docker provider plugin runs (stacks/provider: the engine's provider for the
# `docker` package), with the engine's interpreter.
PROVIDER_MODULE = "stacks.provider.server"


def ensure_docker_plugin(settings: Settings) -> Path:
    """Install the project's docker provider into the plugin cache of ``PULUMI_HOME``.

    The engine looks a provider up in its plugin cache at exactly the version the program's SDK
    asks for (``pulumi_docker``'s own release), so the provider is installed under that version:
    any ``pulumi_docker`` program finds it with no download and no "ambient plugin" warning, and
    the same program finds the upstream provider on a machine where that one is installed.
    """
    version = dist_version("pulumi_docker")
    exe = (
        settings.pulumi_home / "plugins" / f"resource-docker-v{version}" / "pulumi-resource-docker"
    )
    script = (
        "#!/bin/sh\n"
        f"# Sandbox Engine's docker provider (stacks/provider) for pulumi_docker {version}.\n"
        f'exec {shlex.quote(sys.executable)} -m {PROVIDER_MODULE} "$@"\n'
    )
    if not exe.is_file() or exe.read_text() != script:
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(script)
        tmp.chmod(0o755)
        tmp.replace(exe)
    return exe


def pulumi_env(settings: Settings, *, backend_url: str | None = None) -> dict[str, str]:
    """Variables for a Pulumi CLI run: toolchain first on PATH, no downloads, our backend."""
    ensure_docker_plugin(settings)
    path = os.pathsep.join(
        [str(settings.toolchain_path), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    return {
        "PATH": path,
        "PULUMI_HOME": str(settings.pulumi_home),
        "PULUMI_BACKEND_URL": backend_url or settings.backend_url(),
        "PULUMI_CONFIG_PASSPHRASE_FILE": str(ensure_passphrase_file(settings)),
        # The language host runs programs with this interpreter, the one the engine runs in.
        "PULUMI_PYTHON_CMD": sys.executable,
        # Nothing is ever downloaded: a missing plugin is an immediate, named error.
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        # State lives in PostgreSQL, which is backed up as a whole; per-update copies only add rows.
        "PULUMI_DIY_BACKEND_DISABLE_CHECKPOINT_BACKUPS": "true",
        "PULUMI_DIY_BACKEND_PARALLEL": DIY_BACKEND_PARALLEL,
    }


def sdk_version() -> str:
    """The pulumi Python SDK release installed beside the engine (the CLI must match it)."""
    return dist_version("pulumi")


def pulumi_command(settings: Settings) -> EngineCommand:
    """The toolchain's CLI, checked once against the SDK's minimum version, with the engine's
    time bounds and stop handling (engine/sandboxes/pulumi_cli.py).

    Share one handle: building it runs ``pulumi version``.
    """
    return EngineCommand(
        root=str(settings.toolchain_path.parent), long_timeout=settings.pulumi_timeout
    )


def workspace_options(
    settings: Settings,
    *,
    work_dir: Path,
    command: auto.PulumiCommand,
    backend_url: str | None = None,
) -> auto.LocalWorkspaceOptions:
    """Options for a LocalWorkspace that runs ``work_dir``'s program with the engine's toolchain."""
    return auto.LocalWorkspaceOptions(
        work_dir=str(work_dir),
        pulumi_command=command,
        env_vars=pulumi_env(settings, backend_url=backend_url),
    )
