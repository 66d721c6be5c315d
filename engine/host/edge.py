"""The local edge: Traefik (the toolchain's binary) in front of the API, the UI and every
sandbox's published ports, for ``make run`` and the tests.

Traefik runs on the host, so it reaches workspaces at their addresses on the edge network,
where inter-container traffic is off (``engine.sandboxes.stacks.ensure_edge_network``). Its Docker
provider reads the routers the sandbox stacks put in the workspaces' labels; a file provider
routes ``api.<domain>`` and ``<domain>`` to the engine. The process is started detached (it
outlives the command that starts it, like the PostgreSQL cluster) and restarted only when its
configuration changed. Production runs Traefik from ``deploy/docker-compose.prod.yml``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine.backend.docker import ensure_edge_network
from engine.errors import EngineError
from engine.settings import Settings


class EdgeError(EngineError):
    pass


@dataclass(frozen=True)
class Edge:
    settings: Settings

    @property
    def folder(self) -> Path:
        return self.settings.state_path / "traefik"

    @property
    def url(self) -> str:
        """Where the edge's HTTP entrypoint answers."""
        return f"http://{self.settings.edge_host}:{self.settings.edge_port}"

    def dynamic(self) -> dict[str, object]:
        """Routes to the engine itself: the API at ``api.<domain>``, the UI at ``<domain>``
        (balanced across SANDBOX_EDGE_ENGINES too: several engines on one database);
        on a swarm with an edge (SANDBOX_SWARM_EDGE_URL), every other host of the domain —
        the sandboxes' published ports — to the swarm's edge, whose swarm provider routes
        them (docs/cluster.md)."""
        s = self.settings
        swarm: dict[str, dict[str, object]] = {"routers": {}, "services": {}}
        if s.backend == "swarm" and s.swarm_edge_url:
            swarm["routers"]["swarm-sandboxes"] = {
                "rule": f"HostRegexp(`^[a-z0-9-]+\\.{re.escape(s.domain)}$`)",
                "entryPoints": [s.entrypoint],
                "service": "swarm-edge",
                "priority": 1,  # after the engine's own hosts
            }
            swarm["services"]["swarm-edge"] = {
                "loadBalancer": {"servers": [{"url": s.swarm_edge_url}], "passHostHeader": True}
            }
        return {
            "http": {
                "routers": {
                    **swarm["routers"],
                    "engine-api": {
                        "rule": f"Host(`api.{s.domain}`)",
                        "entryPoints": [s.entrypoint],
                        "service": "engine",
                    },
                    "engine-ui": {
                        "rule": f"Host(`{s.domain}`)",
                        "entryPoints": [s.entrypoint],
                        "service": "engine",
                    },
                },
                "services": {
                    **swarm["services"],
                    "engine": {
                        "loadBalancer": {"servers": [{"url": url} for url in s.engine_urls]}
                    },
                },
            }
        }

    def command(self) -> list[str]:
        s = self.settings
        docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return [
            str(s.toolchain_path / "traefik"),
            f"--entrypoints.{s.entrypoint}.address={s.edge_host}:{s.edge_port}",
            f"--entrypoints.traefik.address=127.0.0.1:{s.edge_ping_port}",
            "--ping=true",
            "--providers.docker=true",
            f"--providers.docker.endpoint={docker_host}",
            "--providers.docker.exposedbydefault=false",
            f"--providers.docker.network={s.edge_network}",
            f"--providers.file.filename={self.folder / 'dynamic.yml'}",
            "--providers.file.watch=true",
            "--global.checknewversion=false",
            "--global.sendanonymoususage=false",
            "--log.level=INFO",
            "--log.nocolor=true",
        ]

    def _fingerprint(self) -> str:
        text = json.dumps([self.command(), self.dynamic()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _pid(self) -> int | None:
        try:
            pid_text, _, _ = (self.folder / "traefik.pid").read_text().partition(" ")
            pid = int(pid_text)
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def healthy(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.settings.edge_ping_port}/ping", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def start(self) -> str:
        """Start Traefik, or leave it running when its configuration is unchanged. Returns
        what was done; raises EdgeError naming the problem (with its log's tail)."""
        exe = self.settings.toolchain_path / "traefik"
        if not os.access(exe, os.X_OK):
            raise EdgeError(f"traefik is missing at {exe}; build it with toolchain/build.sh")
        ensure_edge_network(self.settings.edge_network, self.settings.edge_subnet)
        self.folder.mkdir(parents=True, exist_ok=True)
        fingerprint = self._fingerprint()
        pidfile = self.folder / "traefik.pid"
        pid = self._pid()
        if pid is not None and pidfile.read_text().split()[1:] == [fingerprint] and self.healthy():
            return f"traefik already running (pid {pid}) at {self.url}"
        self.stop()
        (self.folder / "dynamic.yml").write_text(json.dumps(self.dynamic(), indent=2) + "\n")
        log = self.folder / "traefik.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the command that started it
            )
        pidfile.write_text(f"{proc.pid} {fingerprint}\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if self.healthy():
                return f"traefik started (pid {proc.pid}) at {self.url}; log {log}"
            time.sleep(0.2)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        self.stop()
        raise EdgeError("traefik did not start:\n" + "\n".join(tail))

    def stop(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        (self.folder / "traefik.pid").unlink(missing_ok=True)
        return True
