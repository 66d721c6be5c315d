"""The backend on a Docker Swarm cluster (``SANDBOX_BACKEND=swarm``, docs/cluster.md).

Pulumi declares a sandbox's services through the manager; Swarm's scheduler places their
tasks. Swarm has no API to run a command in a task's container from the manager (moby#27552),
so everything else finds the task first — its container and node, from the manager — and then
talks to that node's own Docker API, over mutual TLS (the cluster's CA checks the node, the
node checks the engine's certificate), with ``DockerBackend``'s calls.

Names the lifecycle passes are the spec's container names, which are the service names here
(``sbx-<id>-workspace``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
import docker.tls
import requests

from engine.backend import (
    DRAINED,
    NODE_LOST,
    BackendError,
    ContainerGone,
    Interactive,
    Place,
    Ran,
    Stream,
)
from engine.backend.docker import Connect, DockerBackend, engine_objects, labelled_objects
from engine.model.spec import L_ENGINE, L_SANDBOX

# A node's Docker API that does not answer (a node lost since the manager last heard from it):
# requests' own errors reach us where the Docker SDK does not wrap them (its list calls).
UNANSWERED = (BackendError, docker.errors.DockerException, requests.exceptions.RequestException)
log = logging.getLogger("sandbox_engine.backend.swarm")
TIMEOUT = 60
# The Docker API version spoken to the nodes (Docker 20.10's; later daemons answer it too): a
# fixed one, so that a client is made without a request (asking the version first would go
# through the environment's CA bundle, not the cluster's).
API_VERSION = "1.41"
# Seconds a removed service's task containers are waited for (its network is busy until then).
REMOVAL_WAIT = 60.0
# Task states on their way to running (Swarm's), shown as Docker's "restarting" (healthy for the
# recovery: Swarm is bringing it up).
COMING = frozenset({"new", "pending", "assigned", "accepted", "preparing", "ready", "starting"})


class SwarmBackend:
    """``Backend`` on a Swarm: the manager for the cluster's objects, each node for its own."""

    def __init__(
        self,
        manager: str,
        tls_dir: Path,
        *,
        node_port: int = 2376,
        engine_address: str = "",
        edge: str = "",
    ) -> None:
        self.manager_url = manager
        self.edge = edge  # the swarm edge's container on the manager (SANDBOX_SWARM_EDGE)
        self.tls_dir = Path(tls_dir)
        self.node_port = node_port
        self._engine_address = engine_address
        self.manager = DockerBackend(self.connect_to(manager))
        self._nodes: dict[str, DockerBackend] = {}
        self._addresses: dict[str, str] = {}
        # exec id → the node it runs on (its exit code and resizes are asked there).
        self._execs: OrderedDict[str, DockerBackend] = OrderedDict()
        self._lock = threading.Lock()

    # --- connections -----------------------------------------------------------------------

    def tls(self) -> docker.tls.TLSConfig:
        d = self.tls_dir
        return docker.tls.TLSConfig(
            client_cert=(str(d / "cert.pem"), str(d / "key.pem")),
            ca_cert=str(d / "ca.pem"),
            verify=True,
        )

    def connect_to(self, url: str) -> Connect:
        def connect(timeout: float | None) -> docker.DockerClient:
            client = docker.DockerClient(
                base_url=url, tls=self.tls(), timeout=timeout or None, version=API_VERSION
            )
            # Not the environment's CA bundle (REQUESTS_CA_BUNDLE would replace the cluster's
            # CA in requests) nor its proxies: the cluster's CA, straight to the node.
            client.api.trust_env = False
            return client

        return connect

    @contextlib.contextmanager
    def _swarm(self, timeout: float = TIMEOUT) -> Iterator[Any]:
        """The manager's low-level API, Docker's errors as the seam's."""
        try:
            client = self.manager.connect(timeout)
        except docker.errors.DockerException as exc:
            raise BackendError(f"the Swarm manager is not reachable: {exc}") from exc
        try:
            yield client.api
        except docker.errors.APIError as exc:
            raise BackendError(f"Swarm answered {exc.status_code}: {exc.explanation}") from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"the Swarm manager is not reachable: {exc}") from exc
        finally:
            client.close()

    def node(self, node_id: str) -> DockerBackend:
        """The node's own Docker API (TLS), at the address it joined the swarm with."""
        with self._lock:
            found = self._nodes.get(node_id)
        if found is not None:
            return found
        with self._swarm(10) as api:
            attrs = api.inspect_node(node_id)
        address = (attrs.get("Status") or {}).get("Addr") or ""
        if not address or address == "0.0.0.0":  # noqa: S104 (Docker's "unknown")
            raise BackendError(f"node {node_id} has no address in the swarm")
        backend = DockerBackend(self.connect_to(f"tcp://{address}:{self.node_port}"))
        with self._lock:
            self._nodes[node_id] = backend
            self._addresses[node_id] = address
        return backend

    def nodes(self) -> list[dict[str, Any]]:
        """Every node as the manager sees it (Docker's node documents)."""
        with self._swarm(10) as api:
            return list(api.nodes())

    def locate(self, service: str) -> tuple[DockerBackend, str, str]:
        """The node backend, container id and node id of the service's running task."""
        with self._swarm(10) as api:
            try:
                tasks = api.tasks(filters={"service": service, "desired-state": "running"})
            except docker.errors.NotFound as exc:
                raise ContainerGone(f"the service {service} is gone") from exc
        tasks = [t for t in tasks if (t.get("Spec") or {}).get("ContainerSpec") is not None]
        running = [t for t in tasks if (t.get("Status") or {}).get("State") == "running"]
        for task in sorted(running, key=lambda t: t.get("Version", {}).get("Index", 0)):
            cid = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
            if cid and task.get("NodeID"):
                return self.node(task["NodeID"]), cid, task["NodeID"]
        why = next(
            (
                t["Status"].get("Err") or t["Status"].get("Message")
                for t in tasks
                if t.get("Status")
            ),
            "",
        )
        raise ContainerGone(
            f"the service {service} has no running task" + (f" ({why})" if why else "")
        )

    def manager_service(self, name: str) -> dict[str, Any]:
        """The service's document, as the manager has it."""
        with self._swarm(10) as api:
            found: dict[str, Any] = api.inspect_service(name)
        return found

    def node_of(self, service: str) -> str:
        """The hostname of the node that runs the service's task."""
        _, _, node_id = self.locate(service)
        with self._swarm(10) as api:
            return str(api.inspect_node(node_id)["Description"]["Hostname"])

    def _remember(self, exec_id: str, backend: DockerBackend) -> None:
        with self._lock:
            self._execs[exec_id] = backend
            while len(self._execs) > 10_000:
                self._execs.popitem(last=False)

    def _exec_node(self, exec_id: str) -> DockerBackend:
        with self._lock:
            found = self._execs.get(exec_id)
        if found is None:
            raise BackendError(f"exec {exec_id} is not known to this engine")
        return found

    # --- the daemon -----------------------------------------------------------------------

    def ping(self) -> None:
        with self._swarm(3) as api:
            api.ping()

    def runtimes(self) -> list[str]:
        """The runtimes every ready node has."""
        have: set[str] | None = None
        for node in self._ready_nodes():
            with contextlib.suppress(BackendError):
                found = set(node.runtimes())
                have = found if have is None else have & found
        return sorted(have or {"runc"})

    def host_address(self) -> str:
        """The engine's host as the nodes' containers reach it: SANDBOX_SWARM_ENGINE_ADDRESS,
        or this host's own address on its route to the manager."""
        if not self._engine_address:
            host = urlsplit(self.manager_url.replace("tcp://", "http://")).hostname or ""
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, 9))  # no packet is sent: the kernel picks the route
                self._engine_address = str(probe.getsockname()[0])
        return self._engine_address

    # --- running things ------------------------------------------------------------------

    def run(
        self,
        container: str,
        argv: list[str],
        *,
        user: str | None = None,
        workdir: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> Ran:
        node, cid, _ = self.locate(container)
        return node.run(cid, argv, user=user, workdir=workdir, environment=environment)

    def stream(
        self,
        container: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        environment: dict[str, str] | None = None,
    ) -> Stream:
        node, cid, _ = self.locate(container)
        found = node.stream(cid, argv, user=user, workdir=workdir, environment=environment)
        self._remember(found.exec_id, node)
        return Stream(found.chunks, found.exec_id, self)

    def exit_code(self, exec_id: str) -> int:
        return self._exec_node(exec_id).exit_code(exec_id)

    def interactive(
        self,
        container: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        environment: dict[str, str],
    ) -> Interactive:
        node, cid, _ = self.locate(container)
        found = node.interactive(cid, argv, user=user, workdir=workdir, environment=environment)
        self._remember(found.exec_id, node)
        return found

    def resize(self, exec_id: str, *, cols: int, rows: int) -> None:
        self._exec_node(exec_id).resize(exec_id, cols=cols, rows=rows)

    # --- files ---------------------------------------------------------------------------

    def put_files(self, container: str, path: str, tar: bytes) -> None:
        node, cid, _ = self.locate(container)
        node.put_files(cid, path, tar)

    def get_files(self, container: str, path: str, *, chunk_size: int) -> Iterator[bytes] | None:
        node, cid, _ = self.locate(container)
        return node.get_files(cid, path, chunk_size=chunk_size)

    def read_volume_file(self, volume: str, image: str, name: str, limit: int) -> bytes | None:
        # The operator's volumes (Claude Code's saved login) are the manager node's.
        return self.manager.read_volume_file(volume, image, name, limit)

    # --- what a container is ---------------------------------------------------------------

    def inspect(self, container: str) -> dict[str, Any]:
        node, cid, _ = self.locate(container)
        return node.inspect(cid)

    def user_of(self, container: str) -> str:
        node, cid, _ = self.locate(container)
        return node.user_of(cid)

    def place(self, container: str, network: str) -> Place:
        """Its address on its overlay and its node's: a task's connection to the engine's
        host leaves through the node's ``docker_gwbridge``, whose NAT gives it the node's
        address (the one it joined the swarm with), so that is the peer the AI gateway sees.
        A token is thereby bound to its sandbox's node, not to the sandbox alone
        (docs/cluster.md)."""
        node, cid, node_id = self.locate(container)
        nets = (node.inspect(cid).get("NetworkSettings") or {}).get("Networks") or {}
        own = nets.get(network) or {}
        addresses = {own["IPAddress"]} if own.get("IPAddress") else set()
        with self._lock:
            addresses.add(self._addresses[node_id])
        return Place(tuple(sorted(addresses)), self.host_address())

    def notify(self, container: str, message: str) -> bool:
        try:
            node, cid, _ = self.locate(container)
        except BackendError as exc:
            log.info("no terminal notice for %s: %s", container, exc)
            return False
        return node.notify(cid, message)

    # --- a sandbox's objects ---------------------------------------------------------------

    def _ready_nodes(self) -> list[DockerBackend]:
        found = []
        for n in self.nodes():
            if (n.get("Status") or {}).get("State") == "ready":
                with contextlib.suppress(BackendError):
                    found.append(self.node(n["ID"]))
        return found

    def objects(self, sandbox_id: str) -> list[str]:
        selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
        with self._swarm() as api:
            found = [f"service {s['Spec']['Name']}" for s in api.services(filters=selector)]
            found += [f"network {n['Name']}" for n in api.networks(filters=selector)]
        for node in self._ready_nodes():
            with contextlib.suppress(*UNANSWERED):
                found += [
                    o
                    for o in labelled_objects(sandbox_id, node.connect)
                    if not o.startswith("network ")  # the overlay, listed once above
                ]
        return found

    def remove(self, sandbox_id: str, *, containers_only: bool = False) -> list[str]:
        """Services first (their tasks' containers go with them), then the overlay, then the
        volumes on every node that has them."""
        selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
        removed: list[str] = []
        with self._swarm() as api:
            services = api.services(filters=selector)
            for s in services:
                with contextlib.suppress(docker.errors.NotFound):
                    api.remove_service(s["ID"])
                removed.append(f"service {s['Spec']['Name']}")
            deadline = time.monotonic() + REMOVAL_WAIT
            while services and time.monotonic() < deadline:
                if not _tasks_of(api, [x["ID"] for x in services]):
                    break
                time.sleep(0.5)
        nodes = self._ready_nodes()
        for node in nodes:  # containers a lost task left behind on a node
            try:
                removed += node.remove(sandbox_id, containers_only=True)
            except UNANSWERED as exc:  # gone since the manager last heard from it
                log.info("a node does not answer; what it holds of %s waits: %s", sandbox_id, exc)
        if containers_only:
            return removed
        self.unpublish(sandbox_id)  # the edge on the overlay would keep it
        with self._swarm() as api:
            for n in api.networks(filters=selector):
                for _ in range(20):  # busy until the last task's endpoint is released
                    try:
                        api.remove_network(n["Id"])
                        break
                    except docker.errors.NotFound:
                        break
                    except docker.errors.APIError:
                        time.sleep(0.5)
                removed.append(f"network {n['Name']}")
        for node in nodes:
            try:
                removed += [o for o in node.remove(sandbox_id) if not o.startswith("network ")]
            except UNANSWERED as exc:  # its volumes wait for the orphan sweep once it is back
                log.info("a node does not answer; what it holds of %s waits: %s", sandbox_id, exc)
        return removed

    def forget(self, sandbox_id: str) -> list[str]:
        """The volumes Docker made on the nodes for the services' mounts (no stack holds
        them), and anything a lost node's task left."""
        return self.remove(sandbox_id)

    def states(self, engine: str) -> dict[str, dict[str, str]]:
        """Sandbox id → service name → state: its newest task's (Docker's words where they
        exist: running; restarting while Swarm brings it up), or ``node-lost`` when the node
        that holds it is down (``node-lost:<hostname>``) or drained by the operator
        (``node-lost:<hostname> (drained)``: Swarm stopped its task there and, its restart
        policy being ``none``, started none elsewhere)."""
        with self._swarm() as api:
            services = api.services(filters={"label": [f"{L_ENGINE}={engine}", L_SANDBOX]})
            if not services:
                return {}
            down: dict[str, str] = {}
            for n in api.nodes():
                host = n["Description"]["Hostname"]
                if (n.get("Status") or {}).get("State") != "ready":
                    down[n["ID"]] = host
                elif (n.get("Spec") or {}).get("Availability") == "drain":
                    down[n["ID"]] = f"{host}{DRAINED}"
            tasks = _tasks_of(api, [x["ID"] for x in services])
        newest: dict[str, dict[str, Any]] = {}
        for t in tasks:
            sid = t.get("ServiceID", "")
            if _index(t) >= _index(newest.get(sid)):
                newest[sid] = t
        found: dict[str, dict[str, str]] = {}
        for s in services:
            labels = s["Spec"].get("Labels") or {}
            task = newest.get(s["ID"])
            state = "missing"
            if task is not None:
                state = str((task.get("Status") or {}).get("State") or "missing")
                if task.get("NodeID") in down:
                    state = f"{NODE_LOST}{down[task['NodeID']]}"
                elif state in COMING:
                    state = "restarting"
            found.setdefault(labels.get(L_SANDBOX, ""), {})[s["Spec"]["Name"]] = state
        found.pop("", None)
        return found

    def engine_objects(self, engine: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        selector = {"label": [f"{L_ENGINE}={engine}", L_SANDBOX]}
        with self._swarm() as api:
            for s in api.services(filters=selector):
                sid = (s["Spec"].get("Labels") or {}).get(L_SANDBOX)
                if sid:
                    found.setdefault(sid, []).append(f"service {s['Spec']['Name']}")
            for n in api.networks(filters=selector):
                sid = (n.get("Labels") or {}).get(L_SANDBOX)
                if sid:
                    found.setdefault(sid, []).append(f"network {n['Name']}")
        for node in self._ready_nodes():
            with contextlib.suppress(*UNANSWERED):
                for sid, objects in engine_objects(engine, node.connect).items():
                    found.setdefault(sid, []).extend(
                        o for o in objects if not o.startswith("network ")
                    )
        return found

    def prepare_edge(self, name: str, subnet: str) -> None:
        if not self.edge:
            raise BackendError("no swarm edge is set (SANDBOX_SWARM_EDGE): docs/cluster.md")

    def publish(self, network: str) -> None:
        """The swarm's edge (a Traefik container on the manager) joins the sandbox's overlay:
        its swarm provider reaches the workspace's task there, and only there."""
        try:
            with self._swarm(30) as api:
                api.connect_container_to_network(self.edge, network)
        except BackendError as exc:
            if "already exists" not in str(exc):  # joined before (a repair)
                raise BackendError(
                    f"the swarm edge {self.edge} could not join {network}: {exc}"
                ) from exc

    def unpublish(self, sandbox_id: str) -> None:
        if not self.edge:
            return
        with self._swarm(30) as api:
            networks = api.networks(filters={"label": f"{L_SANDBOX}={sandbox_id}"})
            for n in networks:
                try:
                    api.disconnect_container_from_network(self.edge, n["Id"], force=True)
                except docker.errors.APIError as exc:
                    # Not connected (a sandbox without public ports), or the network is gone.
                    if exc.status_code != 404 and "not connected" not in str(exc.explanation):
                        raise


def _index(task: dict[str, Any] | None) -> int:
    """A task's version in the manager's store: the newest task of a service has the highest."""
    return int(((task or {}).get("Version") or {}).get("Index", -1))


def _tasks_of(api: Any, services: list[str]) -> list[dict[str, Any]]:
    """The tasks of these services (ids); one removed meanwhile has none (the manager answers
    404 for a filter naming it, so each is then asked on its own)."""
    if not services:
        return []
    try:
        return list(api.tasks(filters={"service": services}))
    except docker.errors.NotFound:
        found: list[dict[str, Any]] = []
        for service in services:
            with contextlib.suppress(docker.errors.NotFound):
                found += api.tasks(filters={"service": service})
        return found
