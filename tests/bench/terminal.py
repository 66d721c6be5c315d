"""The browser terminal against a raw ``docker exec`` attach to the same tmux session.

Both sides run the engine's own command line (``tmux new-session -A -s main …``) in one
sandbox's workspace, with the same user, folder and environment, one after the other, never
interleaved (the WebSocket, the raw attach, the WebSocket without permessage-deflate), each
the only tmux client attached:

- echo round trip: one typed letter until the shell's line editor echoes it back, as a person
  typing feels it; every 50 letters a Ctrl-U clears the line so it never wraps;
- throughput: a command printing tens of MB (3 runs; 5 in a full run), from Enter until a
  sentinel line shows. tmux renders its screen rather than forwarding every byte, so the bytes
  that actually crossed the connection are reported beside the bytes the command produced.

The difference is what the engine adds: the WebSocket (and its compression), the ASGI server
and the bridge between the WebSocket and the Docker socket. Also measured: connect to prompt
when re-attaching, and how many tmux clients stay attached after a connection closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import docker
from websockets.sync.client import ClientConnection, connect

from engine.backend.docker import DockerBackend
from engine.model.templates import load
from engine.terminal.session import start_shell
from tests.bench.harness import (
    LIVE,
    Engine,
    api_client,
    cpu_tree_seconds,
    create_running,
    engine_process,
    summary,
    wait_state,
)

COLS, ROWS = 200, 50
CLEAR_EVERY = 50
LETTERS = b"xzq"  # none of them in the prompt, tmux's redraws or the throughput output
CTRL_U = b"\x15"
ESCAPES = re.compile(
    rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[PX^_][^\x1b]*\x1b\\"
    rb"|[ -/]+[0-~]|[0-~])"
)


def visible(data: bytes) -> bytes:
    """Terminal output without its escape sequences (cursor moves, colours, modes)."""
    return ESCAPES.sub(b"", data)


class Channel(Protocol):
    received: int  # bytes
    chunks: int  # WebSocket messages, or reads from the exec socket

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes | None:
        """The next chunk of output, or None when nothing came within ``timeout`` seconds."""
        ...

    def resize(self, cols: int, rows: int) -> None: ...

    def close(self) -> None: ...


class WebSocketChannel:
    """The engine's terminal WebSocket: binary frames both ways, resize as a text frame."""

    def __init__(self, url: str, *, deflate: bool = True) -> None:
        # Browsers offer permessage-deflate; deflate=False measures what it costs.
        self.ws: ClientConnection = connect(
            url, max_size=None, open_timeout=30, compression="deflate" if deflate else None
        )
        self.received = self.chunks = 0

    @property
    def extensions(self) -> str | None:
        response = self.ws.response
        return response.headers.get("Sec-WebSocket-Extensions") if response else None

    def send(self, data: bytes) -> None:
        self.ws.send(data)

    def recv(self, timeout: float) -> bytes | None:
        try:
            message = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        data = message if isinstance(message, bytes) else message.encode()
        self.received += len(data)
        self.chunks += 1
        return data

    def resize(self, cols: int, rows: int) -> None:
        self.ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def close(self) -> None:
        self.ws.close()


class ExecChannel:
    """The baseline: ``docker exec`` with a TTY over the Docker socket, as api/terminal.py
    starts it, read and written directly."""

    def __init__(self, client: docker.DockerClient, container: str, user: str, workdir: str):
        self.api = client.api
        self.exec_id, self.sock, _, _, self.release = start_shell(
            DockerBackend(), container, user, workdir
        )
        self.received = self.chunks = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        if not data:
            raise EOFError("the exec stream ended")
        self.received += len(data)
        self.chunks += 1
        return data

    def resize(self, cols: int, rows: int) -> None:
        self.api.exec_resize(self.exec_id, height=rows, width=cols)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.release()


def drain(ch: Channel, quiet: float) -> bytes:
    """Read until nothing has come for ``quiet`` seconds."""
    seen = b""
    while (data := ch.recv(quiet)) is not None:
        seen += data
    return seen


def expect(ch: Channel, needle: bytes, within: float) -> float:
    """Read until ``needle`` shows in the visible output; returns the seconds it took."""
    start = time.perf_counter()
    seen = b""
    while needle not in visible(seen):
        left = within - (time.perf_counter() - start)
        data = ch.recv(max(left, 0.001))
        if data is None:
            raise TimeoutError(f"{needle!r} not seen; last output: {seen[-300:]!r}")
        seen = (seen + data)[-8192:]
    return time.perf_counter() - start


def attach(ch: Channel) -> None:
    """Size the terminal, wait for the shell prompt and clear the line."""
    ch.resize(COLS, ROWS)
    expect(ch, b"$", within=60)
    drain(ch, 0.3)
    ch.send(CTRL_U)
    drain(ch, 0.2)


def echo_round_trips(ch: Channel, n: int) -> list[float]:
    """Milliseconds from sending one letter until a frame shows it, ``n`` times."""
    samples: list[float] = []
    for i in range(n):
        if i % CLEAR_EVERY == 0 and i:
            ch.send(CTRL_U)
            drain(ch, 0.1)
        letter = LETTERS[i % len(LETTERS) : i % len(LETTERS) + 1]
        start = time.perf_counter()
        ch.send(letter)
        expect(ch, letter, within=10)
        samples.append((time.perf_counter() - start) * 1000)
    ch.send(CTRL_U)
    drain(ch, 0.2)
    return samples


def throughput(ch: Channel, total: int) -> dict[str, float]:
    """Print ``total`` bytes (200-column lines) and time it from Enter to the sentinel."""
    tag = secrets.token_hex(4)
    # The typed line holds the tag but not DONE_<tag>: only the command's output matches.
    command = f"head -c {total} /dev/zero | tr '\\0' a | fold -w 200; printf 'DONE_%s\\n' {tag}"
    ch.send(command.encode())
    expect(ch, tag.encode(), within=10)
    drain(ch, 0.2)
    before, chunks = ch.received, ch.chunks
    start = time.perf_counter()
    ch.send(b"\r")
    expect(ch, f"DONE_{tag}".encode(), within=600)
    seconds = time.perf_counter() - start
    drain(ch, 0.3)
    produced = total + -(-total // 200)  # the bytes and fold's newlines
    return {
        "seconds": seconds,
        "produced_bytes": produced,
        "received_bytes": ch.received - before,
        "received_chunks": ch.chunks - chunks,
        "mb_per_s": produced / seconds / 1e6,
    }


def measure(ch: Channel, echoes: int, total: int, repeats: int, engine_pid: int) -> dict[str, Any]:
    """Attach, warm up (20 echoes, 1 MB), then the echo samples and ``repeats`` throughput
    runs (each with the CPU time the engine's process tree spent on it)."""
    attach(ch)
    echo_round_trips(ch, 20)
    throughput(ch, 1_000_000)
    echo = echo_round_trips(ch, echoes)
    runs = []
    for _ in range(repeats):
        cpu = cpu_tree_seconds(engine_pid)
        run = throughput(ch, total)
        run["engine_cpu_seconds"] = cpu_tree_seconds(engine_pid) - cpu
        runs.append(run)
    return {"echo_ms": echo, "throughput": runs}


def throughput_summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Median MB/s over the runs, and each run."""
    return {"mb_per_s": summary([r["mb_per_s"] for r in runs]), "runs": runs}


def attach_times(
    open_channel: Callable[[], Channel], times: int, after: Callable[[], None]
) -> list[float]:
    """Milliseconds from opening a connection to the prompt on screen, re-attaching to the
    existing session ``times`` times; ``after`` runs after each (detaches what is left)."""
    samples: list[float] = []
    for _ in range(times):
        start = time.perf_counter()
        ch = open_channel()
        try:
            ch.resize(COLS, ROWS)
            expect(ch, b"$", within=60)
            samples.append((time.perf_counter() - start) * 1000)
            drain(ch, 0.2)
        finally:
            ch.close()
            time.sleep(0.2)
            after()
    return samples


def tmux_clients(client: docker.DockerClient, container: str, user: str) -> int:
    """How many clients the workspace's tmux server has attached."""
    result = client.containers.get(container).exec_run(["tmux", "list-clients"], user=user)
    return len(result.output.decode().splitlines()) if result.exit_code == 0 else 0


def detach_all(client: docker.DockerClient, container: str, user: str) -> None:
    """Detach every tmux client. Closing an exec's stream leaves its tmux client attached
    (the process keeps its TTY), and tmux renders for every client: the next measurement
    starts with its own client only."""
    client.containers.get(container).exec_run(["tmux", "detach-client", "-s", "main"], user=user)


def run(engine: Engine, quick: bool, sandbox: str | None = None) -> dict[str, Any]:
    """Measure on ``sandbox`` (a running ``web`` sandbox), or on one made and destroyed here."""
    load_before = os.getloadavg()
    echoes = 300 if quick else 1000
    total = (20 if quick else 50) * 1_000_000
    repeats = 2 if quick else 5
    workspace = load(LIVE / "web.yaml").workspace
    client = docker.from_env(timeout=120)
    with api_client(engine) as http:
        sid = sandbox or create_running(http, "web", 1, 1)[0]
        try:
            container: str = http.get(f"/api/v1/sandboxes/{sid}").json()["workspace"]
            url = engine.base_url.replace("http", "ws", 1)
            url += f"/api/v1/ws/terminal/{sid}?token={engine.member_key}"

            clients: list[int] = []

            def via_engine(deflate: bool = True) -> WebSocketChannel:
                return WebSocketChannel(url, deflate=deflate)

            def via_docker() -> ExecChannel:
                return ExecChannel(client, container, workspace.user, workspace.workdir)

            def detach() -> None:
                detach_all(client, container, workspace.user)

            def session(open_channel: Callable[[], Channel]) -> dict[str, Any]:
                ch = open_channel()
                try:
                    return measure(ch, echoes, total, repeats, engine.pid)
                finally:
                    ch.close()
                    time.sleep(1)
                    clients.append(tmux_clients(client, container, workspace.user))
                    detach()

            probe = via_engine()  # starts the session: every measured run re-attaches
            extensions = probe.extensions
            attach(probe)
            probe.close()
            detach()
            engine_run = session(via_engine)
            docker_run = session(via_docker)
            # The full run also measures without compression and re-attaching.
            plain_run = None if quick else session(lambda: via_engine(deflate=False))
            reattach = (
                None
                if quick
                else {
                    "engine": summary(attach_times(via_engine, 10, detach)),
                    "docker": summary(attach_times(via_docker, 10, detach)),
                }
            )
        finally:
            if sandbox is None:
                http.delete(f"/api/v1/sandboxes/{sid}").raise_for_status()
                wait_state(http, sid, "destroyed")
            client.close()
    e, d = summary(engine_run["echo_ms"]), summary(docker_run["echo_ms"])
    te = throughput_summary(engine_run["throughput"])
    td = throughput_summary(docker_run["throughput"])
    return {
        "echo_ms": {
            "engine": e,
            "docker": d,
            "ratio_median": e["median"] / d["median"],
            "engine_without_deflate": plain_run and summary(plain_run["echo_ms"]),
        },
        "throughput": {
            "produced_bytes_per_run": engine_run["throughput"][0]["produced_bytes"],
            "engine": te,
            "docker": td,
            "ratio_median_mb_per_s": te["mb_per_s"]["median"] / td["mb_per_s"]["median"],
            "engine_without_deflate": plain_run and throughput_summary(plain_run["throughput"]),
        },
        # Connect to prompt, re-attaching to the running session.
        "attach_ms": reattach,
        "websocket_extensions": extensions,
        # tmux clients still attached 1 s after each connection closed: engine, docker, engine
        # without deflate (each time detached before going on).
        "tmux_clients_left_after_close": clients,
        # The machine's own load (other work on it shows in every number here).
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


if __name__ == "__main__":
    with engine_process() as eng:
        print(json.dumps(run(eng, os.environ.get("QUICK") == "1"), indent=2))
