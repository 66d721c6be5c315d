"""Listing stacks of the DIY PostgreSQL backend: with more stacks than the backend's pool has
connections, `pulumi stack ls` answers through the plain CLI (`make env`'s environment) and
through the engine; left to Pulumi's default it hangs, and the engine's bound stops it."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from pydantic import SecretStr

from engine.host.doctor import check_state_backend
from engine.host.toolenv import pulumi_env
from engine.sandboxes.pulumi_cli import EngineCommand, PulumiTimeout
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from tests.api_server import descendants
from tests.conftest import ROOT

STACKS = 24


@pytest.fixture
def many_stacks(settings: Settings, pg_backend_url: str) -> Settings:
    """STACKS empty sandbox stacks in a PostgreSQL backend table of this test's own."""
    backend = settings.model_copy(update={"pulumi_backend_url": SecretStr(pg_backend_url)})
    env = {**os.environ, **pulumi_env(backend)}
    for i in range(STACKS):
        subprocess.run(
            [str(settings.toolchain_path / "pulumi"), "stack", "init", "--no-select",
             f"sbx-listing{i:02d}"],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return backend


def test_the_plain_cli_lists_every_stack(many_stacks: Settings) -> None:
    """A platform engineer's shell: eval "$(make -s env)", then pulumi stack ls."""
    env = {
        **os.environ,
        "SANDBOX_PULUMI_BACKEND_URL": many_stacks.backend_url(),
    }
    env.pop("PULUMI_DIY_BACKEND_PARALLEL", None)
    started = time.monotonic()
    out = subprocess.run(
        ["bash", "-c", 'eval "$(make -s env)" && pulumi stack ls --json'],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    names = sorted(s["name"] for s in json.loads(out.stdout))
    assert names == [f"sbx-listing{i:02d}" for i in range(STACKS)]
    print(f"pulumi stack ls: {STACKS} stacks in {time.monotonic() - started:.2f} s")


def test_the_engine_lists_every_stack(many_stacks: Settings) -> None:
    stacks = StackManager(many_stacks)
    try:
        names = sorted(s.name for s in stacks.list())
    finally:
        stacks.close()
    assert names == [f"sbx-listing{i:02d}" for i in range(STACKS)]


def test_left_to_pulumi_s_default_the_listing_hangs_and_the_bound_stops_it(
    many_stacks: Settings,
) -> None:
    """The condition the setting avoids is real (10 workers, 4 connections on two cores), and
    a run past its bound is stopped with everything it started."""
    command = EngineCommand(
        root=str(many_stacks.toolchain_path.parent), long_timeout=60, short_timeout=4
    )
    env = {**pulumi_env(many_stacks), "PULUMI_DIY_BACKEND_PARALLEL": "10"}
    before = set(descendants(os.getpid()))
    started = time.monotonic()
    with pytest.raises(PulumiTimeout) as caught:
        command.run(["stack", "ls", "--json"], str(ROOT), env)
    took = time.monotonic() - started
    assert str(caught.value) == "pulumi stack ls did not finish within 4 s and was stopped"
    assert 4 <= took < 4 + 15, took
    assert command.running() == 0
    assert set(descendants(os.getpid())) <= before, "the stopped run left processes"


def test_doctor_names_a_shell_setting_that_hangs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_state_backend(settings).ok
    monkeypatch.setenv("PULUMI_DIY_BACKEND_PARALLEL", "10")
    check = check_state_backend(settings)
    assert not check.ok
    assert "PULUMI_DIY_BACKEND_PARALLEL=10" in check.detail
    assert "make -s env" in check.fix
