"""``docker:index/service:Service``: a Docker Swarm service, against a swarm manager.

Upstream's wire names (pulumi-docker 5.x) and semantics: only ``name``, ``mode`` and ``auth``
force a replacement; every other change is a ``docker service update`` in place (Swarm then
replaces the task's container when the task's spec changed; volumes stay on their node).

``convergeConfig`` (upstream's): create and update wait until the service's task runs — healthy,
where the image has a health check — for ``timeout`` at most. A task Swarm cannot place stays
pending: past the timeout the operation fails with Swarm's own reason ("no suitable node
(insufficient resources on 3 nodes)"); a task that fails (rejected, exited) fails it at once. A
create that fails removes the service again: nothing is left behind.

The label ``io.sandbox-engine.pids-limit`` on the container spec sets the task's process limit
(``Resources.Limits.Pids``, Docker API 1.41), as it does for ``Container``.

Read maps the service's spec back to wire names and keeps what the program declared: values
Docker fills in (its default restart policy, isolation, update config…) are no drift, and a
value changed behind Pulumi's back (a limit, an env var) is.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any

import docker.errors

from stacks.provider.container_spec import PIDS_LIMIT_LABEL, duration_ns, format_ns
from stacks.provider.errors import CheckFailures, PropertyError, ProviderError
from stacks.provider.resource import Context, Resource, labels_to_dict, labels_to_wire
from stacks.provider.schema import BOOL, INT, LABELS, STR, list_of, map_of, obj
from stacks.provider.wire import UNKNOWN, Props

MOUNT = obj(
    ("target", "type"),
    target=STR,
    type=STR,
    source=STR,
    readOnly=BOOL,
    bindOptions=obj(propagation=STR),
    volumeOptions=obj(noCopy=BOOL, labels=LABELS, driverName=STR, driverOptions=map_of(STR)),
    tmpfsOptions=obj(sizeBytes=INT, mode=INT),
)
CONTAINER = obj(
    ("image",),
    image=STR,
    commands=list_of(STR),
    args=list_of(STR),
    hostname=STR,
    env=map_of(STR),
    dir=STR,
    user=STR,
    groups=list_of(STR),
    labels=LABELS,
    readOnly=BOOL,
    init=BOOL,
    stopSignal=STR,
    stopGracePeriod=STR,
    capAdds=list_of(STR),
    capDrops=list_of(STR),
    sysctl=map_of(STR),
    hosts=list_of(obj(("host", "ip"), host=STR, ip=STR)),
    healthcheck=obj(
        ("tests",), tests=list_of(STR), interval=STR, timeout=STR, startPeriod=STR, retries=INT
    ),
    mounts=list_of(MOUNT),
)
RESOURCES = obj(nanoCpus=INT, memoryBytes=INT)
TASK = obj(
    ("containerSpec",),
    containerSpec=CONTAINER,
    resources=obj(limits=RESOURCES, reservation=RESOURCES),
    restartPolicy=obj(condition=STR, delay=STR, maxAttempts=INT, window=STR),
    placement=obj(constraints=list_of(STR), prefs=list_of(STR), maxReplicas=INT),
    # A network by ``id`` (upstream's current field) or ``name`` (its deprecated one).
    networksAdvanceds=list_of(obj(id=STR, name=STR, aliases=list_of(STR), driverOpts=list_of(STR))),
    forceUpdate=INT,
    runtime=STR,
    logDriver=obj(("name",), name=STR, options=map_of(STR)),
)
PORT = obj(
    ("targetPort",),
    name=STR,
    protocol=STR,
    targetPort=INT,
    publishedPort=INT,
    publishMode=STR,
)
MODE = obj(replicated=obj(replicas=INT))
MODE.fields["global"] = BOOL  # a keyword in Python
# A service labelled so keeps its task on the node it runs on (the project's convention, as
# the pids label): an update adds a constraint to that node (and HELD_LABEL naming it), read
# leaves both out. For tasks whose volumes are on their node (docs/provider.md).
STICKY_LABEL = "io.sandbox-engine.sticky"  # engine.model.spec.L_STICKY
HELD_LABEL = "io.sandbox-engine.held-to"
# Upstream properties this provider does not implement: named in a clear check failure.
UNSUPPORTED = ("rollbackConfig", "updateConfig")
CONDITIONS = ("none", "on-failure", "any")
# Task states past which a task never runs (Swarm's).
ENDED = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove"})
# Seconds a removed service's tasks are waited for (their containers hold the network).
REMOVAL_WAIT = 60.0


class Service(Resource):
    token = "docker:index/service:Service"
    inputs = obj(
        ("taskSpec",),
        name=STR,
        labels=LABELS,
        auth=obj(("serverAddress",), serverAddress=STR, username=STR, password=STR),
        mode=MODE,
        taskSpec=TASK,
        endpointSpec=obj(mode=STR, ports=list_of(PORT)),
        convergeConfig=obj(delay=STR, timeout=STR),
        rollbackConfig=obj(),
        updateConfig=obj(),
    )
    in_place = frozenset({"labels", "taskSpec", "endpointSpec", "convergeConfig"})

    # --- check -----------------------------------------------------------------------------

    delete_before_replace = True  # names are fixed: the old service must go first

    def check(self, news: Props, olds: Props, *, autoname: str | None) -> Props:
        unsupported = [(k, "is not supported by this provider") for k in UNSUPPORTED if k in news]
        if unsupported:
            raise CheckFailures(unsupported)
        return super().check(news, olds, autoname=autoname)

    def check_values(self, news: Props) -> list[tuple[str, str]]:
        failures: list[tuple[str, str]] = []
        task: dict[str, Any] = news["taskSpec"] if isinstance(news.get("taskSpec"), dict) else {}
        for path, value in _durations(news):
            if isinstance(value, str) and value != UNKNOWN:
                try:
                    duration_ns(value)
                except ValueError as exc:
                    failures.append((path, str(exc)))
        policy = task.get("restartPolicy") or {}
        condition = policy.get("condition")
        if condition not in (None, UNKNOWN, *CONDITIONS):
            failures.append(
                ("taskSpec.restartPolicy.condition", f"must be one of {', '.join(CONDITIONS)}")
            )
        mode = news.get("mode") or {}
        if mode.get("replicated") is not None and mode.get("global"):
            failures.append(("mode", "is replicated or global, not both"))
        endpoint = news.get("endpointSpec") or {}
        if endpoint.get("mode") not in (None, UNKNOWN, "vip", "dnsrr"):
            failures.append(("endpointSpec.mode", "must be vip or dnsrr"))
        for i, m in enumerate((task.get("containerSpec") or {}).get("mounts") or []):
            if isinstance(m, dict) and m.get("type") not in (
                None,
                UNKNOWN,
                "bind",
                "volume",
                "tmpfs",
            ):
                failures.append(
                    (f"taskSpec.containerSpec.mounts[{i}].type", "must be bind, volume or tmpfs")
                )
        return failures

    # --- create, read, update, delete --------------------------------------------------------

    def create(self, ctx: Context, inputs: Props) -> tuple[str, Props]:
        api = ctx.docker.api
        name = inputs["name"]
        try:
            created = api._post_json(api._url("/services/create"), data=to_spec(inputs))
            created = api._result(created, json=True)
        except docker.errors.APIError as exc:
            raise PropertyError(_blame(exc), exc.explanation or str(exc)) from exc
        id_ = str(created["ID"])
        try:
            self._converge(ctx, id_, inputs, since=None)
        except BaseException:
            with contextlib.suppress(docker.errors.DockerException):
                self._remove(ctx, id_)
            raise
        return id_, self.read_back(ctx, id_, inputs, after=f"create of service {name}")

    def read(
        self, ctx: Context, id_: str, state: Props, inputs: Props
    ) -> tuple[Props, Props] | None:
        try:
            attrs: dict[str, Any] = ctx.docker.api.inspect_service(id_)
        except docker.errors.NotFound:
            return None
        networks = _network_names(ctx, attrs)
        actual = from_spec(_unheld(attrs["Spec"]), networks)
        declared = inputs or state
        kept = _like(actual, {k: v for k, v in declared.items() if k != "convergeConfig"})
        if "convergeConfig" in declared:
            kept["convergeConfig"] = declared["convergeConfig"]
        return kept, kept

    def update(self, ctx: Context, id_: str, olds: Props, news: Props) -> Props:
        api = ctx.docker.api
        try:
            attrs = api.inspect_service(id_)
            version = attrs["Version"]["Index"]
            spec = to_spec(news)
            if spec["Labels"].get(STICKY_LABEL) == "true":
                _hold(spec, _node_of(api, id_))
            response = api._post_json(
                api._url("/services/{0}/update", id_), data=spec, params={"version": version}
            )
            api._raise_for_status(response)
        except docker.errors.NotFound as exc:
            raise ProviderError(f"service {news.get('name')!r} is gone") from exc
        except docker.errors.APIError as exc:
            raise PropertyError(_blame(exc), exc.explanation or str(exc)) from exc
        after = api.inspect_service(id_)
        changed = after["Spec"].get("TaskTemplate") != attrs["Spec"].get("TaskTemplate")
        self._converge(ctx, id_, news, since=after.get("UpdatedAt") if changed else None)
        return self.read_back(ctx, id_, news, after="update")

    def delete(self, ctx: Context, id_: str, state: Props) -> None:
        self._remove(ctx, id_)

    # --- helpers -------------------------------------------------------------------------

    def _remove(self, ctx: Context, id_: str) -> None:
        """Remove the service, then wait until its tasks are gone (their containers hold the
        network) — except those of nodes that are down, which go when the node is back."""
        api = ctx.docker.api
        try:
            api.remove_service(id_)
        except docker.errors.NotFound:
            return
        deadline = time.monotonic() + REMOVAL_WAIT
        while time.monotonic() < deadline:
            down = {n["ID"] for n in api.nodes() if n["Status"].get("State") != "ready"}
            left = [
                t for t in api.tasks() if t.get("ServiceID") == id_ and t.get("NodeID") not in down
            ]
            if not left:
                return
            time.sleep(0.3)
        raise ProviderError(
            f"the tasks of service {id_} were still there after {REMOVAL_WAIT:.0f} s"
        )

    def _converge(self, ctx: Context, id_: str, props: Props, *, since: str | None) -> None:
        """Wait for the task to run (convergeConfig), see the module docstring. ``since``: the
        task must have been made after this time (an update that replaced it)."""
        config = props.get("convergeConfig")
        if not isinstance(config, dict):
            return
        timeout = duration_ns(config.get("timeout") or "3m") / 1e9
        delay = min(max(duration_ns(config.get("delay") or "1s") / 1e9, 0.2), 5.0)
        wanted = ((props.get("mode") or {}).get("replicated") or {}).get("replicas", 1)
        if (props.get("mode") or {}).get("global") or wanted == 0:
            return
        after = _when(since) if since else None
        deadline = time.monotonic() + timeout
        why = "no task yet"
        api = ctx.docker.api
        while True:
            tasks = api.tasks(filters={"service": id_})
            current = [t for t in tasks if after is None or _when(t.get("CreatedAt")) >= after]
            running = [
                t
                for t in current
                if t.get("DesiredState") == "running" and t["Status"].get("State") == "running"
            ]
            if len(running) >= wanted:
                return
            for t in current:
                status = t.get("Status") or {}
                if status.get("State") in ("failed", "rejected"):
                    raise ProviderError(
                        f"its task {status['State']}: {status.get('Err') or status.get('Message')}"
                    )
                if t.get("DesiredState") == "running":
                    why = str(status.get("Err") or status.get("Message") or status.get("State"))
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"its task did not run within {format_ns(int(timeout * 1e9))}: {why}"
                )
            time.sleep(delay)


# --- wire ⇄ Docker's ServiceSpec ----------------------------------------------------------------


def to_spec(p: Props) -> dict[str, Any]:
    """The Docker API's ServiceSpec of the wire properties."""
    task = p["taskSpec"]
    c = task["containerSpec"]
    labels = labels_to_dict(c.get("labels"))
    container: dict[str, Any] = _drop_none(
        {
            "Image": c["image"],
            "Command": c.get("commands"),
            "Args": c.get("args"),
            "Hostname": c.get("hostname"),
            "Env": [f"{k}={v}" for k, v in sorted((c.get("env") or {}).items())] or None,
            "Dir": c.get("dir"),
            "User": c.get("user"),
            "Groups": c.get("groups"),
            "Labels": labels or None,
            "ReadOnly": c.get("readOnly"),
            "Init": c.get("init"),
            "StopSignal": c.get("stopSignal"),
            "StopGracePeriod": _ns(c.get("stopGracePeriod")),
            "CapabilityAdd": c.get("capAdds"),
            "CapabilityDrop": c.get("capDrops"),
            "Sysctls": c.get("sysctl"),
            "Hosts": [f"{h['ip']} {h['host']}" for h in c.get("hosts") or []] or None,
            "Healthcheck": _health(c.get("healthcheck")),
            "Mounts": [_mount(m) for m in c.get("mounts") or []] or None,
        }
    )
    template: dict[str, Any] = {"ContainerSpec": container}
    resources = task.get("resources") or {}
    limits = _drop_none(
        {
            "NanoCPUs": (resources.get("limits") or {}).get("nanoCpus"),
            "MemoryBytes": (resources.get("limits") or {}).get("memoryBytes"),
            "Pids": int(labels[PIDS_LIMIT_LABEL]) if PIDS_LIMIT_LABEL in labels else None,
        }
    )
    reservation = _drop_none(
        {
            "NanoCPUs": (resources.get("reservation") or {}).get("nanoCpus"),
            "MemoryBytes": (resources.get("reservation") or {}).get("memoryBytes"),
        }
    )
    if limits or reservation:
        template["Resources"] = _drop_none(
            {"Limits": limits or None, "Reservations": reservation or None}
        )
    policy = task.get("restartPolicy")
    if policy:
        template["RestartPolicy"] = _drop_none(
            {
                "Condition": policy.get("condition"),
                "Delay": _ns(policy.get("delay")),
                "MaxAttempts": policy.get("maxAttempts"),
                "Window": _ns(policy.get("window")),
            }
        )
    placement = task.get("placement")
    if placement:
        template["Placement"] = _drop_none(
            {
                "Constraints": placement.get("constraints"),
                "Preferences": [
                    {"Spread": {"SpreadDescriptor": s.removeprefix("spread=")}}
                    for s in placement.get("prefs") or []
                ]
                or None,
                "MaxReplicas": placement.get("maxReplicas"),
            }
        )
    if task.get("networksAdvanceds"):
        template["Networks"] = [
            _drop_none(
                {
                    "Target": n.get("id") or n.get("name"),
                    "Aliases": n.get("aliases"),
                    "DriverOpts": _opts(n.get("driverOpts")),
                }
            )
            for n in task["networksAdvanceds"]
        ]
    if task.get("forceUpdate") is not None:
        template["ForceUpdate"] = task["forceUpdate"]
    if task.get("runtime"):
        template["Runtime"] = task["runtime"]
    if task.get("logDriver"):
        template["LogDriver"] = _drop_none(
            {"Name": task["logDriver"]["name"], "Options": task["logDriver"].get("options")}
        )
    mode = p.get("mode") or {}
    spec: dict[str, Any] = {
        "Name": p["name"],
        "Labels": labels_to_dict(p.get("labels")),
        "TaskTemplate": template,
        "Mode": {"Global": {}}
        if mode.get("global")
        else {"Replicated": {"Replicas": (mode.get("replicated") or {}).get("replicas", 1)}},
    }
    endpoint = p.get("endpointSpec")
    if endpoint:
        spec["EndpointSpec"] = _drop_none(
            {
                "Mode": endpoint.get("mode"),
                "Ports": [
                    _drop_none(
                        {
                            "Name": x.get("name"),
                            "Protocol": x.get("protocol"),
                            "TargetPort": x["targetPort"],
                            "PublishedPort": x.get("publishedPort"),
                            "PublishMode": x.get("publishMode"),
                        }
                    )
                    for x in endpoint.get("ports") or []
                ]
                or None,
            }
        )
    return spec


def from_spec(spec: dict[str, Any], networks: dict[str, str]) -> Props:
    """The wire properties of a ServiceSpec as Docker returns it (``networks``: id → name)."""
    template = spec.get("TaskTemplate") or {}
    c = template.get("ContainerSpec") or {}
    resources = template.get("Resources") or {}
    container = _drop_none(
        {
            "image": c.get("Image"),
            "commands": c.get("Command"),
            "args": c.get("Args"),
            "hostname": c.get("Hostname"),
            "env": dict(e.split("=", 1) for e in c.get("Env") or []) or None,
            "dir": c.get("Dir"),
            "user": c.get("User"),
            "groups": c.get("Groups"),
            "labels": labels_to_wire(c.get("Labels") or {}) or None,
            "readOnly": c.get("ReadOnly"),
            "init": c.get("Init"),
            "stopSignal": c.get("StopSignal"),
            "stopGracePeriod": _dur(c.get("StopGracePeriod")),
            "capAdds": c.get("CapabilityAdd"),
            "capDrops": c.get("CapabilityDrop"),
            "sysctl": c.get("Sysctls"),
            "hosts": [
                {"host": h.split()[1], "ip": h.split()[0]} for h in c.get("Hosts") or [] if " " in h
            ]
            or None,
            "healthcheck": _unhealth(c.get("Healthcheck")),
            "mounts": [_unmount(m) for m in c.get("Mounts") or []] or None,
        }
    )
    task: Props = {"containerSpec": container}
    limits, reservation = resources.get("Limits") or {}, resources.get("Reservations") or {}
    res = _drop_none(
        {
            "limits": _drop_none(
                {"nanoCpus": limits.get("NanoCPUs"), "memoryBytes": limits.get("MemoryBytes")}
            )
            or None,
            "reservation": _drop_none(
                {
                    "nanoCpus": reservation.get("NanoCPUs"),
                    "memoryBytes": reservation.get("MemoryBytes"),
                }
            )
            or None,
        }
    )
    if res:
        task["resources"] = res
    policy = template.get("RestartPolicy")
    if policy:
        task["restartPolicy"] = _drop_none(
            {
                "condition": policy.get("Condition"),
                "delay": _dur(policy.get("Delay")),
                "maxAttempts": policy.get("MaxAttempts"),
                "window": _dur(policy.get("Window")),
            }
        )
    placement = template.get("Placement") or {}
    placed = _drop_none(
        {
            "constraints": placement.get("Constraints"),
            "prefs": [
                "spread=" + p["Spread"]["SpreadDescriptor"]
                for p in placement.get("Preferences") or []
                if "Spread" in p
            ]
            or None,
            "maxReplicas": placement.get("MaxReplicas"),
        }
    )
    if placed:
        task["placement"] = placed
    if template.get("Networks"):
        task["networksAdvanceds"] = [
            _drop_none(
                {
                    "id": n["Target"],
                    "name": networks.get(n["Target"], n["Target"]),
                    "aliases": n.get("Aliases"),
                    "driverOpts": [f"{k}={v}" for k, v in (n.get("DriverOpts") or {}).items()]
                    or None,
                }
            )
            for n in template["Networks"]
        ]
    if template.get("ForceUpdate"):
        task["forceUpdate"] = template["ForceUpdate"]
    if template.get("Runtime"):
        task["runtime"] = template["Runtime"]
    if template.get("LogDriver"):
        task["logDriver"] = _drop_none(
            {
                "name": template["LogDriver"].get("Name"),
                "options": template["LogDriver"].get("Options"),
            }
        )
    mode = spec.get("Mode") or {}
    props: Props = {
        "name": spec.get("Name"),
        "taskSpec": task,
        "mode": {"global": True}
        if "Global" in mode
        else {"replicated": {"replicas": (mode.get("Replicated") or {}).get("Replicas", 1)}},
    }
    if spec.get("Labels"):
        props["labels"] = labels_to_wire(spec["Labels"])
    endpoint = spec.get("EndpointSpec") or {}
    if endpoint:
        props["endpointSpec"] = _drop_none(
            {
                "mode": endpoint.get("Mode"),
                "ports": [
                    _drop_none(
                        {
                            "name": x.get("Name"),
                            "protocol": x.get("Protocol"),
                            "targetPort": x.get("TargetPort"),
                            "publishedPort": x.get("PublishedPort"),
                            "publishMode": x.get("PublishMode"),
                        }
                    )
                    for x in endpoint.get("Ports") or []
                ]
                or None,
            }
        )
    return props


def _like(actual: Any, declared: Any) -> Any:
    """``actual`` cut to the shape of ``declared``: map keys the program did not declare are
    Docker's (defaults it filled in) and left out; a duration spelled another way (1m, 60s)
    is the declared spelling; lists are compared item by item."""
    if isinstance(declared, dict) and isinstance(actual, dict):
        return {k: _like(actual[k], v) for k, v in declared.items() if k in actual}
    if isinstance(declared, list) and isinstance(actual, list) and len(declared) == len(actual):
        return [_like(a, d) for a, d in zip(actual, declared, strict=True)]
    if isinstance(declared, str) and isinstance(actual, str) and declared != actual:
        with contextlib.suppress(ValueError):
            if duration_ns(declared) == duration_ns(actual):
                return declared
    if isinstance(declared, bool) and actual is None:
        return declared
    return actual


def _durations(p: Props) -> list[tuple[str, Any]]:
    task: dict[str, Any] = p["taskSpec"] if isinstance(p.get("taskSpec"), dict) else {}
    c: dict[str, Any] = task["containerSpec"] if isinstance(task.get("containerSpec"), dict) else {}
    found: list[tuple[str, Any]] = [
        ("taskSpec.containerSpec.stopGracePeriod", c.get("stopGracePeriod"))
    ]
    for key in ("interval", "timeout", "startPeriod"):
        found.append(
            (f"taskSpec.containerSpec.healthcheck.{key}", (c.get("healthcheck") or {}).get(key))
        )
    for key in ("delay", "window"):
        found.append((f"taskSpec.restartPolicy.{key}", (task.get("restartPolicy") or {}).get(key)))
    for key in ("delay", "timeout"):
        found.append((f"convergeConfig.{key}", (p.get("convergeConfig") or {}).get(key)))
    return found


def _ns(value: str | None) -> int | None:
    return duration_ns(value) if value else None


def _dur(value: int | None) -> str | None:
    return format_ns(int(value)) if value else None


def _opts(pairs: list[str] | None) -> dict[str, str] | None:
    return dict(p.split("=", 1) for p in pairs) if pairs else None


def _health(h: dict[str, Any] | None) -> dict[str, Any] | None:
    if not h:
        return None
    return _drop_none(
        {
            "Test": h.get("tests"),
            "Interval": _ns(h.get("interval")),
            "Timeout": _ns(h.get("timeout")),
            "StartPeriod": _ns(h.get("startPeriod")),
            "Retries": h.get("retries"),
        }
    )


def _unhealth(h: dict[str, Any] | None) -> dict[str, Any] | None:
    if not h:
        return None
    return _drop_none(
        {
            "tests": h.get("Test"),
            "interval": _dur(h.get("Interval")),
            "timeout": _dur(h.get("Timeout")),
            "startPeriod": _dur(h.get("StartPeriod")),
            "retries": h.get("Retries"),
        }
    )


def _mount(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = _drop_none(
        {
            "Target": m["target"],
            "Type": m["type"],
            "Source": m.get("source"),
            "ReadOnly": m.get("readOnly"),
        }
    )
    volume = m.get("volumeOptions")
    if volume:
        driver = _drop_none(
            {"Name": volume.get("driverName"), "Options": volume.get("driverOptions")}
        )
        out["VolumeOptions"] = _drop_none(
            {
                "NoCopy": volume.get("noCopy"),
                "Labels": labels_to_dict(volume.get("labels")) or None,
                "DriverConfig": driver or None,
            }
        )
    if m.get("tmpfsOptions"):
        t = m["tmpfsOptions"]
        out["TmpfsOptions"] = _drop_none({"SizeBytes": t.get("sizeBytes"), "Mode": t.get("mode")})
    if m.get("bindOptions"):
        out["BindOptions"] = _drop_none({"Propagation": m["bindOptions"].get("propagation")})
    return out


def _unmount(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = _drop_none(
        {
            "target": m.get("Target"),
            "type": m.get("Type"),
            "source": m.get("Source"),
            "readOnly": m.get("ReadOnly"),
        }
    )
    volume = m.get("VolumeOptions")
    if volume:
        driver = volume.get("DriverConfig") or {}
        out["volumeOptions"] = _drop_none(
            {
                "noCopy": volume.get("NoCopy"),
                "labels": labels_to_wire(volume.get("Labels") or {}) or None,
                "driverName": driver.get("Name"),
                "driverOptions": driver.get("Options"),
            }
        )
    if m.get("TmpfsOptions"):
        t = m["TmpfsOptions"]
        out["tmpfsOptions"] = _drop_none({"sizeBytes": t.get("SizeBytes"), "mode": t.get("Mode")})
    if m.get("BindOptions"):
        out["bindOptions"] = _drop_none({"propagation": m["BindOptions"].get("Propagation")})
    return out


def _node_of(api: Any, id_: str) -> str | None:
    """The node of the service's newest task (running or not: its volumes are there)."""
    tasks = [t for t in api.tasks(filters={"service": id_}) if t.get("NodeID")]
    newest = max(tasks, key=lambda t: t.get("Version", {}).get("Index", 0), default=None)
    return str(newest["NodeID"]) if newest else None


def _hold(spec: dict[str, Any], node: str | None) -> None:
    """Keep the task on ``node`` (STICKY_LABEL)."""
    if not node:
        return
    placement = spec["TaskTemplate"].setdefault("Placement", {})
    placement["Constraints"] = [*(placement.get("Constraints") or []), f"node.id=={node}"]
    spec["Labels"][HELD_LABEL] = node


def _unheld(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without what ``_hold`` added (the program never declares it)."""
    labels = dict(spec.get("Labels") or {})
    node = labels.pop(HELD_LABEL, None)
    if node is None:
        return spec
    template = dict(spec.get("TaskTemplate") or {})
    placement = dict(template.get("Placement") or {})
    constraints = [c for c in placement.get("Constraints") or [] if c != f"node.id=={node}"]
    if constraints:
        placement["Constraints"] = constraints
    else:
        placement.pop("Constraints", None)
    if placement:
        template["Placement"] = placement
    else:
        template.pop("Placement", None)
    return {**spec, "Labels": labels, "TaskTemplate": template}


def _network_names(ctx: Context, attrs: dict[str, Any]) -> dict[str, str]:
    """Network id → name for the service's networks (Docker keeps ids in the spec)."""
    found: dict[str, str] = {}
    for n in (attrs["Spec"].get("TaskTemplate") or {}).get("Networks") or []:
        with contextlib.suppress(docker.errors.NotFound):
            found[n["Target"]] = ctx.docker.api.inspect_network(n["Target"])["Name"]
    return found


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _when(text: str | None) -> datetime:
    """Docker's RFC 3339 time with nanoseconds, as a datetime (microseconds kept)."""
    if not text:
        return datetime.min
    head, _, rest = text.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{head}.{fraction}")


def _blame(exc: docker.errors.APIError) -> str:
    text = (exc.explanation or "").lower()
    if "name" in text and ("conflict" in text or "exists" in text):
        return "name"
    if "network" in text:
        return "taskSpec.networksAdvanceds"
    if "mount" in text:
        return "taskSpec.containerSpec.mounts"
    if "image" in text:
        return "taskSpec.containerSpec.image"
    return "taskSpec"
