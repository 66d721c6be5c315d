"""Spec → resources on a Docker Swarm (``SANDBOX_BACKEND=swarm``): the same sandbox as
``stacks/sandbox.py`` declares on one dockerd, as Swarm objects.

- the sandbox's network: an attachable overlay of its own (its services reach each other by
  name on it and nothing else does: Swarm isolates overlays from each other);
- one ``Service`` per container: one replica, reservations equal to its limits (Swarm places by
  real capacity and never puts more on a node than it holds), the container's user, env,
  mounts, aliases, host entries and labels (Traefik's swarm provider reads them on the
  service), ``dnsrr`` endpoints (no virtual IP: this kernel has no IPVS, and a sandbox needs
  none), a restart policy like ``unless-stopped``;
- its volumes are the services' volume mounts: Docker makes each on the node that runs the
  task, labelled with the sandbox (the backend removes them there).

The workspace is declared after its services, as on one host; each service's create waits
until its task runs (healthy, where the image has a health check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_docker as docker

from engine.model.spec import L_STICKY, ContainerSpec, SandboxSpec
from stacks.outputs import outputs

MIB = 2**20
TRAEFIK_DOCKER_NETWORK = "traefik.docker.network"
TRAEFIK_SWARM_NETWORK = "traefik.swarm.network"


@dataclass(frozen=True)
class Placement:
    """How the sandbox's tasks are placed: ``timeout`` seconds at most for a node with room
    (then its start and health check); ``restarts``, bumped by each repair of the engine, so
    that Swarm starts a new task (on its node: ``L_STICKY``) when nothing else changed."""

    timeout: int = 60
    restarts: int = 0
    encrypt: bool = False  # the overlay's traffic between nodes (IPsec: docs/cluster.md)


def declare(spec: SandboxSpec, envs_of: Any, placement: Placement) -> dict[str, Any]:
    """Declare the sandbox's overlay network and services; return the stack outputs.
    ``envs_of(container)`` is the container's environment (``stacks/sandbox.py``'s)."""
    network = docker.Network(
        "network",
        name=spec.network,
        driver="overlay",
        attachable=True,
        options={"encrypted": ""} if placement.encrypt else None,
        labels=[docker.NetworkLabelArgs(label=k, value=v) for k, v in sorted(spec.labels.items())],
    )
    services = [
        _service(c, envs_of(c), network, spec, [], placement)
        for c in spec.containers
        if c.key != "workspace"
    ]
    workspace = next(c for c in spec.containers if c.key == "workspace")
    ws = _service(workspace, envs_of(workspace), network, spec, list(services), placement)
    return outputs(spec, network.name, ws.name)


def service_labels(labels: dict[str, str], network: str) -> dict[str, str]:
    """A service's labels: its container's, sticky to its node, and for a published workspace
    Traefik's swarm provider told to reach it on the sandbox's own overlay (the swarm's edge
    is connected to it) instead of the host's shared edge network."""
    out = {**labels, L_STICKY: "true"}
    if out.pop(TRAEFIK_DOCKER_NETWORK, None) is not None:
        out[TRAEFIK_SWARM_NETWORK] = network
    return out


def _service(
    c: ContainerSpec,
    envs: pulumi.Output[list[str]],
    network: docker.Network,
    spec: SandboxSpec,
    depends_on: list[pulumi.Resource],
    placement: Placement,
) -> docker.Service:
    nano_cpus = round(c.cpus * 1e9)
    memory = c.memory_mb * MIB
    mounts = [
        docker.ServiceTaskSpecContainerSpecMountArgs(
            type="volume",
            source=m.volume,
            target=m.target,
            volume_options=docker.ServiceTaskSpecContainerSpecMountVolumeOptionsArgs(
                labels=[
                    docker.ServiceTaskSpecContainerSpecMountVolumeOptionsLabelArgs(label=k, value=v)
                    for k, v in sorted(spec.labels.items())
                ],
            ),
        )
        for m in c.mounts
    ]
    mounts += [
        docker.ServiceTaskSpecContainerSpecMountArgs(
            type="bind", source=b.source, target=b.target, read_only=True
        )
        for b in c.binds
    ]
    mounts += [
        docker.ServiceTaskSpecContainerSpecMountArgs(
            type="tmpfs",
            target=path,
            tmpfs_options=docker.ServiceTaskSpecContainerSpecMountTmpfsOptionsArgs(
                size_bytes=_tmpfs_size(options)
            ),
        )
        for path, options in sorted(c.tmpfs.items())
    ]
    return docker.Service(
        c.key,
        name=c.name,
        labels=[
            docker.ServiceLabelArgs(label=k, value=v)
            for k, v in sorted(service_labels(c.labels, spec.network).items())
        ],
        mode=docker.ServiceModeArgs(replicated=docker.ServiceModeReplicatedArgs(replicas=1)),
        task_spec=docker.ServiceTaskSpecArgs(
            container_spec=docker.ServiceTaskSpecContainerSpecArgs(
                image=c.image,
                hostname=c.hostname,
                env=envs.apply(lambda pairs: dict(p.split("=", 1) for p in pairs)),
                labels=[
                    docker.ServiceTaskSpecContainerSpecLabelArgs(label=k, value=v)
                    for k, v in sorted(c.labels.items())
                ],
                user=c.user or None,
                dir=c.workdir or None,
                mounts=mounts or None,
                hosts=[
                    docker.ServiceTaskSpecContainerSpecHostArgs(host=h, ip=ip)
                    for h, ip in sorted(c.extra_hosts.items())
                ]
                or None,
                # Unprivileged, as on one host: the images run as their own users.
                cap_drops=["ALL"],
                read_only=c.read_only or None,
            ),
            resources=docker.ServiceTaskSpecResourcesArgs(
                limits=docker.ServiceTaskSpecResourcesLimitsArgs(
                    nano_cpus=nano_cpus, memory_bytes=memory
                ),
                # Reserved as much as it may use: Swarm places by what nodes really hold.
                reservation=docker.ServiceTaskSpecResourcesReservationArgs(
                    nano_cpus=nano_cpus, memory_bytes=memory
                ),
            ),
            networks_advanceds=[
                docker.ServiceTaskSpecNetworksAdvancedArgs(
                    id=network.id, aliases=list(c.aliases) or None
                )
            ],
            # Never started again by Swarm itself: Swarm would start a lost node's task on
            # another node, with new, empty volumes — a candidate's work silently gone. The
            # engine's repair starts it again, on the node that has its volumes (L_STICKY).
            restart_policy=docker.ServiceTaskSpecRestartPolicyArgs(condition="none"),
            force_update=placement.restarts or None,
        ),
        endpoint_spec=docker.ServiceEndpointSpecArgs(mode="dnsrr"),
        converge_config=docker.ServiceConvergeConfigArgs(
            delay="1s", timeout=f"{placement.timeout}s"
        ),
        opts=pulumi.ResourceOptions(depends_on=depends_on),
    )


def _tmpfs_size(options: str) -> int | None:
    """``size=64m,mode=1777`` → bytes (Docker's tmpfs options of one host)."""
    for part in options.split(","):
        key, _, value = part.partition("=")
        if key == "size" and value:
            unit = value[-1].lower()
            factor = {"k": 2**10, "m": 2**20, "g": 2**30}.get(unit)
            return int(value[:-1]) * factor if factor else int(value)
    return None
