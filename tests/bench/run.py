"""`make bench`: the engine against raw Docker for the same containers, measured in one run.

Each benchmark runs its baseline in the same process and run, repeats (QUICK=1: fewer
repeats), and reports median, p95 and the ratio. Results go to .bench/<timestamp>.json and a
table on stdout (copied into docs/benchmarks.md with the machine it ran on).

Benchmarks so far: cold create to `running` and destroy to `destroyed` through the API, for a
workspace-only template, against creating (and removing) the same network, volume and
container with the Docker SDK.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import psycopg

from engine.migrate import migrate
from engine.settings import Settings
from engine.stacks import remove_labelled
from engine.store import Role, create_client
from tests.api_server import serve

ROOT = Path(__file__).resolve().parents[2]
LIVE = ROOT / "tests" / "fixtures" / "live-templates"
BENCH_LABEL = "io.sandbox-engine.bench"


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p95": p95, "n": len(ordered)}


@contextmanager
def throwaway_engine() -> Iterator[tuple[str, str, Settings]]:
    """An API server on a database and Pulumi backend of its own."""
    base = Settings()
    admin = base.database_url.get_secret_value()
    name = f"sandbox_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(admin)._replace(path=f"/{name}").geturl()
    state = tempfile.mkdtemp(prefix="sandbox-bench-")
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            _, key = create_client(conn, name="bench", role=Role.MEMBER)
        settings = Settings(
            database_url=url,
            pulumi_backend_url=f"file://{state}",
            templates_dir=LIVE,
            max_live_sandboxes_per_key=100,
            creates_per_minute=1000,
        )
        with serve(settings) as address:
            yield f"http://{address}", key, settings
    finally:
        with psycopg.connect(url) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
        for sid in ids:
            remove_labelled(sid)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def wait_state(http: httpx.Client, sid: str, wanted: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = http.get(f"/api/v1/sandboxes/{sid}").json()["state"]
        if state == wanted:
            return
        if state == "failed":
            raise RuntimeError(f"sandbox {sid} failed")
        time.sleep(0.02)
    raise TimeoutError(f"sandbox {sid} did not reach {wanted}")


def api_create_destroy(http: httpx.Client) -> tuple[float, float]:
    start = time.perf_counter()
    created = http.post("/api/v1/sandboxes", json={"template": "web", "ttl": "10m"})
    created.raise_for_status()
    sid = created.json()["id"]
    wait_state(http, sid, "running")
    create = time.perf_counter() - start
    start = time.perf_counter()
    http.delete(f"/api/v1/sandboxes/{sid}").raise_for_status()
    wait_state(http, sid, "destroyed")
    return create, time.perf_counter() - start


def docker_create_destroy(client: docker.DockerClient) -> tuple[float, float]:
    """The same objects the web template's stack makes: a bridge network, a home volume, the
    workspace container with its limits, joined to the network and the edge network."""
    tag = secrets.token_hex(4)
    labels = {BENCH_LABEL: tag}
    start = time.perf_counter()
    network = client.networks.create(f"bench-{tag}-net", driver="bridge", labels=labels)
    volume = client.volumes.create(f"bench-{tag}-home", labels=labels)
    container = client.containers.create(
        "workspace-python:latest",
        name=f"bench-{tag}-workspace",
        hostname="workspace",
        labels=labels,
        nano_cpus=1_000_000_000,
        mem_limit="1g",
        pids_limit=256,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        restart_policy={"Name": "unless-stopped"},
        user="coder",
        working_dir="/home/coder/workspace",
        volumes={volume.name: {"bind": "/home/coder", "mode": "rw"}},
        network=network.name,
    )
    client.networks.get("sandbox-edge").connect(container)
    container.start()
    container.reload()
    create = time.perf_counter() - start
    start = time.perf_counter()
    container.remove(force=True, v=True)
    network.remove()
    volume.remove(force=True)
    return create, time.perf_counter() - start


def measure(
    repeats: int, run: Callable[[], tuple[float, float]]
) -> tuple[list[float], list[float]]:
    creates, destroys = [], []
    for _ in range(repeats):
        c, d = run()
        creates.append(c)
        destroys.append(d)
    return creates, destroys


def main() -> None:
    quick = os.environ.get("QUICK") == "1"
    repeats = 3 if quick else 10
    client = docker.from_env(timeout=120)
    results: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}",
        "repeats": repeats,
        "benchmarks": {},
    }
    with (
        throwaway_engine() as (url, key, _),
        httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=300) as http,
    ):
        api_create_destroy(http)  # warm-up: plugin start, first stack, page cache
        docker_create_destroy(client)
        api_c, api_d = measure(repeats, lambda: api_create_destroy(http))
        raw_c, raw_d = measure(repeats, lambda: docker_create_destroy(client))
    for name, engine, raw in (
        ("cold create (workspace-only)", api_c, raw_c),
        ("destroy (workspace-only)", api_d, raw_d),
    ):
        e, r = summary(engine), summary(raw)
        results["benchmarks"][name] = {
            "engine": e,
            "docker": r,
            "ratio_median": e["median"] / r["median"],
        }
    out = ROOT / ".bench" / f"{results['at'].replace(':', '')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"machine: {results['machine']}; {repeats} runs each; {out}")
    print("| benchmark | engine median | engine p95 | docker median | docker p95 | ratio |")
    print("|---|---|---|---|---|---|")
    for name, b in results["benchmarks"].items():
        print(
            f"| {name} | {b['engine']['median']:.2f} s | {b['engine']['p95']:.2f} s"
            f" | {b['docker']['median']:.2f} s | {b['docker']['p95']:.2f} s"
            f" | {b['ratio_median']:.1f}x |"
        )
    client.close()


if __name__ == "__main__":
    main()
