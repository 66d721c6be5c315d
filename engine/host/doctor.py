"""``make doctor``: one row per component the engine needs, with the fix for what is missing."""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from engine.host.toolenv import sdk_version
from engine.model.spec import BRIDGE_NAME_OPTION, bridge_name
from engine.settings import Settings

BASE_IMAGE = "sandbox-base:bookworm"


@dataclass(frozen=True)
class Check:
    component: str
    ok: bool
    detail: str
    fix: str = ""


def _run(argv: list[str], timeout: float = 20) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    return out.stdout.strip()


def check_dockerd() -> Check:
    import docker

    try:
        client = docker.from_env(timeout=5)
        info = client.version()
        client.close()
    except Exception as exc:  # any failure here means "not reachable"
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return Check(
            "dockerd",
            False,
            f"no answer at {where}: {type(exc).__name__}",
            "deploy/local/dockerd.sh (or: make run / make test)",
        )
    return Check("dockerd", True, f"Docker Engine {info.get('Version', '?')}")


# Docker's built-in pools when none is configured: 172.17-31.0.0/16 and 192.168.0.0/16 in /20s.
DOCKER_DEFAULT_POOLS = [
    {"Base": "172.17.0.0/12", "Size": 16},
    {"Base": "192.168.0.0/16", "Size": 20},
]
# Sandbox networks a host should have room for (every sandbox has one).
MIN_NETWORKS = 100


def network_capacity(pools: list[dict[str, object]] | None) -> int:
    """How many networks Docker's default address pools can hand out (nothing configured:
    Docker's own pools, about 30)."""
    total = 0
    for pool in pools or DOCKER_DEFAULT_POOLS:
        base = ipaddress.ip_network(str(pool["Base"]), strict=False)
        size = int(str(pool["Size"]))
        if size >= base.prefixlen:
            total += 2 ** (size - base.prefixlen)
    return total


def check_address_pool() -> Check:
    import docker

    try:
        client = docker.from_env(timeout=5)
        pools = client.info().get("DefaultAddressPools")
        client.close()
    except Exception as exc:  # dockerd's own row says why
        return Check("docker address pool", False, f"dockerd did not answer: {type(exc).__name__}")
    room = network_capacity(pools)
    where = (
        ", ".join(f"{p['Base']} in /{p['Size']}s" for p in pools) if pools else "Docker's defaults"
    )
    if room < MIN_NETWORKS:
        return Check(
            "docker address pool",
            False,
            f"room for {room} networks ({where}); every sandbox needs one",
            "default-address-pools in /etc/docker/daemon.json (docs/operations.md), or "
            "restart dockerd with deploy/local/dockerd.sh",
        )
    return Check("docker address pool", True, f"room for {room} sandbox networks ({where})")


def check_postgres(settings: Settings) -> Check:
    import psycopg

    try:
        with psycopg.connect(settings.database_url.get_secret_value(), connect_timeout=5) as conn:
            row = conn.execute("show server_version").fetchone()
    except Exception as exc:
        # The message from libpq can carry the URL's host and user, never its password.
        return Check(
            "postgresql",
            False,
            f"cannot connect: {type(exc).__name__}",
            "deploy/local/postgres.sh (or: make run / make test)",
        )
    return Check("postgresql", True, f"PostgreSQL {row[0] if row else '?'}")


def check_pulumi(settings: Settings) -> Check:
    exe = settings.toolchain_path / "pulumi"
    want = sdk_version()
    try:
        got = _run([str(exe), "version"], timeout=30).removeprefix("v")
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("pulumi CLI", False, f"{exe}: {type(exc).__name__}", "toolchain/build.sh")
    if got != want:
        return Check("pulumi CLI", False, f"v{got}, but the SDK is {want}", "toolchain/build.sh")
    return Check("pulumi CLI", True, f"v{got} (SDK {want})")


# Seconds `pulumi stack ls` may take before the doctor calls it hung.
STACK_LS_TIMEOUT = 20.0


def check_state_backend(settings: Settings) -> Check:
    """``pulumi stack ls`` answers with the engine's environment, and the shell's own
    PULUMI_DIY_BACKEND_PARALLEL (a platform engineer's plain CLI) cannot make it hang: the DIY
    PostgreSQL backend deadlocks with as many listing workers as pool connections
    (engine/host/toolenv.py)."""
    import time

    from engine.host.toolenv import DIY_BACKEND_PARALLEL, pulumi_env

    env = {**os.environ, **pulumi_env(settings)}
    fix = f'PULUMI_DIY_BACKEND_PARALLEL={DIY_BACKEND_PARALLEL} (eval "$(make -s env)" sets it)'
    start = time.monotonic()
    out = _stack_ls(settings, env, fix)
    if isinstance(out, Check):
        return out
    took = time.monotonic() - start
    count = out.count('"name"')
    shell = os.environ.get("PULUMI_DIY_BACKEND_PARALLEL", "")
    pool = max(2 * len(os.sched_getaffinity(0)), 2)  # Go sizes its pool from GOMAXPROCS
    hangs = shell != "" and (not shell.isdigit() or int(shell) >= pool)
    if settings.backend_url().startswith("postgres") and hangs:
        return Check(
            "pulumi state backend",
            False,
            f"this shell has PULUMI_DIY_BACKEND_PARALLEL={shell}: a plain `pulumi stack ls`"
            f" hangs once {pool} stacks or more exist",
            fix,
        )
    return Check(
        "pulumi state backend",
        True,
        f"pulumi stack ls: {count} stacks in {took:.1f} s"
        f" (PULUMI_DIY_BACKEND_PARALLEL={DIY_BACKEND_PARALLEL})",
    )


def _stack_ls(settings: Settings, env: dict[str, str], fix: str) -> str | Check:
    """``pulumi stack ls --json``'s output, or the failed check saying why there is none."""
    try:
        return subprocess.run(
            [str(settings.toolchain_path / "pulumi"), "stack", "ls", "--json"],
            capture_output=True,
            text=True,
            timeout=STACK_LS_TIMEOUT,
            cwd=settings.project_dir,
            env=env,
            check=True,
        ).stdout
    except subprocess.TimeoutExpired:
        return Check(
            "pulumi state backend",
            False,
            f"pulumi stack ls did not answer within {STACK_LS_TIMEOUT:.0f} s",
            fix,
        )
    except OSError as exc:
        return Check(
            "pulumi state backend",
            False,
            f"no pulumi CLI: {type(exc).__name__}",
            "toolchain/build.sh",
        )
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit code {exc.returncode}"]
        # Its error names the backend URL: never its password.
        why = re.sub(r"://([^:/@\s]+):[^@\s]*@", r"://\1:***@", last[0])
        return Check(
            "pulumi state backend",
            False,
            f"pulumi stack ls failed: {why[-300:]}",
            "the postgresql row's fix (the state is in its database)",
        )


def check_language_host(settings: Settings) -> Check:
    names = [
        "pulumi-language-python",
        "pulumi-language-python-exec",
        "pulumi-resource-pulumi-python",
    ]
    missing = [n for n in names if not os.access(settings.toolchain_path / n, os.X_OK)]
    if missing:
        return Check("language host", False, "missing " + ", ".join(missing), "toolchain/build.sh")
    return Check("language host", True, "pulumi-language-python with its exec and provider scripts")


def check_traefik(settings: Settings) -> Check:
    exe = settings.toolchain_path / "traefik"
    try:
        out = _run([str(exe), "version"])
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("traefik", False, f"{exe}: {type(exc).__name__}", "toolchain/build.sh")
    first = next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version:")),
        out.splitlines()[0] if out else "?",
    )
    return Check("traefik", True, first)


def check_edge(settings: Settings) -> Check:
    """The local Traefik answers, and the edge network isolates the workspaces on it."""
    import docker

    from engine.backend.docker import network_subnets
    from engine.host.edge import Edge

    edge = Edge(settings)
    if not edge.healthy():
        return Check(
            "edge (traefik)",
            False,
            f"no answer on 127.0.0.1:{settings.edge_ping_port}/ping",
            "make edge",
        )
    try:
        client = docker.from_env(timeout=5)
        network = client.networks.get(settings.edge_network)
        client.close()
    except Exception as exc:
        return Check(
            "edge (traefik)", False, f"network {settings.edge_network}: {exc}", "make edge"
        )
    options = network.attrs.get("Options") or {}
    bridge = bridge_name(settings.edge_network)
    if options.get("com.docker.network.bridge.enable_icc") != "false":
        wrong = "lets containers reach each other"
    elif options.get(BRIDGE_NAME_OPTION) != bridge:
        wrong = f"has a bridge not named {bridge} (the host firewall would not cover it)"
    else:
        wrong = ""
    if wrong:
        return Check(
            "edge (traefik)",
            False,
            f"network {settings.edge_network} {wrong}",
            f"docker network rm {settings.edge_network} && make edge",
        )
    subnets = network_subnets(network.attrs)
    if settings.edge_subnet and settings.edge_subnet not in subnets:
        return Check(
            "edge (traefik)",
            False,
            f"network {settings.edge_network} is {', '.join(subnets)}, not"
            f" {settings.edge_subnet} (SANDBOX_EDGE_SUBNET): it holds fewer sandboxes",
            f"once no sandbox uses it: docker network rm {settings.edge_network} && make edge",
        )
    return Check(
        "edge (traefik)",
        True,
        f"{edge.url}, network {settings.edge_network} isolated, {', '.join(subnets)}",
    )


def check_firewall() -> Check:
    from engine.host import firewall

    try:
        missing = firewall.problems()
    except (firewall.FirewallError, OSError) as exc:
        return Check("host firewall", False, str(exc), "sudo sandbox-engine firewall apply")
    if missing:
        return Check(
            "host firewall", False, "; ".join(missing), "sudo sandbox-engine firewall apply"
        )
    return Check("host firewall", True, "sandbox bridges cannot reach the host or link-local")


# What an encrypted Swarm overlay needs of the kernel (IPsec ESP with AES-GCM): without them
# Docker makes the network, and its traffic silently goes nowhere (docs/cluster.md).
ENCRYPTION_OPTIONS = ("CONFIG_INET_ESP", "CONFIG_CRYPTO_GCM")


def kernel_lacks(config: str, options: tuple[str, ...] = ENCRYPTION_OPTIONS) -> list[str]:
    """The options of ``options`` a kernel config (``/proc/config.gz``'s text) does not set."""
    have = {
        line.split("=", 1)[0]
        for line in config.splitlines()
        if "=" in line and line.split("=", 1)[1] in ("y", "m")
    }
    return [o for o in options if o not in have]


def _kernel_config() -> str | None:
    import gzip
    import os

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read()
    except OSError:
        pass
    try:
        with open(f"/boot/config-{os.uname().release}") as f:
            return f.read()
    except OSError:
        return None


def check_overlay_encryption(settings: Settings) -> Check:
    """Encrypted overlays for a swarm (SANDBOX_SWARM_ENCRYPT): only where the kernel has
    IPsec ESP and AES-GCM."""
    name = "encrypted overlays"
    config = _kernel_config()
    lacks = kernel_lacks(config) if config is not None else None
    wanted = settings.backend == "swarm" and settings.swarm_encrypt
    if lacks is None:
        return Check(
            name,
            not wanted,
            "the kernel's config is not readable here",
            "SANDBOX_SWARM_ENCRYPT=false unless the nodes' kernels have ESP and GCM",
        )
    if lacks:
        detail = f"this kernel lacks {', '.join(lacks)}: overlays are not encrypted here"
        return Check(name, not wanted, detail, "SANDBOX_SWARM_ENCRYPT=false on this kernel")
    state = "on" if wanted else "off (SANDBOX_SWARM_ENCRYPT)"
    return Check(name, True, f"the kernel has ESP and GCM; encryption {state}")


def check_base_image() -> Check:
    import docker

    try:
        client = docker.from_env(timeout=5)
        image = client.images.get(BASE_IMAGE)
        client.close()
    except docker.errors.ImageNotFound:
        return Check("base image", False, f"{BASE_IMAGE} is missing", "images/base/build.sh")
    except Exception as exc:  # no daemon: the image cannot be looked for
        return Check(
            "base image",
            False,
            f"cannot check without dockerd ({type(exc).__name__})",
            "start dockerd first",
        )
    return Check("base image", True, f"{BASE_IMAGE} {image.short_id}")


def check_runsc() -> Check:
    """gVisor: registered with dockerd as ``runsc``, and a container runs under it."""
    import docker

    fix = "make setup (installs Debian's runsc and registers it: deploy/local/dockerd.sh)"
    try:
        client = docker.from_env(timeout=60)
        runtimes = client.info().get("Runtimes") or {}
        if "runsc" not in runtimes:
            return Check("gvisor (runsc)", False, "dockerd has no runtime runsc", fix)
        args = " ".join(runtimes["runsc"].get("runtimeArgs") or [])
        said = client.containers.run(
            BASE_IMAGE, ["uname", "-r"], runtime="runsc", network_mode="none", remove=True
        )
        client.close()
    except docker.errors.ImageNotFound:
        return Check("gvisor (runsc)", False, f"{BASE_IMAGE} is missing", "images/base/build.sh")
    except Exception as exc:  # the runtime is there and fails: say how
        return Check("gvisor (runsc)", False, f"a container under runsc failed: {exc}"[:300], fix)
    kernel = said.decode().strip() if isinstance(said, bytes) else "?"
    return Check("gvisor (runsc)", True, f"runs (its kernel reports {kernel}; {args})")


def check_disks(settings: Settings) -> Check:
    """A sandbox's disk can be made, mounted and removed here (engine/host/disks.py)."""
    from engine.host.disks import DiskError, Disks, Folder
    from engine.units import format_memory

    name = "sandbox disks"
    if not settings.disks:
        return Check(
            name,
            False,
            "off (SANDBOX_DISKS=false): a sandbox can fill the host's disk",
            "unset SANDBOX_DISKS; docs/operations.md, Disks",
        )
    disks = Disks(settings.disk_path, settings.disk_helper_image)
    try:
        where = disks.check()
        disks.make("_doctor", "doctorcheck", 64 * 2**20, [Folder("tmp", "1777")])
        disks.drop("_doctor", "doctorcheck")
    except DiskError as exc:
        return Check(name, False, str(exc)[:300], "docs/operations.md, Disks")
    return Check(name, True, f"{where}; default limit {format_memory(settings.disk_limit)}")


def check_docker_provider(settings: Settings) -> Check:
    from engine.host.toolenv import PROVIDER_MODULE, ensure_docker_plugin

    try:
        importlib.import_module(PROVIDER_MODULE)  # the plugin runs this module
        exe = ensure_docker_plugin(settings)
    except Exception as exc:
        return Check("docker provider", False, f"{type(exc).__name__}: {exc}", "make venv")
    return Check("docker provider", True, f"{exe.parent.name} in {settings.pulumi_home}/plugins")


def check_package() -> Check:
    try:
        own = dist_version("sandbox-engine")
        docker_sdk = dist_version("pulumi_docker")
    except PackageNotFoundError as exc:
        return Check("python package", False, f"{exc} not installed", "make venv")
    return Check("python package", True, f"sandbox-engine {own}, pulumi_docker {docker_sdk}")


def run_checks(settings: Settings) -> list[Check]:
    checks: Iterable[Callable[[], Check]] = (
        check_dockerd,
        check_address_pool,
        lambda: check_postgres(settings),
        lambda: check_pulumi(settings),
        lambda: check_state_backend(settings),
        lambda: check_language_host(settings),
        lambda: check_disks(settings),
        lambda: check_traefik(settings),
        lambda: check_edge(settings),
        check_firewall,
        lambda: check_overlay_encryption(settings),
        check_base_image,
        check_runsc,
        lambda: check_docker_provider(settings),
        check_package,
    )
    return [c() for c in checks]


def render(checks: list[Check]) -> str:
    width = max(len(c.component) for c in checks)
    lines = []
    for c in checks:
        status = "OK  " if c.ok else "FAIL"
        line = f"{status}  {c.component:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)
