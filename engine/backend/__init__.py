"""The backend seam: what the engine does to a sandbox's containers that Pulumi does not.

Pulumi declares a sandbox (its networks, volumes, containers) through its stack; everything
else — running a command in a container (a task's steps, a git summary, a terminal's shell),
copying files in (a task, Claude Code's settings) and out (an archive), inspecting a
container, listing and removing what is labelled with a sandbox, a line on its terminals —
goes through one ``Backend``. ``DockerBackend`` (engine/backend/docker.py) is today's, for one
dockerd; a Swarm backend finds a task's container and its node first and then does the same on
that node, beside it, without the lifecycle above knowing which it talks to.

Errors are the engine's: ``ContainerGone`` for a container that does not exist (any more),
``BackendError`` for anything else the backend could not do (its daemon unreachable, say).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.settings import Settings

# A container's state in ``Backend.states`` when the node that holds it is gone (a swarm):
# ``node-lost:<hostname>``, or ``node-lost:<hostname> (drained)`` when the operator drained it.
NODE_LOST = "node-lost:"
DRAINED = " (drained)"


class BackendError(EngineError):
    """The backend could not do what was asked (its daemon unreachable, a refusal)."""


class ContainerGone(BackendError):
    """The container does not exist (any more)."""


@dataclass(frozen=True)
class Ran:
    """A command run to its end: its exit code and its output (stdout and stderr together)."""

    exit_code: int
    output: bytes

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


@dataclass(frozen=True)
class Place:
    """Where a workspace is on its networks: its own addresses, and the address at which it
    reaches the host (the AI gateway) on its own network."""

    addresses: tuple[str, ...]
    host: str


@dataclass(frozen=True)
class Stream:
    """A command whose output is read as it comes (``chunks``); ``exit_code()`` once read."""

    chunks: Iterator[bytes]
    exec_id: str
    backend: Backend

    def exit_code(self) -> int:
        return self.backend.exit_code(self.exec_id)


@dataclass(frozen=True)
class Interactive:
    """An interactive command with a TTY (a terminal): its id, its socket (both ways), and
    what to call once the socket is closed (the connection it came on)."""

    exec_id: str
    sock: socket.socket
    release: Callable[[], None]


class Backend(Protocol):
    """What the lifecycle, the hiring features, the terminal and the AI setup ask of a
    sandbox's containers (module docstring). Every call blocks: run them in a thread."""

    def runtimes(self) -> list[str]:
        """The container runtimes the daemon has (runc, and runsc where registered)."""

    def ping(self) -> None:
        """Raise BackendError unless the backend answers."""

    def host_address(self) -> str:
        """An address of the host every container can reach it at (Docker's default
        bridge's gateway)."""

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
        """Run ``argv`` to its end."""

    def stream(
        self,
        container: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        environment: dict[str, str] | None = None,
    ) -> Stream:
        """Start ``argv``; its output is read as it comes."""

    def exit_code(self, exec_id: str) -> int:
        """The exit code of a finished ``stream``."""

    def interactive(
        self,
        container: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        environment: dict[str, str],
    ) -> Interactive:
        """Start ``argv`` with a TTY and stdin; bytes go both ways on the socket."""

    def resize(self, exec_id: str, *, cols: int, rows: int) -> None:
        """Resize an interactive command's TTY."""

    # --- files ---------------------------------------------------------------------------

    def put_files(self, container: str, path: str, tar: bytes) -> None:
        """Unpack ``tar`` into ``path`` (as root; owners and modes as the tar says)."""

    def get_files(self, container: str, path: str, *, chunk_size: int) -> Iterator[bytes] | None:
        """``path`` as a tar stream, in chunks; None when the path does not exist."""

    def read_volume_file(self, volume: str, image: str, name: str, limit: int) -> bytes | None:
        """One file of a volume no sandbox mounts (read through a container of ``image``
        that never starts); None without the volume, the file, or past ``limit`` bytes."""

    # --- what a container is ---------------------------------------------------------------

    def inspect(self, container: str) -> dict[str, Any]:
        """The container's description (Docker's inspect document)."""

    def user_of(self, container: str) -> str:
        """The user the container's processes run as."""

    def place(self, container: str, network: str) -> Place:
        """Its addresses, and the host's address on ``network``."""

    def notify(self, container: str, message: str) -> bool:
        """Best effort: a line on the terminals attached to the workspace."""

    # --- a sandbox's objects ---------------------------------------------------------------

    def objects(self, sandbox_id: str) -> list[str]:
        """Everything still labelled with the sandbox ("container x", "network y"…)."""

    def remove(self, sandbox_id: str, *, containers_only: bool = False) -> list[str]:
        """Remove everything labelled with the sandbox (containers first); what was removed."""

    def forget(self, sandbox_id: str) -> list[str]:
        """After the stack's destroy: what it does not hold (nothing on one host; on a swarm,
        the volumes its tasks made on their nodes); what was removed."""

    def states(self, engine: str) -> dict[str, dict[str, str]]:
        """Sandbox id → container name → state, for every container of this engine."""

    def engine_objects(self, engine: str) -> dict[str, list[str]]:
        """Sandbox id → its objects, for everything labelled with this engine."""

    def prepare_edge(self, name: str, subnet: str) -> None:
        """The shared network the edge reaches published workspaces on."""

    def publish(self, network: str) -> None:
        """After the stack's up of a sandbox with public ports: the edge reaches it on
        ``network``, the sandbox's own (on one host nothing to do: the stack put the workspace
        on the shared edge network; on a swarm the edge's container joins the overlay)."""

    def unpublish(self, sandbox_id: str) -> None:
        """Before the stack's destroy: the edge leaves the sandbox's networks (else a swarm's
        overlay could not be removed)."""


def backend_for(settings: Settings | None = None) -> Backend:
    """The backend the engine runs sandboxes on (``SANDBOX_BACKEND``): the host's dockerd, or
    a Docker Swarm cluster."""
    from engine.backend.docker import DockerBackend

    if settings is not None and settings.backend == "swarm":
        from engine.backend.swarm import SwarmBackend

        assert settings.swarm_tls is not None  # the settings check it
        return SwarmBackend(
            settings.swarm_manager,
            settings.swarm_tls,
            node_port=settings.swarm_node_port,
            engine_address=settings.swarm_engine_address,
            edge=settings.swarm_edge,
        )
    return DockerBackend()
