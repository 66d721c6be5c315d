"""Spec → resources: every Docker object of one sandbox, declared with ``pulumi_docker``."""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_docker as docker

from engine.model.spec import BRIDGE_NAME_OPTION, SERVICE_DB, ContainerSpec, SandboxSpec
from stacks import swarm
from stacks.outputs import outputs


def _labels(labels: dict[str, str], cls: Any) -> list[Any]:
    return [cls(label=k, value=v) for k, v in sorted(labels.items())]


def declare(
    spec: SandboxSpec,
    service_password: pulumi.Output[str] | None,
    extra_env: pulumi.Output[Any] | None = None,
    backend: str = "docker",
    placement: swarm.Placement | None = None,
) -> dict[str, Any]:
    """Declare the sandbox's network, volumes and containers; return the stack outputs.
    ``backend`` swarm: the same sandbox as Swarm services (``stacks/swarm.py``), placed as
    ``placement`` says."""
    if backend == "swarm":
        return swarm.declare(
            spec,
            lambda c: _envs(c, service_password, extra_env if c.key == "workspace" else None),
            placement or swarm.Placement(),
        )
    network = docker.Network(
        "network",
        name=spec.network,
        driver="bridge",
        options={BRIDGE_NAME_OPTION: spec.bridge},
        labels=_labels(spec.labels, docker.NetworkLabelArgs),
    )
    volumes = {
        name: docker.Volume(
            name.removeprefix(f"{spec.stack}-"),
            name=name,
            labels=_labels(spec.labels, docker.VolumeLabelArgs),
            # A folder of the sandbox's disk (engine/host/disks.py), bound by Docker's local
            # driver: the disk's size bounds what the sandbox writes.
            driver_opts=(
                {"type": "none", "o": "bind", "device": spec.volume_folder(name)}
                if spec.disk
                else None
            ),
        )
        for name in spec.volumes
    }

    def container(c: ContainerSpec, depends_on: list[pulumi.Resource]) -> docker.Container:
        envs = _envs(c, service_password, extra_env if c.key == "workspace" else None)
        return _container(c, envs, network, volumes, depends_on)

    services = [container(c, []) for c in spec.containers if c.key != "workspace"]
    workspace = next(c for c in spec.containers if c.key == "workspace")
    ws = container(workspace, list(services))
    return outputs(spec, network.name, ws.name)


def _envs(
    c: ContainerSpec,
    service_password: pulumi.Output[str] | None,
    extra_env: pulumi.Output[Any] | None,
) -> pulumi.Output[list[str]]:
    """The container's environment: the spec's, the service password where it is needed, and
    the request's env last (it can set what the template leaves open)."""
    env: dict[str, Any] = dict(c.env)
    if service_password is not None and c.key == "postgres":
        env["POSTGRES_PASSWORD"] = service_password
    if service_password is not None and c.key == "workspace" and "PGHOST" in env:
        env["PGPASSWORD"] = service_password
        env["DATABASE_URL"] = pulumi.Output.concat(
            f"postgresql://{SERVICE_DB}:", service_password, f"@postgres:5432/{SERVICE_DB}"
        )
    pairs = [pulumi.Output.concat(k, "=", v) for k, v in sorted(env.items())]
    envs: pulumi.Output[Any] = pulumi.Output.all(*pairs)
    if extra_env is not None:
        envs = pulumi.Output.all(envs, extra_env).apply(
            lambda both: [*both[0], *(f"{k}={v}" for k, v in sorted((both[1] or {}).items()))]
        )
    return envs


def _container(
    c: ContainerSpec,
    envs: pulumi.Output[list[str]],
    network: docker.Network,
    volumes: dict[str, docker.Volume],
    depends_on: list[pulumi.Resource],
) -> docker.Container:
    return docker.Container(
        c.key,
        name=c.name,
        image=c.image,
        hostname=c.hostname,
        envs=envs,
        labels=_labels(c.labels, docker.ContainerLabelArgs),
        cpus=f"{c.cpus:g}",
        memory=c.memory_mb,
        # No swap beyond the limit: on a host with swap Docker would allow twice as much.
        memory_swap=c.memory_mb,
        networks_advanced=[
            docker.ContainerNetworksAdvancedArgs(name=network.name, aliases=list(c.aliases)),
            # The edge network: Traefik reaches the workspace here; no alias, and
            # inter-container traffic is off on it, so sandboxes cannot reach each other.
            *(docker.ContainerNetworksAdvancedArgs(name=n) for n in c.extra_networks),
        ],
        volumes=[
            docker.ContainerVolumeArgs(
                volume_name=volumes[m.volume].name if m.volume in volumes else m.volume,
                container_path=m.target,
            )
            for m in c.mounts
        ],
        # Files of the host the container only reads (the operator's CA bundle).
        mounts=[
            docker.ContainerMountArgs(type="bind", source=b.source, target=b.target, read_only=True)
            for b in c.binds
        ]
        or None,
        hosts=[docker.ContainerHostArgs(host=h, ip=ip) for h, ip in sorted(c.extra_hosts.items())]
        or None,
        # Unprivileged: the images run as their own users; no capability is needed.
        capabilities=docker.ContainerCapabilitiesArgs(drops=["ALL"]),
        security_opts=["no-new-privileges"],
        restart="unless-stopped",
        user=c.user or None,
        working_dir=c.workdir or None,
        runtime=c.runtime or None,
        read_only=c.read_only or None,
        tmpfs=c.tmpfs or None,
        wait=c.wait_healthy,
        wait_timeout=120,
        opts=pulumi.ResourceOptions(depends_on=depends_on),
    )
