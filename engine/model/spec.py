"""Template + request + settings → SandboxSpec: plain data, no I/O.

The Pulumi program (``stacks/``) maps a spec to resources and nothing else; everything a
sandbox is made of is decided here, where it is tested as a table of fixtures.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.model.templates import Template

SANDBOX_ID = re.compile(r"^[a-z0-9]{6,20}$")
DOMAIN = re.compile(
    r"^(?=.{1,200}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
)
# The operator's saved Claude Code config (config.json): read by the engine when it sets up a
# sandbox's Claude Code (engine/ai/workspace.py), never mounted into a sandbox.
CLAUDE_AUTH_VOLUME = "claude-auth"
# Every bridge the engine makes (each sandbox's network, the edge network) gets a Linux
# interface named BRIDGE_PREFIX + 12 hex digits, so the host firewall (engine/host/firewall.py) can
# tell traffic from sandboxes by its interface alone, whatever address pool Docker uses.
BRIDGE_PREFIX = "sbx"
# A sandbox with egress rules (template network.egress none or allow) gets a bridge named
# RESTRICTED_PREFIX + 11 hex digits ("r" is no hex digit: no other bridge's name starts so):
# the host firewall drops whatever it would forward from it to anywhere but its own network.
RESTRICTED_PREFIX = "sbxr"
# The name the workspace of such a sandbox reaches the engine's egress proxy at: an address
# of the host (Docker's default bridge's gateway, SANDBOX_EGRESS_PROXY_ADDRESS).
EGRESS_PROXY_HOST = "egress-proxy"
# Where a workspace's CA bundle is (SANDBOX_CA_BUNDLE, when set, is bound over it).
CA_BUNDLE_PATH = "/etc/ssl/certs/ca-certificates.crt"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
MANAGED_BY = "sandbox-engine"

# Label keys on every Docker object of a sandbox.
L_MANAGED = "io.sandbox-engine.managed-by"
L_SANDBOX = "io.sandbox-engine.sandbox"
L_TEMPLATE = "io.sandbox-engine.template"
L_OWNER = "io.sandbox-engine.owner"
L_ROLE = "io.sandbox-engine.role"
# The engine instance (engine_instance.id of its database) the sandbox belongs to: the orphan
# sweep only ever removes objects of its own engine.
L_ENGINE = "io.sandbox-engine.engine"
# Honoured by the engine's docker provider: the container's process limit (docs/provider.md).
L_PIDS_LIMIT = "io.sandbox-engine.pids-limit"
# Honoured by the provider's Service: an update keeps the task on the node it runs on (its
# volumes are there; docs/provider.md). On every service of a swarm sandbox.
L_STICKY = "io.sandbox-engine.sticky"

# Service containers: image, port, limits, and the workspace env that reaches them.
SERVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "postgres": {
        "image": "service-postgres:latest",
        "port": 5432,
        "cpus": 1.0,
        "memory_mb": 512,
        "pids": 256,
        "data": "/var/lib/postgresql/data",
        # With a disk (below), the root file system is read-only: what the service writes
        # besides its data goes to memory of a bounded size, counted in its memory limit.
        "scratch": ("/tmp", "/var/run/postgresql"),  # noqa: S108 (in the container)
    },
    "redis": {
        "image": "service-redis:latest",
        "port": 6379,
        "cpus": 0.5,
        "memory_mb": 256,
        "pids": 128,
        "data": "/data",
        "scratch": ("/tmp",),  # noqa: S108
    },
}
SERVICE_DB = "sandbox"  # database name and user of the postgres service
SCRATCH_TMPFS = "size=64m,mode=1777"  # a service's scratch folder (memory, bounded)
# The workspace's folders everyone may write to, besides its home: on the sandbox's disk too,
# so nothing the candidate writes lands in the container's layer on the host's disk.
WORKSPACE_SCRATCH = {"tmp": "/tmp", "var-tmp": "/var/tmp"}  # noqa: S108


@dataclass(frozen=True)
class SandboxRequest:
    sandbox_id: str
    owner: str = "cli"


@dataclass(frozen=True)
class SpecSettings:
    domain: str = "localhost"  # public ports are <id>-<port>.<domain>
    entrypoint: str = "web"  # Traefik entrypoint for public ports
    tls_resolver: str = ""  # Traefik certificate resolver; empty: plain HTTP
    engine: str = ""  # engine instance id, labelled on every object; empty: no label
    edge_network: str = "sandbox-edge"  # network Traefik reaches published workspaces on
    public_port: int = 0  # port in published URLs; 0: the scheme's default
    runtime: str = "runc"  # the runtime of templates that set none (SANDBOX_RUNTIME)
    # The sandbox's disk on the host (engine/host/disks.py): its volumes are folders of it.
    # Empty: Docker's own volumes, unbounded (a stack made before disks, or SANDBOX_DISKS off).
    disk: str = ""
    egress_port: int = 8792  # the engine's egress proxy on the host (SANDBOX_EGRESS_PORT)
    # The host's address the workspace reaches it at (its `egress-proxy`); empty: Docker's
    # host-gateway (a stack made before the engine named it).
    egress_address: str = ""
    ca_bundle: str = ""  # a CA bundle on the Docker host the workspace trusts (SANDBOX_CA_BUNDLE)


@dataclass(frozen=True)
class Bind:
    """A file or folder of the Docker host, bound into a container (read-only)."""

    source: str
    target: str


@dataclass(frozen=True)
class Mount:
    volume: str
    target: str


@dataclass(frozen=True)
class ContainerSpec:
    key: str  # resource name in the stack: workspace | postgres | redis
    name: str  # Docker container name
    image: str
    hostname: str
    cpus: float
    memory_mb: int
    pids_limit: int
    labels: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    aliases: tuple[str, ...] = ()
    user: str = ""
    workdir: str = ""
    wait_healthy: bool = False
    # Shared networks the container also joins (not the stack's): the edge network.
    extra_networks: tuple[str, ...] = ()
    # The runtime dockerd runs it with; empty: dockerd's default (runc), as before runtimes
    # could be chosen, so that existing stacks show no change.
    runtime: str = ""
    read_only: bool = False  # the root file system (a service's, when the sandbox has a disk)
    tmpfs: dict[str, str] = field(default_factory=dict)  # path → mount options
    binds: tuple[Bind, ...] = ()
    extra_hosts: dict[str, str] = field(default_factory=dict)  # name → address


@dataclass(frozen=True)
class Endpoint:
    port: int
    public: bool
    url: str  # public URL through Traefik, or "" when not public


@dataclass(frozen=True)
class SandboxSpec:
    sandbox_id: str
    stack: str
    template: str
    owner: str
    network: str
    bridge: str  # the network's Linux interface name (bridge_name)
    volumes: tuple[str, ...]  # volumes the stack owns (destroyed with it)
    containers: tuple[ContainerSpec, ...]
    endpoints: tuple[Endpoint, ...]
    labels: dict[str, str]
    # The disk's mount point on the host; every volume is its folder named after the volume
    # without the stack's prefix (``disk/home``). Empty: no disk.
    disk: str = ""

    def volume_folder(self, volume: str) -> str:
        """The host folder a volume binds (empty without a disk)."""
        return f"{self.disk}/{volume.removeprefix(self.stack + '-')}" if self.disk else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bridge_name(network: str, *, restricted: bool = False) -> str:
    """A Linux interface name (15 characters at most) for a network the engine makes."""
    digest = hashlib.sha256(network.encode()).hexdigest()
    return RESTRICTED_PREFIX + digest[:11] if restricted else BRIDGE_PREFIX + digest[:12]


def proxy_env(template: Template, port: int) -> dict[str, str]:
    """A restricted workspace's proxy variables, in both spellings tools read: everything
    outside the sandbox goes through the engine's egress proxy, its own services do not."""
    proxy = f"http://{EGRESS_PROXY_HOST}:{port}"
    local = ",".join(("localhost", "127.0.0.1", "::1", "workspace", *template.services))
    env: dict[str, str] = {}
    for name, value in (("HTTP_PROXY", proxy), ("HTTPS_PROXY", proxy), ("NO_PROXY", local)):
        env[name] = env[name.lower()] = value
    return env


def stack_name(sandbox_id: str) -> str:
    return f"sbx-{sandbox_id}"


def runtime_of(template: Template, settings: SpecSettings) -> str:
    """The runtime the sandbox's containers ask dockerd for: empty for runc, dockerd's
    default (so a stack made before runtimes could be chosen shows no change)."""
    runtime = template.runtime or settings.runtime
    return "" if runtime == "runc" else runtime


def disk_folders(template: Template) -> list[tuple[str, str]]:
    """The folders of a sandbox's disk, one per volume, with their modes: the scratch folders
    are everyone's (sticky, as /tmp is); the others take their owner from the image."""
    return [
        ("home", "0755"),
        *((f"{s}-data", "0700") for s in template.services),
        *((name, "1777") for name in WORKSPACE_SCRATCH),
    ]


def build_spec(template: Template, request: SandboxRequest, settings: SpecSettings) -> SandboxSpec:
    """The whole sandbox, decided. Raises ValueError for an id or domain that could reach a
    Traefik rule or a Docker name unchecked."""
    sid = request.sandbox_id
    if not SANDBOX_ID.match(sid):
        raise ValueError(f"sandbox id {sid!r} must be 6-20 lowercase letters and digits")
    if not DOMAIN.match(settings.domain):
        raise ValueError(f"domain {settings.domain!r} is not a valid DNS name")
    prefix = stack_name(sid)
    common = {
        L_MANAGED: MANAGED_BY,
        L_SANDBOX: sid,
        L_TEMPLATE: template.name,
        L_OWNER: request.owner,
    }
    if settings.engine:
        common[L_ENGINE] = settings.engine
    services = [_service(name, prefix, common) for name in template.services]
    workspace, endpoints = _workspace(template, prefix, common, settings)
    volumes = (f"{prefix}-home", *(f"{prefix}-{s}-data" for s in template.services))
    if settings.disk:  # everything the sandbox can write on its disk, nothing on the host's
        scratch = tuple(Mount(f"{prefix}-{n}", target) for n, target in WORKSPACE_SCRATCH.items())
        volumes += tuple(m.volume for m in scratch)
        # /run/lock is everyone's in Debian's images too: a small tmpfs (memory, bounded).
        workspace = replace(
            workspace, mounts=(*workspace.mounts, *scratch), tmpfs={"/run/lock": "size=1m"}
        )
        services = [
            replace(
                s,
                read_only=True,
                tmpfs={p: SCRATCH_TMPFS for p in SERVICE_DEFAULTS[s.key]["scratch"]},
            )
            for s in services
        ]
    restricted = template.egress != "open"
    workspace = _with_egress(workspace, template, settings, prefix)
    runtime = runtime_of(template, settings)
    if runtime:  # every container of the sandbox, services too
        services = [replace(s, runtime=runtime) for s in services]
        workspace = replace(workspace, runtime=runtime)
    return SandboxSpec(
        sandbox_id=sid,
        stack=prefix,
        template=template.name,
        owner=request.owner,
        network=f"{prefix}-net",
        bridge=bridge_name(f"{prefix}-net", restricted=restricted),
        volumes=volumes,
        containers=(workspace, *services),
        endpoints=endpoints,
        labels=common,
        disk=settings.disk,
    )


def _with_egress(
    workspace: ContainerSpec, template: Template, settings: SpecSettings, prefix: str
) -> ContainerSpec:
    """The workspace of a restricted sandbox (out only through the egress proxy, not on the
    shared edge network), and the operator's CA bundle where one is set."""
    if template.egress != "open":
        published = "traefik.docker.network" in workspace.labels
        workspace = replace(
            workspace,
            env={**workspace.env, **proxy_env(template, settings.egress_port)},
            extra_hosts={EGRESS_PROXY_HOST: settings.egress_address or "host-gateway"},
            extra_networks=(),
            # Traefik (on the host's network) reaches it on its own network.
            labels={
                **workspace.labels,
                **({"traefik.docker.network": f"{prefix}-net"} if published else {}),
            },
        )
    if settings.ca_bundle:
        workspace = replace(
            workspace,
            env={**workspace.env, "SSL_CERT_FILE": CA_BUNDLE_PATH,
                 "NODE_EXTRA_CA_CERTS": CA_BUNDLE_PATH},
            binds=(Bind(settings.ca_bundle, CA_BUNDLE_PATH),),
        )  # fmt: skip
    return workspace


def _labels(common: dict[str, str], role: str, pids: int) -> dict[str, str]:
    return {**common, L_ROLE: role, L_PIDS_LIMIT: str(pids)}


def _service(name: str, prefix: str, common: dict[str, str]) -> ContainerSpec:
    """A service container (postgres, redis) with its data volume, healthy before the
    workspace starts."""
    d = SERVICE_DEFAULTS[name]
    service_env = (
        {"POSTGRES_USER": SERVICE_DB, "POSTGRES_DB": SERVICE_DB} if name == "postgres" else {}
    )
    return ContainerSpec(
        key=name,
        name=f"{prefix}-{name}",
        image=d["image"],
        hostname=name,
        cpus=d["cpus"],
        memory_mb=d["memory_mb"],
        pids_limit=d["pids"],
        labels=_labels(common, name, d["pids"]),
        env=service_env,
        mounts=(Mount(f"{prefix}-{name}-data", d["data"]),),
        aliases=(name,),
        wait_healthy=True,
    )


def _service_env(services: tuple[str, ...]) -> dict[str, str]:
    """What the workspace is told of its services. Postgres's password is a stack secret:
    the program adds DATABASE_URL and PGPASSWORD."""
    env: dict[str, str] = {}
    for name in services:  # in the template's order
        if name == "postgres":
            env.update(
                {"PGHOST": "postgres", "PGPORT": "5432", "PGUSER": SERVICE_DB,
                 "PGDATABASE": SERVICE_DB}
            )  # fmt: skip
        else:
            env["REDIS_URL"] = "redis://redis:6379/0"
    return env


def _workspace(
    template: Template, prefix: str, common: dict[str, str], settings: SpecSettings
) -> tuple[ContainerSpec, tuple[Endpoint, ...]]:
    """The workspace container, routed by Traefik on its public ports, and its endpoints."""
    sid = prefix.removeprefix("sbx-")
    ws = template.workspace
    ws_labels = _labels(common, "workspace", template.pids_limit)
    endpoints = []
    for e in template.expose:
        url = ""
        if e.public:
            host = f"{sid}-{e.container}.{settings.domain}"
            scheme = "https" if settings.tls_resolver else "http"
            url = f"{scheme}://{host}" + (
                f":{settings.public_port}" if settings.public_port else ""
            )
            ws_labels.update(traefik_labels(prefix, e.container, host, settings))
        endpoints.append(Endpoint(e.container, e.public, url))
    published = any(e.public for e in template.expose)
    if published:
        ws_labels["traefik.enable"] = "true"
        ws_labels["traefik.docker.network"] = settings.edge_network
    workspace = ContainerSpec(
        key="workspace",
        name=f"{prefix}-workspace",
        image=template.base_image,
        hostname="workspace",
        cpus=template.cpu_limit,
        memory_mb=template.memory_limit // 2**20,
        pids_limit=template.pids_limit,
        labels=ws_labels,
        env={
            **template.env,
            **_service_env(template.services),
            "SANDBOX_ID": sid,
            "SHELL": ws.shell,
        },
        # The home is the sandbox's own, ~/.claude in it: nothing of Claude Code is shared.
        mounts=(Mount(f"{prefix}-home", "/home/coder"),),
        aliases=("workspace",),
        user=ws.user,
        workdir=ws.workdir,
        extra_networks=(settings.edge_network,) if published else (),
    )
    return workspace, tuple(endpoints)


def traefik_labels(prefix: str, port: int, host: str, settings: SpecSettings) -> dict[str, str]:
    router = f"{prefix}-{port}"
    out = {
        f"traefik.http.routers.{router}.rule": f"Host(`{host}`)",
        f"traefik.http.routers.{router}.entrypoints": settings.entrypoint,
        f"traefik.http.routers.{router}.service": router,
        f"traefik.http.services.{router}.loadbalancer.server.port": str(port),
    }
    if settings.tls_resolver:
        out[f"traefik.http.routers.{router}.tls.certresolver"] = settings.tls_resolver
    return out
