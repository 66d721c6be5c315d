"""The backend on one dockerd (engine/backend/__init__.py): today's, and the one the local
setup and the compose file run.

A client per call, with a timeout: calls come from many threads (stack operations, archives,
terminals) and a client is cheap. Docker's errors become the seam's: ``ContainerGone`` for a
404 on a container, ``BackendError`` for the rest.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import docker.types

from engine.backend import BackendError, ContainerGone, Interactive, Place, Ran, Stream
from engine.errors import StackError
from engine.model.spec import (
    BRIDGE_NAME_OPTION,
    L_ENGINE,
    L_MANAGED,
    L_SANDBOX,
    MANAGED_BY,
    bridge_name,
)

log = logging.getLogger("sandbox_engine.backend")
# Seconds one Docker call may take (an exec that streams has no bound: its command has one).
TIMEOUT = 60

# Shows a message on every tmux client of the workspace (the browser terminals), for 15 s.
_TMUX_NOTICE = (
    'for c in $(tmux list-clients -F "#{client_name}" 2>/dev/null); do'
    ' tmux display-message -d 15000 -c "$c" "$1"; done'
)


Connect = Callable[[float | None], docker.DockerClient]


def from_env(timeout: float | None) -> docker.DockerClient:
    return docker.from_env(timeout=timeout)


class DockerBackend:
    """``Backend`` on one dockerd: the host's (``DOCKER_HOST``, or its local socket), or
    ``connect``'s (a Swarm node's, engine/backend/swarm.py)."""

    def __init__(self, connect: Connect = from_env) -> None:
        self.connect = connect

    def _client(self, timeout: float | None = TIMEOUT) -> docker.DockerClient:
        try:
            return self.connect(timeout)
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker is not reachable: {exc}") from exc

    @contextlib.contextmanager
    def _api(self, container: str = "", timeout: float | None = TIMEOUT) -> Iterator[Any]:
        """A client's low-level API, with Docker's errors translated."""
        client = self._client(timeout)
        try:
            yield client.api
        except docker.errors.NotFound as exc:
            if container:
                raise ContainerGone(f"the container {container} is gone") from exc
            raise BackendError(f"Docker: {exc.explanation}") from exc
        except docker.errors.DockerException as exc:
            why = getattr(exc, "explanation", None) or exc
            raise BackendError(f"Docker: {why}") from exc
        finally:
            client.close()

    def ping(self) -> None:
        with self._api(timeout=3) as api:
            api.ping()

    def runtimes(self) -> list[str]:
        with self._api(timeout=10) as api:
            return sorted(api.info().get("Runtimes") or {})

    def host_address(self) -> str:
        with self._api(timeout=10) as api:
            configs = (api.inspect_network("bridge").get("IPAM") or {}).get("Config") or []
        return bridge_gateway(configs)

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
        with self._api(container) as api:
            exec_id = api.exec_create(
                container, argv, user=user or "", workdir=workdir, environment=environment
            )["Id"]
            output = api.exec_start(exec_id)
            code = api.exec_inspect(exec_id)["ExitCode"]
        return Ran(int(code if code is not None else -1), output or b"")

    def stream(
        self,
        container: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        environment: dict[str, str] | None = None,
    ) -> Stream:
        # No timeout on the stream itself: the command bounds its own time (timeout(1)).
        client = self._client(timeout=None)
        try:
            exec_id = client.api.exec_create(
                container, argv, user=user, workdir=workdir, environment=environment
            )["Id"]
            chunks = client.api.exec_start(exec_id, stream=True)
        except docker.errors.NotFound as exc:
            client.close()
            raise ContainerGone(f"the container {container} is gone") from exc
        except docker.errors.DockerException as exc:
            client.close()
            raise BackendError(f"Docker: {exc}") from exc

        def read() -> Iterator[bytes]:
            try:
                yield from chunks
            finally:
                client.close()

        return Stream(read(), exec_id, self)

    def exit_code(self, exec_id: str) -> int:
        with self._api() as api:
            code = api.exec_inspect(exec_id)["ExitCode"]
        return int(code if code is not None else -1)

    def interactive(
        self,
        container: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        environment: dict[str, str],
    ) -> Interactive:
        # The client stays open as long as the socket: the socket is its connection.
        client = self._client(timeout=30)
        try:
            exec_id: str = client.api.exec_create(
                container,
                argv,
                stdin=True,
                tty=True,
                user=user,
                workdir=workdir,
                environment=environment,
            )["Id"]
            raw = client.api.exec_start(exec_id, tty=True, socket=True)
        except docker.errors.NotFound as exc:
            client.close()
            raise ContainerGone(f"the container {container} is gone") from exc
        except docker.errors.DockerException as exc:
            client.close()
            why = getattr(exc, "explanation", None) or exc
            raise BackendError(f"Docker: {why}") from exc
        sock: socket.socket = getattr(raw, "_sock", raw)
        return Interactive(exec_id, sock, client.close)

    def resize(self, exec_id: str, *, cols: int, rows: int) -> None:
        with self._api() as api:
            api.exec_resize(exec_id, height=rows, width=cols)

    # --- files ---------------------------------------------------------------------------

    def put_files(self, container: str, path: str, tar: bytes) -> None:
        with self._api(container) as api:
            if not api.put_archive(container, path, tar):
                raise BackendError(f"copying into {path} of {container} failed")

    def get_files(self, container: str, path: str, *, chunk_size: int) -> Iterator[bytes] | None:
        client = self._client()
        try:
            client.api.inspect_container(container)
        except docker.errors.NotFound as exc:
            client.close()
            raise ContainerGone(f"the container {container} is gone") from exc
        try:
            stream, _ = client.api.get_archive(container, path, chunk_size=chunk_size)
        except docker.errors.NotFound:
            client.close()
            return None

        def read() -> Iterator[bytes]:
            try:
                yield from stream
            finally:
                client.close()

        return read()

    def read_volume_file(self, volume: str, image: str, name: str, limit: int) -> bytes | None:
        client = self._client()
        try:
            try:
                client.volumes.get(volume)
            except docker.errors.NotFound:
                return None
            holder = client.api.create_container(
                image,
                command=["true"],
                host_config=client.api.create_host_config(
                    mounts=[docker.types.Mount("/v", volume, type="volume", read_only=True)],
                    network_mode="none",
                ),
                # The engine's, but no sandbox's: never mistaken for a sandbox's container.
                labels={L_MANAGED: MANAGED_BY, "io.sandbox-engine.role": "volume-reader"},
            )
            try:
                stream, stat = client.api.get_archive(holder["Id"], f"/v/{name}")
                if stat.get("size", 0) > limit:
                    return None  # too big: not read (a link or a folder is refused below)
                data = b"".join(stream)
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    member = tar.next()
                    if member is None or not member.isfile():
                        return None
                    extracted = tar.extractfile(member)
                    return extracted.read(limit) if extracted else None
            except docker.errors.NotFound:
                return None
            finally:
                client.api.remove_container(holder["Id"], force=True)
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker: {exc}") from exc
        finally:
            client.close()

    # --- what a container is ---------------------------------------------------------------

    def inspect(self, container: str) -> dict[str, Any]:
        with self._api(container) as api:
            attrs: dict[str, Any] = api.inspect_container(container)
        return attrs

    def user_of(self, container: str) -> str:
        return str((self.inspect(container).get("Config") or {}).get("User") or "root")

    def place(self, container: str, network: str) -> Place:
        return place(self.inspect(container), network)

    def notify(self, container: str, message: str) -> bool:
        try:
            ran = self.run(
                container,
                ["sh", "-c", _TMUX_NOTICE, "sh", message.replace("#", "##")],
                user=self.user_of(container),
            )
        except BackendError as exc:
            log.info("no terminal notice for %s: %s", container, exc)
            return False
        return ran.exit_code == 0

    # --- a sandbox's objects ---------------------------------------------------------------

    def objects(self, sandbox_id: str) -> list[str]:
        with _translated():
            return labelled_objects(sandbox_id, self.connect)

    def remove(self, sandbox_id: str, *, containers_only: bool = False) -> list[str]:
        with _translated():
            return remove_labelled(
                sandbox_id, containers_only=containers_only, connect=self.connect
            )

    def forget(self, sandbox_id: str) -> list[str]:
        return []  # the stack holds every object of the sandbox

    def states(self, engine: str) -> dict[str, dict[str, str]]:
        with _translated():
            return container_states(engine, self.connect)

    def engine_objects(self, engine: str) -> dict[str, list[str]]:
        with _translated():
            return engine_objects(engine, self.connect)

    def prepare_edge(self, name: str, subnet: str) -> None:
        with _translated():
            ensure_edge_network(name, subnet)

    def publish(self, network: str) -> None:
        pass  # the workspace is on the shared edge network: the stack's doing

    def unpublish(self, sandbox_id: str) -> None:
        pass


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Docker's errors as the seam's (a daemon that does not answer, a refusal)."""
    try:
        yield
    except docker.errors.APIError as exc:
        raise BackendError(f"Docker answered {exc.status_code}: {exc.explanation}") from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"Docker is not reachable: {exc}") from exc


def bridge_gateway(configs: list[dict[str, Any]]) -> str:
    """The host's address on Docker's default bridge, from the network's IPAM config. A dockerd
    that made ``docker0`` itself (a first start, from its address pools) records the subnet
    alone: the bridge driver then gives the host the subnet's first address."""
    found = next((c["Gateway"] for c in configs if c.get("Gateway")), "")
    if found:
        return str(found)
    for c in configs:
        with contextlib.suppress(KeyError, ValueError):
            network = ipaddress.ip_network(c["Subnet"], strict=False)
            if network.version == 4:
                return str(next(network.hosts()))
    raise BackendError("Docker's default bridge has no gateway address")


def place(attrs: dict[str, Any], network: str) -> Place:
    """From a container's inspect attributes and the name of its sandbox's own network."""
    nets = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    addresses = tuple(sorted({n["IPAddress"] for n in nets.values() if n and n.get("IPAddress")}))
    own = nets.get(network) or {}
    host = own.get("Gateway") or next((n.get("Gateway") for n in nets.values() if n), "") or ""
    return Place(addresses, host)


def remove_labelled(
    sandbox_id: str, *, containers_only: bool = False, connect: Connect = from_env
) -> list[str]:
    """Remove every container, network and volume labelled with this sandbox (in that order:
    what uses an object goes first). Returns what was removed."""
    selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
    removed: list[str] = []
    client = connect(60)
    try:
        for container in client.containers.list(all=True, filters=selector):
            remove_container(client, container.id or container.name)
            removed.append(f"container {container.name}")
        if containers_only:
            return removed
        for network in client.networks.list(filters=selector):
            network.remove()
            removed.append(f"network {network.name}")
        for volume in client.volumes.list(filters=selector):
            volume.remove(force=True)
            removed.append(f"volume {volume.name}")
    finally:
        client.close()
    return removed


# Seconds a container Docker is already removing (another request started it: a destroy cut
# short, say) is waited for.
REMOVAL_WAIT = 60.0


def remove_container(client: docker.DockerClient, ident: str) -> None:
    """Remove a container with its anonymous volumes; gone already is success, and one that
    Docker is already removing is waited for until it is gone."""
    try:
        client.api.remove_container(ident, v=True, force=True)
        return
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc.explanation):
            raise
    deadline = time.monotonic() + REMOVAL_WAIT
    while time.monotonic() < deadline:
        try:
            client.api.inspect_container(ident)
        except docker.errors.NotFound:
            return
        time.sleep(0.2)
    raise StackError(f"Docker was still removing container {ident} after {REMOVAL_WAIT:.0f} s")


def network_subnets(attrs: dict[str, Any]) -> list[str]:
    """The subnets of a Docker network, from its inspect attributes."""
    return [str(c.get("Subnet")) for c in (attrs.get("IPAM") or {}).get("Config") or []]


def ensure_edge_network(name: str, subnet: str = "") -> None:
    """The shared network Traefik reaches published workspaces on; made once, never part of a
    stack. Inter-container communication is off on it: a workspace on it reaches no other
    workspace (Traefik, on the host or in the host's network namespace, reaches them all). Its
    bridge is named like a sandbox's, so the host firewall covers it too. ``subnet`` (empty:
    Docker's pool chooses) bounds how many published sandboxes it holds; an unused network
    of another subnet is made again, a used one is kept (with a warning) until it is free."""
    options = {
        "com.docker.network.bridge.enable_icc": "false",
        BRIDGE_NAME_OPTION: bridge_name(name),
    }
    ipam = (
        docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
        if subnet
        else None
    )
    client = docker.from_env(timeout=30)
    try:
        for _ in range(2):
            try:
                network = client.networks.get(name)
            except docker.errors.NotFound:
                # Two creates racing to make it: the loser's 409 is fine, the network exists.
                with contextlib.suppress(docker.errors.APIError):
                    client.networks.create(
                        name,
                        driver="bridge",
                        options=options,
                        ipam=ipam,
                        labels={L_MANAGED: MANAGED_BY, "io.sandbox-engine.shared": "true"},
                        check_duplicate=True,
                    )
                network = client.networks.get(name)
            have = network.attrs.get("Options") or {}
            subnets = network_subnets(network.attrs)
            isolated = all(have.get(k) == v for k, v in options.items())
            if isolated and (not subnet or subnet in subnets):
                return
            if network.attrs.get("Containers"):
                if isolated:  # usable, only smaller or elsewhere than asked: kept while in use
                    log.warning(
                        "network %s has subnet %s, not %s; it is made again once no sandbox"
                        " uses it",
                        name,
                        ", ".join(subnets),
                        subnet,
                    )
                    return
                raise StackError(
                    f"network {name} exists without {options} and has containers; remove it "
                    "(docker network rm) once they are gone so the engine can make it isolated"
                )
            # Made by an older engine or by hand, and unused: make it again the right way.
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()
        raise StackError(f"network {name} could not be made with {options} and subnet {subnet}")
    finally:
        client.close()


def labelled_objects(sandbox_id: str, connect: Connect = from_env) -> list[str]:
    """Every container, network and volume still labelled with this sandbox ("container x")."""
    selector = {"label": f"{L_SANDBOX}={sandbox_id}"}
    client = connect(60)
    try:
        return [
            *(f"container {c.name}" for c in client.containers.list(all=True, filters=selector)),
            *(f"network {n.name}" for n in client.networks.list(filters=selector)),
            *(f"volume {v.name}" for v in client.volumes.list(filters=selector)),
        ]
    finally:
        client.close()


def engine_objects(instance: str, connect: Connect = from_env) -> dict[str, list[str]]:
    """Every container, network and volume labelled with this engine instance, by sandbox."""
    found: dict[str, list[str]] = {}
    selector = {"label": [f"{L_ENGINE}={instance}", L_SANDBOX]}
    client = connect(60)
    try:
        for kind, items in (
            ("container", client.containers.list(all=True, filters=selector)),
            ("network", client.networks.list(filters=selector)),
            ("volume", client.volumes.list(filters=selector)),
        ):
            for item in items:
                labels = item.attrs.get("Labels") or item.attrs.get("Config", {}).get("Labels")
                sid = (labels or {}).get(L_SANDBOX)
                if sid:
                    found.setdefault(sid, []).append(f"{kind} {item.name}")
    finally:
        client.close()
    return found


def container_states(instance: str, connect: Connect = from_env) -> dict[str, dict[str, str]]:
    """Sandbox id → container name → Docker state (running, exited, restarting, removing…) of
    every container this engine instance made: one Docker call for all sandboxes (the list
    itself, no inspect per container)."""
    client = connect(60)
    try:
        found: dict[str, dict[str, str]] = {}
        for c in client.containers.list(
            all=True, sparse=True, filters={"label": [f"{L_ENGINE}={instance}", L_SANDBOX]}
        ):
            sid = (c.attrs.get("Labels") or {}).get(L_SANDBOX)
            names = c.attrs.get("Names") or []
            if sid and names:
                found.setdefault(sid, {})[names[0].lstrip("/")] = str(c.attrs.get("State"))
        return found
    finally:
        client.close()
