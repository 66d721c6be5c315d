"""The toolchain is real: binaries built from their Go modules, at the pinned releases."""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import version

from engine.settings import Settings
from tests.conftest import ROOT


def _versions() -> dict[str, str]:
    pairs = (
        ln.split("=", 1)
        for ln in (ROOT / "toolchain" / "versions.env").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    return {k: v for k, v in pairs}


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def test_pulumi_version_matches_the_pinned_sdk(settings: Settings) -> None:
    got = _run(str(settings.toolchain_path / "pulumi"), "version").strip()
    assert got == f"v{version('pulumi')}"
    assert got == f"v{_versions()['PULUMI_VERSION']}"


def test_language_host_and_its_scripts_are_installed(settings: Settings) -> None:
    for name in (
        "pulumi-language-python",
        "pulumi-language-python-exec",
        "pulumi-resource-pulumi-python",
    ):
        path = settings.toolchain_path / name
        assert os.access(path, os.X_OK), f"{path} is missing or not executable"
    # The language host is a Go binary, not a wrapper script.
    head = (settings.toolchain_path / "pulumi-language-python").resolve().read_bytes()[:4]
    assert head == b"\x7fELF"


def test_traefik_runs(settings: Settings) -> None:
    out = _run(str(settings.toolchain_path / "traefik"), "version")
    assert f"v{_versions()['TRAEFIK_VERSION']}" in out


def test_toolchain_is_cached_outside_the_work_tree(settings: Settings) -> None:
    cache = os.path.realpath(_run("bash", str(ROOT / "toolchain" / "build.sh"), "--print").strip())
    assert not cache.startswith(str(ROOT) + "/")
    assert str((settings.toolchain_path / "pulumi").resolve()).startswith(cache + "/")
    # With the cache filled, the build step only links: it reports every binary as cached.
    log = subprocess.run(
        ["bash", str(ROOT / "toolchain" / "build.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stderr
    assert "building" not in log, log
