"""``docker:index/container:Container``.

Create is transactional: the container is removed again when connecting a network, starting it
or waiting for it fails, so a failed create leaves nothing behind. Refresh sees a container
removed out of band (it disappears from the state) or stopped while ``mustRun`` holds (its
``exitCode`` is set, and the next diff replaces it).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import docker.errors

from stacks.provider import container_spec as spec
from stacks.provider.diffing import Diff, Kind, diff_inputs
from stacks.provider.errors import CheckFailures, PropertyError, ProviderError
from stacks.provider.resource import Context, Resource
from stacks.provider.schema import BOOL, INT, LABELS, STR, list_of, map_of, obj
from stacks.provider.wire import UNKNOWN, Props, contains_unknown

PORT = obj(("internal",), internal=INT, external=INT, ip=STR, protocol=STR)
NETWORK = obj(
    ("name",),
    name=STR,
    aliases=list_of(STR),
    ipv4Address=STR,
    ipv6Address=STR,
    macAddress=STR,
    driverOpts=list_of(STR),
)
VOLUME = obj(
    containerPath=STR,
    volumeName=STR,
    hostPath=STR,
    fromContainer=STR,
    readOnly=BOOL,
    selinuxRelabel=STR,
)
MOUNT = obj(
    ("target", "type"),
    target=STR,
    type=STR,
    source=STR,
    readOnly=BOOL,
    bindOptions=obj(propagation=STR),
    volumeOptions=obj(
        noCopy=BOOL, labels=LABELS, driverName=STR, driverOptions=map_of(STR), subpath=STR
    ),
    tmpfsOptions=obj(sizeBytes=INT, mode=INT),
)
HEALTHCHECK = obj(
    tests=list_of(STR),
    interval=STR,
    timeout=STR,
    startPeriod=STR,
    startInterval=STR,
    retries=INT,
)

# Upstream properties this provider does not implement: named in a clear check failure.
UNSUPPORTED = (
    "devices",
    "deviceRequests",
    "deviceReadBps",
    "deviceReadIops",
    "deviceWriteBps",
    "deviceWriteIops",
    "gpus",
    "uploads",
    "cgroupParent",
    "platform",
)
# Inputs that steer the provider and are not visible on the container.
PROVIDER_ONLY = frozenset(
    {
        "mustRun",
        "start",
        "wait",
        "waitTimeout",
        "destroyGraceSeconds",
        "removeVolumes",
        "attach",
        "logs",
        "containerReadRefreshTimeoutMilliseconds",
    }
)
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
MOUNT_TYPES = ("bind", "volume", "tmpfs")


class Container(Resource):
    token = "docker:index/container:Container"
    inputs = obj(
        ("image",),
        name=STR,
        image=STR,
        command=list_of(STR),
        entrypoints=list_of(STR),
        envs=list_of(STR),
        labels=LABELS,
        hostname=STR,
        domainname=STR,
        user=STR,
        workingDir=STR,
        memory=INT,
        memorySwap=INT,
        memoryReservation=INT,
        shmSize=INT,
        cpuShares=INT,
        cpuSet=STR,
        cpus=STR,
        cpuPeriod=INT,
        cpuQuota=INT,
        networksAdvanced=list_of(NETWORK),
        networkMode=STR,
        ports=list_of(PORT),
        publishAllPorts=BOOL,
        volumes=list_of(VOLUME),
        mounts=list_of(MOUNT),
        tmpfs=map_of(STR),
        capabilities=obj(adds=list_of(STR), drops=list_of(STR)),
        securityOpts=list_of(STR),
        readOnly=BOOL,
        privileged=BOOL,
        init=BOOL,
        tty=BOOL,
        stdinOpen=BOOL,
        restart=STR,
        maxRetryCount=INT,
        healthcheck=HEALTHCHECK,
        ulimits=list_of(obj(("name", "soft", "hard"), name=STR, soft=INT, hard=INT)),
        sysctls=map_of(STR),
        dns=list_of(STR),
        dnsOpts=list_of(STR),
        dnsSearches=list_of(STR),
        groupAdds=list_of(STR),
        hosts=list_of(obj(("host", "ip"), host=STR, ip=STR)),
        ipcMode=STR,
        pidMode=STR,
        runtime=STR,
        storageOpts=map_of(STR),
        usernsMode=STR,
        cgroupnsMode=STR,
        logDriver=STR,
        logOpts=map_of(STR),
        stopSignal=STR,
        stopTimeout=INT,
        mustRun=BOOL,
        start=BOOL,
        wait=BOOL,
        waitTimeout=INT,
        destroyGraceSeconds=INT,
        removeVolumes=BOOL,
        rm=BOOL,
        attach=BOOL,
        logs=BOOL,
        containerReadRefreshTimeoutMilliseconds=INT,
    )
    # As upstream: these change without recreating the container; everything else replaces it.
    in_place = frozenset(
        {
            "attach",
            "containerReadRefreshTimeoutMilliseconds",
            "cpuPeriod",
            "cpuQuota",
            "cpuSet",
            "cpuShares",
            "destroyGraceSeconds",
            "healthcheck",
            "init",
            "logs",
            "maxRetryCount",
            "memory",
            "memoryReservation",
            "memorySwap",
            "mustRun",
            "removeVolumes",
            "restart",
            "rm",
            "start",
            "tmpfs",
            "wait",
            "waitTimeout",
        }
    )
    # Optional inputs the daemon fills in when unset (its defaults differ between daemons and
    # cgroup versions): left out of the program, they keep whatever value the container has.
    computed = frozenset(
        {
            "hostname",
            "domainname",
            "user",
            "workingDir",
            "entrypoints",
            "command",
            "memorySwap",
            "shmSize",
            "ipcMode",
            "networkMode",
            "logDriver",
            "logOpts",
            "runtime",
            "stopSignal",
            "stopTimeout",
            "init",
            "securityOpts",
            "networksAdvanced",
            "dns",
            "dnsOpts",
            "dnsSearches",
            "cgroupnsMode",
            "usernsMode",
            "pidMode",
            "storageOpts",
            "groupAdds",
        }
    )
    outputs = ("networkDatas", "bridge", "exitCode", "containerLogs")
    delete_before_replace = True  # names are fixed: the old container must go first

    # --- check -----------------------------------------------------------------------------

    def check(self, news: Props, olds: Props, *, autoname: str | None) -> Props:
        unsupported = [(k, "is not supported by this provider") for k in UNSUPPORTED if k in news]
        if unsupported:
            raise CheckFailures(unsupported)
        return spec.normalize(super().check(news, olds, autoname=autoname))

    def check_values(self, news: Props) -> list[tuple[str, str]]:
        failures: list[tuple[str, str]] = []

        def known(key: str) -> Any:
            value = news.get(key)
            return None if value == UNKNOWN else value

        for key in ("memory", "memoryReservation", "shmSize"):
            value = known(key)
            if isinstance(value, int) and value < 0:
                failures.append((key, f"must be a size in MB >= 0, got {value}"))
        memory = known("memory")
        if isinstance(memory, int) and 0 < memory < 6:
            failures.append(("memory", f"Docker's minimum is 6 MB, got {memory}"))
        swap = known("memorySwap")
        if isinstance(swap, int) and swap < -1:
            failures.append(("memorySwap", f"must be -1 (unlimited) or a size in MB, got {swap}"))
        if isinstance(swap, int) and swap > 0 and isinstance(memory, int) and swap < memory:
            failures.append(("memorySwap", "must be at least memory (it is memory plus swap)"))
        cpus = known("cpus")
        if isinstance(cpus, str):
            try:
                spec.canonical_cpus(cpus)
            except ValueError:
                failures.append(
                    ("cpus", f"must be a positive number of CPUs like '1.5', got {cpus!r}")
                )
        restart = known("restart")
        if isinstance(restart, str) and restart not in RESTART_POLICIES:
            failures.append(
                ("restart", f"must be one of {', '.join(RESTART_POLICIES)}, got {restart!r}")
            )
        for i, port in enumerate(news.get("ports") or []):
            if not isinstance(port, dict):
                continue
            for key in ("internal", "external"):
                value = port.get(key)
                if isinstance(value, int) and not 0 < value < 65536:
                    failures.append((f"ports[{i}].{key}", f"must be a port 1-65535, got {value}"))
            if port.get("protocol") not in (None, UNKNOWN, "tcp", "udp", "sctp"):
                failures.append((f"ports[{i}].protocol", "must be tcp, udp or sctp"))
        for i, mount in enumerate(news.get("mounts") or []):
            if isinstance(mount, dict) and mount.get("type") not in (None, UNKNOWN, *MOUNT_TYPES):
                failures.append((f"mounts[{i}].type", f"must be one of {', '.join(MOUNT_TYPES)}"))
        for i, env in enumerate(news.get("envs") or []):
            if isinstance(env, str) and env != UNKNOWN and "=" not in env:
                failures.append((f"envs[{i}]", "must have the form KEY=VALUE"))
        for i, label in enumerate(news.get("labels") or []):
            if isinstance(label, dict) and label.get("label") == spec.PIDS_LIMIT_LABEL:
                value = label.get("value")
                if value != UNKNOWN and not (
                    isinstance(value, str) and value.isdigit() and int(value) > 0
                ):
                    failures.append(
                        (
                            f"labels[{i}].value",
                            f"{spec.PIDS_LIMIT_LABEL} must be a positive whole number",
                        )
                    )
        health = news.get("healthcheck")
        if isinstance(health, dict):
            for key in ("interval", "timeout", "startPeriod", "startInterval"):
                value = health.get(key)
                if isinstance(value, str) and value != UNKNOWN:
                    try:
                        spec.duration_ns(value)
                    except ValueError as exc:
                        failures.append((f"healthcheck.{key}", str(exc)))
        return failures

    # --- diff ------------------------------------------------------------------------------

    def diff(self, old_inputs: Props, news: Props, state: Props) -> Diff:
        news = _keep_assigned_ports(old_inputs, news)
        result = diff_inputs(
            self._with_filled_in(old_inputs, state),
            news,
            in_place=self.in_place,
            computed=self.computed,
        )
        # Refresh found the container stopped although it must run: recreate it.
        if (
            state.get("exitCode") is not None
            and news.get("mustRun", True)
            and "mustRun" not in result.detailed
        ):
            return Diff({**result.detailed, "mustRun": Kind.UPDATE_REPLACE})
        return result

    # --- create ----------------------------------------------------------------------------

    def create(self, ctx: Context, inputs: Props) -> tuple[str, Props]:
        api = ctx.docker.api
        config, extra_networks = spec.to_engine_config(inputs)
        name = inputs["name"]
        try:
            created = api.create_container_from_config(config, name=name)
        except docker.errors.ImageNotFound as exc:
            raise PropertyError(
                "image",
                f"image {inputs['image']!r} is not present on the Docker host "
                "(nothing is pulled here)",
            ) from exc
        except docker.errors.APIError as exc:
            raise _blame(exc, inputs) from exc
        id_: str = created["Id"]
        try:
            for net in extra_networks:
                self._connect(ctx, id_, net)
            if inputs.get("start", True):
                try:
                    api.start(id_)
                except docker.errors.APIError as exc:
                    raise _blame(exc, inputs) from exc
                self._await_running(ctx, id_, inputs)
            outputs = self.read_back(ctx, id_, inputs, after="create")
        except BaseException:
            _remove_quietly(ctx, id_)
            raise
        return id_, outputs

    @staticmethod
    def _connect(ctx: Context, id_: str, net: dict[str, Any]) -> None:
        ipam = net.get("IPAMConfig") or {}
        try:
            ctx.docker.api.connect_container_to_network(
                id_,
                net["name"],
                aliases=net.get("Aliases"),
                ipv4_address=ipam.get("IPv4Address"),
                ipv6_address=ipam.get("IPv6Address"),
                driver_opt=net.get("DriverOpts"),
            )
        except docker.errors.APIError as exc:
            raise PropertyError(
                "networksAdvanced", f"cannot join network {net['name']!r}: {exc.explanation}"
            ) from exc

    @staticmethod
    def _await_running(ctx: Context, id_: str, inputs: Props) -> None:
        api = ctx.docker.api
        state = api.inspect_container(id_)["State"]
        if inputs.get("mustRun", True) and not state.get("Running"):
            logs = api.logs(id_, tail=10).decode(errors="replace")[-1000:].strip()
            raise ProviderError(
                f"container {inputs['name']!r} exited right after start with code "
                f"{state.get('ExitCode')}" + (f"; its last output:\n{logs}" if logs else "")
            )
        if not inputs.get("wait"):
            return
        deadline = time.monotonic() + inputs.get("waitTimeout", 60)
        while True:
            state = api.inspect_container(id_)["State"]
            health = (state.get("Health") or {}).get("Status")
            if health in (None, "healthy") and state.get("Running"):
                return
            if not state.get("Running"):
                raise ProviderError(f"container {inputs['name']!r} stopped while waiting for it")
            if time.monotonic() > deadline:
                raise PropertyError(
                    "waitTimeout",
                    f"container {inputs['name']!r} not healthy after "
                    f"{inputs.get('waitTimeout', 60)}s (health: {health})",
                )
            time.sleep(0.1)

    # --- read ------------------------------------------------------------------------------

    def read(
        self, ctx: Context, id_: str, state: Props, inputs: Props
    ) -> tuple[Props, Props] | None:
        api = ctx.docker.api
        try:
            attrs: dict[str, Any] = api.inspect_container(id_)
        except docker.errors.NotFound:
            return None
        if (attrs.get("State") or {}).get("Status") in ("removing", "dead"):
            return None
        try:
            image_config = api.inspect_image(attrs["Image"]).get("Config") or {}
        except docker.errors.NotFound:
            image_config = {}
        actual = spec.from_inspect(attrs, image_config, inputs)
        actual = _name_networks_as_declared(actual, inputs)

        # Inputs: what was declared, as it is now; undeclared properties Docker fills in stay out.
        new_inputs = self.declared(actual, inputs)
        new_inputs.update({k: v for k, v in inputs.items() if k in PROVIDER_ONLY})
        new_inputs = spec.normalize(new_inputs)

        running = bool(attrs["State"].get("Running"))
        outputs: Props = {
            **inputs,
            **actual,
            "ports": _published_ports(attrs, actual.get("ports") or []),
            "networkDatas": _network_datas(attrs),
            "bridge": (attrs.get("NetworkSettings") or {}).get("Bridge", ""),
        }
        if not running:
            outputs["exitCode"] = attrs["State"].get("ExitCode", 0)
        if inputs.get("logs") and not running:
            outputs["containerLogs"] = api.logs(id_).decode(errors="replace")
        return outputs, new_inputs

    # --- update ----------------------------------------------------------------------------

    def update(self, ctx: Context, id_: str, olds: Props, news: Props) -> Props:
        api = ctx.docker.api
        memory = news.get("memory", 0)
        swap = news.get("memorySwap")
        if swap is None:
            # As at create: swap defaults to as much again as memory (or unlimited without a limit).
            swap = memory * 2 if memory else -1
        policy: dict[str, Any] = {"Name": news.get("restart", "no")}
        if policy["Name"] == "on-failure":
            policy["MaximumRetryCount"] = news.get("maxRetryCount", 0)
        try:
            api.update_container(
                id_,
                mem_limit=memory * spec.MB if memory else None,
                memswap_limit=swap if swap < 0 else swap * spec.MB,
                mem_reservation=news.get("memoryReservation", 0) * spec.MB or None,
                cpu_shares=news.get("cpuShares") or None,
                cpuset_cpus=news.get("cpuSet") or None,
                cpu_period=news.get("cpuPeriod") or None,
                cpu_quota=news.get("cpuQuota") or None,
                restart_policy=policy,
            )
            if news.get("start", True) and not api.inspect_container(id_)["State"]["Running"]:
                api.start(id_)
        except docker.errors.NotFound as exc:
            raise ProviderError(
                f"container {news.get('name')!r} no longer exists; run a refresh"
            ) from exc
        except docker.errors.APIError as exc:
            raise _blame(exc, news) from exc
        return self.read_back(ctx, id_, news, after="update")

    # --- delete ----------------------------------------------------------------------------

    def delete(self, ctx: Context, id_: str, state: Props) -> None:
        api = ctx.docker.api
        try:
            grace = state.get("destroyGraceSeconds")
            if grace:
                api.stop(id_, timeout=int(grace))
            api.remove_container(id_, force=True, v=state.get("removeVolumes", True))
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "already in progress" not in (exc.explanation or ""):
                raise
        # Removal in progress elsewhere (or auto-remove): wait until the container is gone.
        for _ in range(120):
            try:
                api.inspect_container(id_)
            except docker.errors.NotFound:
                return
            time.sleep(0.25)
        raise ProviderError(f"container {state.get('name')!r} is still being removed after 30s")


def _keep_assigned_ports(olds: Props, news: Props) -> Props:
    """A port declared without ``external`` keeps the host port Docker assigned it."""
    ports = news.get("ports")
    if not isinstance(ports, list) or contains_unknown(ports):
        return news
    assigned = {
        (p.get("internal"), p.get("protocol"), p.get("ip")): p.get("external")
        for p in olds.get("ports") or []
        if isinstance(p, dict)
    }
    filled = []
    for port in ports:
        key = (port.get("internal"), port.get("protocol"), port.get("ip"))
        if port.get("external") is None and assigned.get(key) is not None:
            port = {**port, "external": assigned[key]}
        filled.append(port)
    return {**news, "ports": filled}


def _name_networks_as_declared(actual: Props, inputs: Props) -> Props:
    """Docker reports networks by name; keep the program's spelling (a name or an id)."""
    declared = [
        n.get("name", "") for n in inputs.get("networksAdvanced") or [] if isinstance(n, dict)
    ]
    nets = []
    for net in actual.get("networksAdvanced") or []:
        net = dict(net)
        net_id = net.pop("id", "")
        for name in declared:
            if name and net_id and name != net["name"] and net_id.startswith(name):
                net["name"] = name
        nets.append(net)
    if nets:
        return spec.normalize({**actual, "networksAdvanced": nets})
    return actual


def _published_ports(attrs: dict[str, Any], ports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ports with the host port Docker picked for those declared without ``external``."""
    live = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    out = []
    for port in ports:
        if port.get("external") is None:
            bound = [
                b
                for b in live.get(spec.port_key(port)) or []
                if b.get("HostIp") in (port.get("ip"), "0.0.0.0", "")
            ]
            if bound and bound[0].get("HostPort"):
                port = {**port, "external": int(bound[0]["HostPort"])}
        out.append(port)
    return out


def _network_datas(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    datas = []
    for name, ep in ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).items():
        datas.append(
            {
                "networkName": name,
                "ipAddress": ep.get("IPAddress", ""),
                "ipPrefixLength": ep.get("IPPrefixLen", 0),
                "gateway": ep.get("Gateway", ""),
                "globalIpv6Address": ep.get("GlobalIPv6Address", ""),
                "globalIpv6PrefixLength": ep.get("GlobalIPv6PrefixLen", 0),
                "ipv6Gateway": ep.get("IPv6Gateway", ""),
                "macAddress": ep.get("MacAddress", ""),
            }
        )
    return datas


def _remove_quietly(ctx: Context, id_: str) -> None:
    with contextlib.suppress(docker.errors.APIError):
        ctx.docker.api.remove_container(id_, force=True, v=True)


def _blame(exc: docker.errors.APIError, inputs: Props) -> ProviderError:
    """Name the property a Docker error is about, from its message."""
    text = exc.explanation or str(exc)
    low = text.lower()
    rules = (
        ("port is already allocated", "ports"),
        ("address already in use", "ports"),
        ("bind for", "ports"),
        ("memory", "memory"),
        ("nanocpus", "cpus"),
        ("cpu", "cpus"),
        ("no such image", "image"),
        ("is already in use by container", "name"),
        ("conflict. the container name", "name"),
        ("invalid container name", "name"),
        ("network", "networksAdvanced"),
        ("mount", "mounts"),
        ("volume", "volumes"),
        ("capabilit", "capabilities"),
        ("ulimit", "ulimits"),
        ("restart", "restart"),
        ("tmpfs", "tmpfs"),
        ("sysctl", "sysctls"),
        ("user", "user"),
        ("executable file not found", "command"),
        ("no such file or directory", "command"),
    )
    for needle, prop in rules:
        if needle in low:
            return PropertyError(prop, text)
    return ProviderError(f"container {inputs.get('name')!r}: {text}")
