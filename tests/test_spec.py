"""template + request + settings → SandboxSpec, as a table of fixtures (pure)."""

from __future__ import annotations

import pytest

from engine.model.spec import (
    ContainerSpec,
    Endpoint,
    Mount,
    SandboxRequest,
    SandboxSpec,
    SpecSettings,
    bridge_name,
    build_spec,
    disk_folders,
)
from engine.model.templates import load
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "templates"
COMMON = {
    "io.sandbox-engine.managed-by": "sandbox-engine",
    "io.sandbox-engine.sandbox": "abc123",
    "io.sandbox-engine.owner": "alice",
}


def labels(template: str, role: str, pids: int, **extra: str) -> dict[str, str]:
    return {
        **COMMON,
        "io.sandbox-engine.template": template,
        "io.sandbox-engine.role": role,
        "io.sandbox-engine.pids-limit": str(pids),
        **extra,
    }


EXPECTED = {
    "minimal": SandboxSpec(
        sandbox_id="abc123",
        stack="sbx-abc123",
        template="minimal",
        owner="alice",
        network="sbx-abc123-net",
        bridge=bridge_name("sbx-abc123-net"),
        volumes=("sbx-abc123-home",),
        containers=(
            ContainerSpec(
                key="workspace",
                name="sbx-abc123-workspace",
                image="workspace-base:latest",
                hostname="workspace",
                cpus=1.0,
                memory_mb=2048,
                pids_limit=1024,
                labels=labels("minimal", "workspace", 1024),
                env={"SANDBOX_ID": "abc123", "SHELL": "/bin/bash"},
                # The home is the sandbox's own; nothing of Claude Code is mounted from outside.
                mounts=(Mount("sbx-abc123-home", "/home/coder"),),
                aliases=("workspace",),
                user="coder",
                workdir="/home/coder/workspace",
            ),
        ),
        endpoints=(),
        labels={**COMMON, "io.sandbox-engine.template": "minimal"},
    ),
    "full": SandboxSpec(
        sandbox_id="abc123",
        stack="sbx-abc123",
        template="full",
        owner="alice",
        network="sbx-abc123-net",
        bridge=bridge_name("sbx-abc123-net"),
        volumes=("sbx-abc123-home", "sbx-abc123-postgres-data", "sbx-abc123-redis-data"),
        containers=(
            ContainerSpec(
                key="workspace",
                name="sbx-abc123-workspace",
                image="workspace-python:latest",
                hostname="workspace",
                cpus=1.5,
                memory_mb=3072,
                pids_limit=300,
                labels=labels(
                    "full",
                    "workspace",
                    300,
                    **{
                        "traefik.enable": "true",
                        "traefik.docker.network": "sandbox-edge",
                        "traefik.http.routers.sbx-abc123-8000.rule": (
                            "Host(`abc123-8000.sandbox.example.com`)"
                        ),
                        "traefik.http.routers.sbx-abc123-8000.entrypoints": "websecure",
                        "traefik.http.routers.sbx-abc123-8000.service": "sbx-abc123-8000",
                        "traefik.http.routers.sbx-abc123-8000.tls.certresolver": "le",
                        "traefik.http.services.sbx-abc123-8000.loadbalancer.server.port": "8000",
                    },
                ),
                env={
                    "APP_ENV": "test",
                    "PGHOST": "postgres",
                    "PGPORT": "5432",
                    "PGUSER": "sandbox",
                    "PGDATABASE": "sandbox",
                    "REDIS_URL": "redis://redis:6379/0",
                    "SANDBOX_ID": "abc123",
                    "SHELL": "/bin/bash",
                },
                mounts=(Mount("sbx-abc123-home", "/home/coder"),),
                aliases=("workspace",),
                user="coder",
                workdir="/home/coder/task",
                extra_networks=("sandbox-edge",),
            ),
            ContainerSpec(
                key="postgres",
                name="sbx-abc123-postgres",
                image="service-postgres:latest",
                hostname="postgres",
                cpus=1.0,
                memory_mb=512,
                pids_limit=256,
                labels=labels("full", "postgres", 256),
                env={"POSTGRES_USER": "sandbox", "POSTGRES_DB": "sandbox"},
                mounts=(Mount("sbx-abc123-postgres-data", "/var/lib/postgresql/data"),),
                aliases=("postgres",),
                wait_healthy=True,
            ),
            ContainerSpec(
                key="redis",
                name="sbx-abc123-redis",
                image="service-redis:latest",
                hostname="redis",
                cpus=0.5,
                memory_mb=256,
                pids_limit=128,
                labels=labels("full", "redis", 128),
                mounts=(Mount("sbx-abc123-redis-data", "/data"),),
                aliases=("redis",),
                wait_healthy=True,
            ),
        ),
        endpoints=(
            Endpoint(8000, True, "https://abc123-8000.sandbox.example.com"),
            Endpoint(9000, False, ""),
        ),
        labels={**COMMON, "io.sandbox-engine.template": "full"},
    ),
}
SETTINGS = {
    "minimal": SpecSettings(),
    "full": SpecSettings(domain="sandbox.example.com", entrypoint="websecure", tls_resolver="le"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_fixture_to_spec(name: str) -> None:
    template = load(FIXTURES / f"{name}.yaml")
    spec = build_spec(template, SandboxRequest("abc123", owner="alice"), SETTINGS[name])
    assert spec == EXPECTED[name]


@pytest.mark.parametrize(
    ("sandbox_id", "domain", "words"),
    [
        ("ABC123", "localhost", "sandbox id"),
        ("abc`)", "localhost", "sandbox id"),
        ("abc123", "evil.com`) || Host(`x", "domain"),
        ("abc123", "-bad.example", "domain"),
    ],
)
def test_ids_and_domains_never_reach_a_rule_unchecked(
    sandbox_id: str, domain: str, words: str
) -> None:
    template = load(FIXTURES / "minimal.yaml")
    with pytest.raises(ValueError, match=words):
        build_spec(template, SandboxRequest(sandbox_id), SpecSettings(domain=domain))


def test_the_engine_label_marks_every_object_when_set() -> None:
    template = load(FIXTURES / "full.yaml")
    plain = build_spec(template, SandboxRequest("abc123"), SpecSettings())
    assert "io.sandbox-engine.engine" not in plain.labels
    spec = build_spec(template, SandboxRequest("abc123"), SpecSettings(engine="e1f2"))
    assert spec.labels["io.sandbox-engine.engine"] == "e1f2"
    assert all(c.labels["io.sandbox-engine.engine"] == "e1f2" for c in spec.containers)


def test_published_urls_carry_a_non_default_port() -> None:
    template = load(FIXTURES / "full.yaml")
    local = build_spec(template, SandboxRequest("abc123"), SpecSettings(public_port=8088))
    assert local.endpoints[0].url == "http://abc123-8000.localhost:8088"
    tls = SpecSettings(domain="sandbox.example.com", tls_resolver="le")
    assert build_spec(template, SandboxRequest("abc123"), tls).endpoints[0].url == (
        "https://abc123-8000.sandbox.example.com"
    )


@pytest.mark.parametrize("network", ["sbx-abc123-net", f"sbx-{'z' * 20}-net", "sandbox-edge"])
def test_bridge_names_fit_a_linux_interface_and_carry_the_firewall_prefix(network: str) -> None:
    name = bridge_name(network)
    assert len(name) <= 15 and name.startswith("sbx") and name == bridge_name(network)
    assert bridge_name(network + "x") != name


def test_with_a_disk_everything_the_sandbox_writes_is_a_folder_of_it() -> None:
    template = load(FIXTURES / "full.yaml")
    assert template.services, "the full fixture has services"
    plain = build_spec(template, SandboxRequest("abc123"), SpecSettings())
    spec = build_spec(template, SandboxRequest("abc123"), SpecSettings(disk="/d/e1/abc123"))
    # Without a disk: Docker's own volumes, the layout of stacks made before disks.
    assert plain.disk == "" and plain.volume_folder("sbx-abc123-home") == ""
    assert not any(c.read_only or c.tmpfs for c in plain.containers)
    # With one: every volume a folder of it, the workspace's /tmp and /var/tmp too.
    assert set(spec.volumes) == {*plain.volumes, "sbx-abc123-tmp", "sbx-abc123-var-tmp"}
    assert spec.volume_folder("sbx-abc123-home") == "/d/e1/abc123/home"
    folders = {name for name, _ in disk_folders(template)}
    assert {v.removeprefix("sbx-abc123-") for v in spec.volumes} == folders
    workspace = next(c for c in spec.containers if c.key == "workspace")
    assert {m.target for m in workspace.mounts} == {"/home/coder", "/tmp", "/var/tmp"}
    assert not workspace.read_only  # docker cp puts Claude Code's settings in /etc
    assert workspace.tmpfs == {"/run/lock": "size=1m"}  # the image's other sticky folder
    # Services: a read-only root; their scratch folders in bounded memory.
    for service in (c for c in spec.containers if c.key != "workspace"):
        assert service.read_only
        assert service.tmpfs and all("size=" in o for o in service.tmpfs.values())
        assert "/tmp" in service.tmpfs
    assert dict(disk_folders(template))["tmp"] == "1777"
