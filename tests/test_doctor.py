"""`make doctor`: all OK on a set-up machine, and the missing piece named when one is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.host.doctor import network_capacity, run_checks
from engine.settings import Settings
from tests.conftest import ROOT


def _doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=120,
    )


def test_every_component_is_ok_after_setup(settings: Settings) -> None:
    failed = [c for c in run_checks(settings) if not c.ok]
    assert not failed, failed


@pytest.mark.parametrize(
    ("pools", "networks"),
    [
        (None, 16 + 16),  # Docker's defaults: the 31st sandbox would find no address
        ([{"Base": "10.213.0.0/16", "Size": 26}], 1024),  # deploy/local/dockerd.sh
        ([{"Base": "10.0.0.0/8", "Size": 24}, {"Base": "172.16.0.0/12", "Size": 24}], 69632),
        ([{"Base": "10.1.0.0/24", "Size": 16}], 0),  # a size wider than its base: nothing
    ],
)
def test_network_capacity(pools: list[dict[str, object]] | None, networks: int) -> None:
    assert network_capacity(pools) == networks


def test_make_doctor_prints_a_table_and_exits_0() -> None:
    out = subprocess.run(
        ["make", "-s", "doctor"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = out.stdout.splitlines()
    for component in (
        "dockerd",
        "docker address pool",
        "postgresql",
        "pulumi CLI",
        "language host",
        "traefik",
        "base image",
        "gvisor (runsc)",
        "sandbox disks",
        "python package",
    ):
        assert any(r.startswith("OK") and component in r for r in rows), (component, out.stdout)


def test_a_stopped_dockerd_is_named_with_its_fix(tmp_path: Path) -> None:
    # A socket path where no daemon listens is what a stopped dockerd looks like to a client.
    result = _doctor({"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"})
    assert result.returncode == 1
    row = next(r for r in result.stdout.splitlines() if "dockerd" in r)
    assert row.startswith("FAIL")
    assert "deploy/local/dockerd.sh" in row


def test_a_missing_toolchain_is_named_with_its_fix(tmp_path: Path) -> None:
    result = _doctor({"SANDBOX_TOOLCHAIN_BIN": str(tmp_path)})
    assert result.returncode == 1
    failing = [r for r in result.stdout.splitlines() if r.startswith("FAIL")]
    assert {r.split()[1] for r in failing} == {"pulumi", "language", "traefik"}
    assert all("toolchain/build.sh" in r for r in failing)


def test_a_stopped_postgres_is_named(tmp_path: Path) -> None:
    result = _doctor({"SANDBOX_DATABASE_URL": "postgresql://sandbox:x@127.0.0.1:1/sandbox"})
    assert result.returncode == 1
    row = next(r for r in result.stdout.splitlines() if "postgresql" in r)
    assert row.startswith("FAIL") and "deploy/local/postgres.sh" in row
    assert "x@" not in result.stdout, "the password must not be printed"
