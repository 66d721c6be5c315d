"""Pure mapping for ``docker:index/container:Container``.

- ``normalize`` puts inputs in one canonical form (defaults dropped, lists sorted, units
  canonical), so what the program declares and what ``docker inspect`` reads back compare equal;
- ``to_engine_config`` turns inputs into the Docker Engine API's create body;
- ``from_inspect`` turns ``docker inspect`` (and the image's own config) back into inputs.

Sizes on the wire are in MB (memory, memorySwap, memoryReservation, shmSize) as upstream.
"""

from __future__ import annotations

import re
from typing import Any

from stacks.provider.resource import labels_to_dict, labels_to_wire
from stacks.provider.wire import UNKNOWN, Props

MB = 1024 * 1024
# pulumi-docker has no pids limit property; this label on a container sets one (HostConfig
# PidsLimit). A label is an upstream property, so the program still runs on the upstream
# provider, which only records the label.
PIDS_LIMIT_LABEL = "io.sandbox-engine.pids-limit"
# Booleans and numbers whose default means "unset": dropped by normalize.
_DEFAULTS: dict[str, Any] = {
    "start": True,
    "mustRun": True,
    "removeVolumes": True,
    "wait": False,
    "waitTimeout": 60,
    "attach": False,
    "logs": False,
    "rm": False,
    "tty": False,
    "stdinOpen": False,
    "readOnly": False,
    "privileged": False,
    "publishAllPorts": False,
    "memory": 0,
    "memorySwap": 0,
    "memoryReservation": 0,
    "cpuShares": 0,
    "cpuPeriod": 0,
    "cpuQuota": 0,
    "shmSize": 0,
    "maxRetryCount": 0,
    "restart": "no",
}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)$")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def duration_ns(text: str) -> int:
    """Go-style duration ("30s", "1m30s", "500ms") to nanoseconds; ValueError when malformed."""
    total, rest = 0, text
    if not rest:
        raise ValueError("empty duration")
    while rest:
        match = re.match(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", rest)
        if not match:
            raise ValueError(f"{text!r} is not a duration like 30s, 1m or 500ms")
        total += int(float(match.group(1)) * _UNIT_NS[match.group(2)])
        rest = rest[match.end() :]
    return total


def format_ns(ns: int) -> str:
    if ns % 10**9 == 0:
        return f"{ns // 10**9}s"
    if ns % 10**6 == 0:
        return f"{ns // 10**6}ms"
    return f"{ns}ns"


def canonical_cpus(value: str) -> str:
    """ "2.0" and "2" are the same limit; keep one spelling. ValueError when not a number."""
    cpus = float(value)
    if cpus <= 0:
        raise ValueError("must be a positive number of CPUs")
    return f"{cpus:g}"


def _known(value: Any) -> bool:
    return value is not None and value != UNKNOWN


def normalize(inputs: Props) -> Props:
    """Canonical inputs. Unknown values are kept as they are."""
    out: Props = {}
    for key, value in inputs.items():
        if value is None or (key in _DEFAULTS and value == _DEFAULTS[key]):
            continue
        out[key] = value
    if _known(out.get("cpus")):
        out["cpus"] = canonical_cpus(out["cpus"])
    if isinstance(out.get("ports"), list):
        ports = [
            {
                "internal": p["internal"],
                "ip": p.get("ip") or "0.0.0.0",
                "protocol": p.get("protocol") or "tcp",
                **({"external": p["external"]} if p.get("external") is not None else {}),
            }
            if isinstance(p, dict) and _known(p.get("internal"))
            else p
            for p in out["ports"]
        ]
        out["ports"] = sorted(ports, key=lambda p: (str(p.get("internal")), str(p.get("protocol"))))
    if isinstance(out.get("labels"), list) and all(isinstance(x, dict) for x in out["labels"]):
        out["labels"] = sorted(out["labels"], key=lambda x: str(x.get("label")))
    if isinstance(out.get("volumes"), list):
        out["volumes"] = sorted(
            (
                {k: v for k, v in vol.items() if not (k == "readOnly" and v is False)}
                for vol in out["volumes"]
            ),
            key=lambda v: str(v.get("containerPath")),
        )
    if isinstance(out.get("mounts"), list):
        out["mounts"] = sorted(
            (
                {k: v for k, v in m.items() if not (k == "readOnly" and v is False)}
                for m in out["mounts"]
            ),
            key=lambda m: str(m.get("target")),
        )
    if isinstance(out.get("networksAdvanced"), list):
        nets = [
            {**n, "aliases": sorted(n["aliases"])}
            if isinstance(n.get("aliases"), list) and n["aliases"]
            else {k: v for k, v in n.items() if k != "aliases"}
            for n in out["networksAdvanced"]
        ]
        # Sorted, so the first (the one the container is created on) is the same every time.
        out["networksAdvanced"] = sorted(nets, key=lambda n: str(n.get("name")))
    caps = out.get("capabilities")
    if isinstance(caps, dict):
        caps = {k: sorted(v) for k, v in caps.items() if v}
        if caps:
            out["capabilities"] = caps
        else:
            del out["capabilities"]
    if isinstance(out.get("ulimits"), list):
        out["ulimits"] = sorted(out["ulimits"], key=lambda u: str(u.get("name")))
    health = out.get("healthcheck")
    if isinstance(health, dict):
        out["healthcheck"] = {
            k: format_ns(duration_ns(v)) if k in _HEALTH_DURATIONS and _known(v) else v
            for k, v in health.items()
            if v not in (None, 0, "0s", "")
        }
    for key in [k for k, v in out.items() if v == [] or v == {}]:
        del out[key]
    return out


_HEALTH_DURATIONS = {
    "interval": "Interval",
    "timeout": "Timeout",
    "startPeriod": "StartPeriod",
    "startInterval": "StartInterval",
}


# Wire name -> Engine API name, for properties copied as they are; one table serves both
# directions (to_engine_config and from_inspect).
CONFIG_FIELDS = {
    "hostname": "Hostname",
    "domainname": "Domainname",
    "user": "User",
    "workingDir": "WorkingDir",
    "tty": "Tty",
    "stdinOpen": "OpenStdin",
    "stopSignal": "StopSignal",
    "stopTimeout": "StopTimeout",
}
HOST_FIELDS = {
    "cpuShares": "CpuShares",
    "cpuSet": "CpusetCpus",
    "cpuPeriod": "CpuPeriod",
    "cpuQuota": "CpuQuota",
    "securityOpts": "SecurityOpt",
    "readOnly": "ReadonlyRootfs",
    "privileged": "Privileged",
    "init": "Init",
    "tmpfs": "Tmpfs",
    "sysctls": "Sysctls",
    "dns": "Dns",
    "dnsOpts": "DnsOptions",
    "dnsSearches": "DnsSearch",
    "groupAdds": "GroupAdd",
    "ipcMode": "IpcMode",
    "pidMode": "PidMode",
    "runtime": "Runtime",
    "storageOpts": "StorageOpt",
    "usernsMode": "UsernsMode",
    "cgroupnsMode": "CgroupnsMode",
    "publishAllPorts": "PublishAllPorts",
    "rm": "AutoRemove",
}
# Sizes in MB on the wire, bytes in the API.
HOST_SIZES_MB = {"memory": "Memory", "memoryReservation": "MemoryReservation", "shmSize": "ShmSize"}


def port_key(port: dict[str, Any]) -> str:
    return f"{port['internal']}/{port.get('protocol', 'tcp')}"


def network_mode(inputs: Props) -> str:
    if inputs.get("networkMode"):
        return str(inputs["networkMode"])
    nets = inputs.get("networksAdvanced") or []
    return str(nets[0]["name"]) if nets else "bridge"


def _endpoint(net: dict[str, Any]) -> dict[str, Any]:
    endpoint: dict[str, Any] = {}
    if net.get("aliases"):
        endpoint["Aliases"] = list(net["aliases"])
    ipam = {
        k: v
        for k, v in (
            ("IPv4Address", net.get("ipv4Address")),
            ("IPv6Address", net.get("ipv6Address")),
        )
        if v
    }
    if ipam:
        endpoint["IPAMConfig"] = ipam
    if net.get("macAddress"):
        endpoint["MacAddress"] = net["macAddress"]
    if net.get("driverOpts"):
        endpoint["DriverOpts"] = dict(o.split("=", 1) for o in net["driverOpts"])
    return endpoint


def to_engine_config(inputs: Props) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The create body, and the networks to connect after create (the API takes one at create)."""
    host: dict[str, Any] = {"NetworkMode": network_mode(inputs)}
    config: dict[str, Any] = {"Image": inputs["image"], "HostConfig": host}

    simple = {"command": "Cmd", "entrypoints": "Entrypoint", "envs": "Env", **CONFIG_FIELDS}
    for wire, api in simple.items():
        if wire in inputs:
            config[api] = inputs[wire]
    if inputs.get("stdinOpen"):
        config["AttachStdin"] = False
    config["Labels"] = labels_to_dict(inputs.get("labels"))
    pids = config["Labels"].get(PIDS_LIMIT_LABEL, "")
    if pids.isdigit():
        host["PidsLimit"] = int(pids)

    if "healthcheck" in inputs:
        hc = inputs["healthcheck"]
        health: dict[str, Any] = {"Test": hc.get("tests", [])}
        for wire, api in _HEALTH_DURATIONS.items():
            if hc.get(wire):
                health[api] = duration_ns(hc[wire])
        if hc.get("retries"):
            health["Retries"] = hc["retries"]
        config["Healthcheck"] = health

    for wire, api in HOST_SIZES_MB.items():
        if wire in inputs:
            host[api] = inputs[wire] * MB
    if "memorySwap" in inputs:
        swap = inputs["memorySwap"]
        host["MemorySwap"] = swap if swap < 0 else swap * MB
    if "cpus" in inputs:
        host["NanoCpus"] = int(float(inputs["cpus"]) * 1e9)
    for wire, api in HOST_FIELDS.items():
        if wire in inputs:
            host[api] = inputs[wire]
    if "capabilities" in inputs:
        host["CapAdd"] = inputs["capabilities"].get("adds")
        host["CapDrop"] = inputs["capabilities"].get("drops")
    restart = inputs.get("restart", "no")
    host["RestartPolicy"] = {"Name": restart}
    if restart == "on-failure":
        host["RestartPolicy"]["MaximumRetryCount"] = inputs.get("maxRetryCount", 0)
    if "ulimits" in inputs:
        host["Ulimits"] = [
            {"Name": u["name"], "Soft": u["soft"], "Hard": u["hard"]} for u in inputs["ulimits"]
        ]
    if "logDriver" in inputs or "logOpts" in inputs:
        host["LogConfig"] = {
            "Type": inputs.get("logDriver", "json-file"),
            "Config": inputs.get("logOpts", {}),
        }
    if "hosts" in inputs:
        host["ExtraHosts"] = [f"{h['host']}:{h['ip']}" for h in inputs["hosts"]]

    if "ports" in inputs:
        config["ExposedPorts"] = {port_key(p): {} for p in inputs["ports"]}
        bindings: dict[str, list[dict[str, str]]] = {}
        for p in inputs["ports"]:
            bindings.setdefault(port_key(p), []).append(
                {"HostIp": p.get("ip", ""), "HostPort": str(p.get("external") or "")}
            )
        host["PortBindings"] = bindings

    binds, volumes_from = [], []
    for vol in inputs.get("volumes", []):
        if vol.get("fromContainer"):
            volumes_from.append(vol["fromContainer"])
            continue
        source = vol.get("hostPath") or vol.get("volumeName")
        bind = f"{source}:{vol['containerPath']}" if source else vol["containerPath"]
        opts = [
            o for o in ("ro" if vol.get("readOnly") else "", vol.get("selinuxRelabel", "")) if o
        ]
        binds.append(bind + (":" + ",".join(opts) if opts else ""))
    if binds:
        host["Binds"] = binds
    if volumes_from:
        host["VolumesFrom"] = volumes_from
    if "mounts" in inputs:
        host["Mounts"] = [_mount(m) for m in inputs["mounts"]]

    nets = list(inputs.get("networksAdvanced", []))
    if nets and not inputs.get("networkMode"):
        config["NetworkingConfig"] = {"EndpointsConfig": {nets[0]["name"]: _endpoint(nets[0])}}
        nets = nets[1:]
    return config, [{"name": n["name"], **_endpoint(n)} for n in nets]


def _mount(m: dict[str, Any]) -> dict[str, Any]:
    mount: dict[str, Any] = {"Target": m["target"], "Type": m["type"]}
    if m.get("source"):
        mount["Source"] = m["source"]
    if m.get("readOnly"):
        mount["ReadOnly"] = True
    if m.get("bindOptions"):
        mount["BindOptions"] = {"Propagation": m["bindOptions"].get("propagation")}
    if m.get("volumeOptions"):
        vo = m["volumeOptions"]
        mount["VolumeOptions"] = {
            "NoCopy": bool(vo.get("noCopy")),
            "Labels": labels_to_dict(vo.get("labels")),
            **(
                {
                    "DriverConfig": {
                        "Name": vo.get("driverName"),
                        "Options": vo.get("driverOptions", {}),
                    }
                }
                if vo.get("driverName")
                else {}
            ),
        }
    if m.get("tmpfsOptions"):
        to = m["tmpfsOptions"]
        mount["TmpfsOptions"] = {
            k: v
            for k, v in (("SizeBytes", to.get("sizeBytes")), ("Mode", to.get("mode")))
            if v is not None
        }
    return mount


def _unmount(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"target": m["Target"], "type": m["Type"]}
    if m.get("Source"):
        out["source"] = m["Source"]
    if m.get("ReadOnly"):
        out["readOnly"] = True
    if (m.get("BindOptions") or {}).get("Propagation"):
        out["bindOptions"] = {"propagation": m["BindOptions"]["Propagation"]}
    vo = m.get("VolumeOptions")
    if vo:
        opts: dict[str, Any] = {}
        if vo.get("NoCopy"):
            opts["noCopy"] = True
        if vo.get("Labels"):
            opts["labels"] = labels_to_wire(vo["Labels"])
        if (vo.get("DriverConfig") or {}).get("Name"):
            opts["driverName"] = vo["DriverConfig"]["Name"]
            if vo["DriverConfig"].get("Options"):
                opts["driverOptions"] = vo["DriverConfig"]["Options"]
        if opts:
            out["volumeOptions"] = opts
    to = m.get("TmpfsOptions")
    if to:
        out["tmpfsOptions"] = {
            k: to[a]
            for k, a in (("sizeBytes", "SizeBytes"), ("mode", "Mode"))
            if to.get(a) is not None
        }
    return out


def from_inspect(
    attrs: dict[str, Any], image_config: dict[str, Any], declared: Props | None = None
) -> Props:
    """Inputs as Docker reports them, normalized. What the image or the daemon adds by itself
    (image env and labels, the implicit network aliases) is left out unless it was declared."""
    declared = declared or {}
    cfg = attrs.get("Config") or {}
    host = attrs.get("HostConfig") or {}
    out: Props = {"name": attrs["Name"].lstrip("/"), "image": cfg.get("Image")}

    image_env = set(image_config.get("Env") or [])
    wanted_env = [e for e in declared.get("envs") or [] if isinstance(e, str)]
    actual_env = cfg.get("Env") or []
    envs = [e for e in wanted_env if e in actual_env]
    envs += [e for e in actual_env if e not in image_env and e not in envs]
    if envs:
        out["envs"] = envs
    image_labels = image_config.get("Labels") or {}
    wanted_labels = {x.get("label") for x in declared.get("labels") or [] if isinstance(x, dict)}
    labels = {
        k: v
        for k, v in (cfg.get("Labels") or {}).items()
        if image_labels.get(k) != v or k in wanted_labels
    }
    if labels:
        out["labels"] = labels_to_wire(labels)
    out["command"] = cfg.get("Cmd") or []
    out["entrypoints"] = cfg.get("Entrypoint") or []
    for wire, api in CONFIG_FIELDS.items():
        if cfg.get(api):
            out[wire] = cfg[api]
    health = cfg.get("Healthcheck")
    if health and health != image_config.get("Healthcheck"):
        hc: dict[str, Any] = {"tests": health.get("Test", [])}
        for wire, api in _HEALTH_DURATIONS.items():
            if health.get(api):
                hc[wire] = format_ns(health[api])
        if health.get("Retries"):
            hc["retries"] = health["Retries"]
        out["healthcheck"] = hc

    for wire, api in HOST_SIZES_MB.items():
        if host.get(api):
            out[wire] = host[api] // MB
    if host.get("MemorySwap"):
        swap = host["MemorySwap"]
        out["memorySwap"] = swap if swap < 0 else swap // MB
    if host.get("NanoCpus"):
        out["cpus"] = f"{host['NanoCpus'] / 1e9:g}"
    for wire, api in HOST_FIELDS.items():
        if host.get(api):
            out[wire] = host[api]
    caps = {k: v for k, v in (("adds", host.get("CapAdd")), ("drops", host.get("CapDrop"))) if v}
    if caps:
        out["capabilities"] = caps
    policy = host.get("RestartPolicy") or {}
    if policy.get("Name"):
        out["restart"] = policy["Name"]
    if policy.get("MaximumRetryCount"):
        out["maxRetryCount"] = policy["MaximumRetryCount"]
    if host.get("Ulimits"):
        out["ulimits"] = [
            {"name": u["Name"], "soft": u["Soft"], "hard": u["Hard"]} for u in host["Ulimits"]
        ]
    log = host.get("LogConfig") or {}
    if log.get("Type"):
        out["logDriver"] = log["Type"]
    if log.get("Config"):
        out["logOpts"] = log["Config"]
    if host.get("ExtraHosts"):
        out["hosts"] = [
            dict(zip(("host", "ip"), h.split(":", 1), strict=True)) for h in host["ExtraHosts"]
        ]
    if host.get("NetworkMode"):
        out["networkMode"] = host["NetworkMode"]

    ports = []
    for key, bindings in (host.get("PortBindings") or {}).items():
        internal, _, protocol = key.partition("/")
        for b in bindings or [{}]:
            port: dict[str, Any] = {
                "internal": int(internal),
                "protocol": protocol or "tcp",
                "ip": b.get("HostIp") or "0.0.0.0",
            }
            if b.get("HostPort"):
                port["external"] = int(b["HostPort"])
            ports.append(port)
    if ports:
        out["ports"] = ports

    volumes = []
    for bind in host.get("Binds") or []:
        parts = bind.split(":")
        vol: dict[str, Any] = {"containerPath": parts[1] if len(parts) > 1 else parts[0]}
        if len(parts) > 1:
            vol["hostPath" if parts[0].startswith("/") else "volumeName"] = parts[0]
        opts = parts[2].split(",") if len(parts) > 2 else []
        if "ro" in opts:
            vol["readOnly"] = True
        relabel = [o for o in opts if o in ("z", "Z")]
        if relabel:
            vol["selinuxRelabel"] = relabel[0]
        volumes.append(vol)
    volumes += [{"fromContainer": c} for c in host.get("VolumesFrom") or []]
    if volumes:
        out["volumes"] = volumes
    if host.get("Mounts"):
        out["mounts"] = [_unmount(m) for m in host["Mounts"]]

    implicit = {attrs.get("Id", "")[:12], cfg.get("Hostname")}
    wanted_aliases = {
        a
        for n in declared.get("networksAdvanced") or []
        if isinstance(n, dict)
        for a in n.get("aliases") or []
    }
    nets = []
    for name, endpoint in ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).items():
        if name == host.get("NetworkMode") and name in ("bridge", "default", "host", "none"):
            continue  # the daemon's own network, chosen by networkMode, not networksAdvanced
        net: dict[str, Any] = {"name": name, "id": endpoint.get("NetworkID", "")}
        aliases = [
            a for a in endpoint.get("Aliases") or [] if a not in implicit or a in wanted_aliases
        ]
        if aliases:
            net["aliases"] = aliases
        ipam = endpoint.get("IPAMConfig") or {}
        if ipam.get("IPv4Address"):
            net["ipv4Address"] = ipam["IPv4Address"]
        if ipam.get("IPv6Address"):
            net["ipv6Address"] = ipam["IPv6Address"]
        nets.append(net)
    if nets:
        out["networksAdvanced"] = nets
    return normalize(out)
