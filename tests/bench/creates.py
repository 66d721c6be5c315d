"""Create and destroy benchmarks: cold creates through the API against the Docker SDK making the
same objects, pooled creates, and 20 creates at once.

The baseline is derived from the engine's own spec (``engine.model.spec.build_spec``, a pure
function), so it makes exactly the network, volumes and containers — names aside — with the
same images, limits, users, mounts, networks and health waits as the stack does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx
from docker.models.containers import Container
from docker.models.networks import Network

from engine.model.spec import ContainerSpec, SandboxRequest, SpecSettings, build_spec
from engine.model.templates import find
from tests.bench.harness import (
    LIVE,
    ROOT,
    Engine,
    api_client,
    destroy_all,
    engine_process,
    rss_tree_mb,
    summary,
    wait_state,
)

BENCH_LABEL = "io.sandbox-engine.bench"
TEMPLATES = ROOT / "templates"


@contextmanager
def bench_templates(pool: int) -> Iterator[Path]:
    """A templates folder: the workspace-only ``web``, the product's ``backend-python``, and
    ``warm`` (``web`` keeping a pool of ``pool``)."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-bench-templates-"))
    try:
        web = (LIVE / "web.yaml").read_text()
        (folder / "web.yaml").write_text(web)
        shutil.copy(TEMPLATES / "backend-python.yaml", folder / "backend-python.yaml")
        (folder / "warm.yaml").write_text(
            web.replace("name: web", "name: warm") + f"pool: {pool}\n"
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the raw-Docker baseline -------------------------------------------------------------------


def _await_healthy(client: docker.DockerClient, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.api.inspect_container(name)["State"]
        if state.get("Running") and (state.get("Health") or {}).get("Status") in (None, "healthy"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} not healthy")


def docker_create(client: docker.DockerClient, template: str) -> tuple[float, list[Any]]:
    """Make the template's sandbox with the Docker SDK: network, volumes, service containers
    started and waited for (health), then the workspace. Returns seconds and the objects."""
    tpl = find(TEMPLATES if template != "web" else LIVE, template)
    tag = "bench" + secrets.token_hex(4)
    spec = build_spec(
        tpl,
        SandboxRequest(sandbox_id=tag, owner="bench"),
        SpecSettings(
            domain="localhost", entrypoint="web", tls_resolver="", engine="", public_port=0
        ),
    )
    labels = {BENCH_LABEL: tag}
    made: list[Any] = []
    started = time.perf_counter()
    network = client.networks.create(spec.network, driver="bridge", labels=labels)
    made.append(network)
    for name in spec.volumes:
        made.append(client.volumes.create(name, labels=labels))

    def run(c: ContainerSpec) -> Any:
        env = dict(c.env)
        if c.key == "postgres":
            env["POSTGRES_PASSWORD"] = "bench"
        container = client.containers.create(
            c.image,
            name=c.name,
            hostname=c.hostname,
            environment=env,
            labels={**labels, **c.labels},
            nano_cpus=int(c.cpus * 1e9),
            mem_limit=f"{c.memory_mb}m",
            pids_limit=c.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            restart_policy={"Name": "unless-stopped"},
            user=c.user or None,
            working_dir=c.workdir or None,
            volumes={m.volume: {"bind": m.target, "mode": "rw"} for m in c.mounts},
            network=network.name,
            networking_config={
                network.name: client.api.create_endpoint_config(aliases=list(c.aliases))
            },
        )
        made.insert(0, container)
        for extra in c.extra_networks:
            client.networks.get(extra).connect(container)
        container.start()
        return container

    services = [run(c) for c in spec.containers if c.key != "workspace"]
    for c, container in zip(
        [c for c in spec.containers if c.key != "workspace"], services, strict=True
    ):
        if c.wait_healthy:
            _await_healthy(client, container.name)
    run(next(c for c in spec.containers if c.key == "workspace"))
    return time.perf_counter() - started, made


def docker_destroy(made: list[Any]) -> float:
    """Remove what ``docker_create`` made: containers first (they are at the front), then the
    network and volumes."""
    started = time.perf_counter()
    for obj in made:
        _remove(obj)
    return time.perf_counter() - started


def _remove(obj: Any) -> None:
    if isinstance(obj, Container):
        obj.remove(force=True, v=True)
    elif isinstance(obj, Network):
        obj.remove()
    else:
        obj.remove(force=True)


def docker_rounds(template: str, repeats: int) -> tuple[list[float], list[float]]:
    client = docker.from_env(timeout=300)
    creates, destroys = [], []
    try:
        for i in range(repeats + (repeats > 1)):  # the first is a warm-up (unless only one)
            took, made = docker_create(client, template)
            gone = docker_destroy(made)
            if i or repeats == 1:
                creates.append(took)
                destroys.append(gone)
    finally:  # whatever an interrupted round left
        selector = {"label": BENCH_LABEL}
        for obj in [
            *client.containers.list(all=True, filters=selector),
            *client.networks.list(filters=selector),
            *client.volumes.list(filters=selector),
        ]:
            _remove(obj)
        client.close()
    return creates, destroys


# --- through the API ---------------------------------------------------------------------------


def api_rounds(http: httpx.Client, template: str, repeats: int) -> tuple[list[float], list[float]]:
    """Create to ``running`` then destroy to ``destroyed``, one at a time; the first round is a
    warm-up."""
    creates, destroys = [], []
    for i in range(repeats + (repeats > 1)):  # the first is a warm-up (unless only one)
        started = time.perf_counter()
        response = http.post("/api/v1/sandboxes", json={"template": template, "ttl": "10m"})
        response.raise_for_status()
        sid = response.json()["id"]
        wait_state(http, sid, "running")
        created = time.perf_counter() - started
        started = time.perf_counter()
        http.delete(f"/api/v1/sandboxes/{sid}").raise_for_status()
        wait_state(http, sid, "destroyed")
        if i or repeats == 1:
            creates.append(created)
            destroys.append(time.perf_counter() - started)
        time.sleep(1.0)  # let the stack reserve refill, as it would between real requests
    return creates, destroys


def compare(engine: list[float], raw: list[float]) -> dict[str, Any]:
    e, r = summary(engine), summary(raw)
    return {"engine": e, "docker": r, "ratio_median": e["median"] / r["median"]}


def cold(quick: bool) -> dict[str, Any]:
    """Cold create and destroy: ``web`` (workspace only) with the stack reserve on (the
    default) and off, ``backend-python`` with its services; each against raw Docker."""
    repeats = 3 if quick else 10
    heavy = 1 if quick else 5
    results: dict[str, Any] = {}
    with bench_templates(pool=0) as folder:
        for reserve in ("2", "0"):
            with (
                engine_process(
                    SANDBOX_TEMPLATES_DIR=str(folder), SANDBOX_STACK_RESERVE=reserve
                ) as engine,
                api_client(engine) as http,
            ):
                time.sleep(3 if reserve != "0" else 0)  # the reserve is made at start
                c, d = api_rounds(http, "web", repeats if reserve != "0" or not quick else 2)
                label = "reserve on" if reserve != "0" else "reserve off"
                results[f"cold web ({label})"] = c
                results[f"destroy web ({label})"] = d
                if reserve != "0":
                    hc, hd = api_rounds(http, "backend-python", heavy)
                    results["cold backend-python"] = hc
                    results["destroy backend-python"] = hd
    raw_c, raw_d = docker_rounds("web", repeats)
    raw_hc, raw_hd = docker_rounds("backend-python", heavy)
    return {
        "cold create, workspace-only (stack reserve on: default)": compare(
            results["cold web (reserve on)"], raw_c
        ),
        "cold create, workspace-only (stack reserve off)": compare(
            results["cold web (reserve off)"], raw_c
        ),
        "cold create, backend-python (postgres + redis, health waits)": compare(
            results["cold backend-python"], raw_hc
        ),
        "destroy, workspace-only": compare(results["destroy web (reserve on)"], raw_d),
        "destroy, backend-python": compare(results["destroy backend-python"], raw_hd),
    }


def pooled(quick: bool) -> dict[str, Any]:
    """Claims of a warm pool through the API: POST until the answer (201, ``running``). Each
    round waits for a full pool, claims it empty one request after another, then destroys
    what it claimed."""
    size, rounds = (5, 1) if quick else (10, 10)
    samples: list[float] = []
    with (
        bench_templates(pool=size) as folder,
        engine_process(SANDBOX_TEMPLATES_DIR=str(folder), SANDBOX_REAP_INTERVAL="1") as engine,
        api_client(engine) as http,
        api_client(engine, engine.admin_key) as admin,
    ):

        def ready() -> int:
            listed = admin.get("/api/v1/sandboxes", params={"state": "pooled"}).json()
            return sum(1 for s in listed["items"] if s["template"] == "warm")

        for _ in range(rounds):
            deadline = time.monotonic() + 600
            while ready() < size:
                if time.monotonic() > deadline:
                    raise TimeoutError("the warm pool did not fill")
                time.sleep(0.5)
            claimed = []
            for _ in range(size):
                started = time.perf_counter()
                response = http.post("/api/v1/sandboxes", json={"template": "warm", "ttl": "10m"})
                took = time.perf_counter() - started
                body = response.json()
                if response.status_code != 201 or body["state"] != "running":
                    raise RuntimeError(f"not served from the pool: {response.status_code} {body}")
                samples.append(took)
                claimed.append(body["id"])
            destroy_all(http, claimed, concurrency=4)
    return {"pooled create, workspace-only (POST to running)": {"engine": summary(samples)}}


def at_once(work: Callable[[], None], n: int) -> None:
    """Run ``work`` in ``n`` threads started together; return when all have ended."""
    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def docker_concurrent(n: int) -> float:
    """The baseline of ``concurrent``: ``n`` workspace-only sandboxes made at once with the
    Docker SDK (a thread and a client each); seconds until all are made. Then removed."""
    made: list[list[Any]] = []
    lock = threading.Lock()

    def one() -> None:
        client = docker.from_env(timeout=300)
        try:
            _, objects = docker_create(client, "web")
            with lock:
                made.append(objects)
        finally:
            client.close()

    started = time.perf_counter()
    at_once(one, n)
    took = time.perf_counter() - started
    for objects in made:
        docker_destroy(objects)
    if len(made) != n:
        raise RuntimeError(f"only {len(made)} of {n} made with the Docker SDK")
    return took


def concurrent(engine: Engine) -> tuple[dict[str, Any], list[str]]:
    """20 creates at once (``web``): time until all run, errors, and the engine's memory per
    stack operation in flight (peak resident memory of the engine and its children — CLI
    runs, the provider — above idle, over the operations the engine runs at once). The
    sandboxes are left running (the terminal and load benchmarks use them); their ids are
    returned."""
    n = 20
    with api_client(engine) as http:
        idle = rss_tree_mb(engine.pid)
        peak = idle
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.1):
                peak = max(peak, rss_tree_mb(engine.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        errors: list[str] = []
        ids: list[str] = []
        lock = threading.Lock()
        started = time.perf_counter()

        def one() -> None:
            try:
                response = http.post("/api/v1/sandboxes", json={"template": "web", "ttl": "30m"})
                response.raise_for_status()
                sid = response.json()["id"]
                with lock:
                    ids.append(sid)
                wait_state(http, sid, "running")
            except Exception as exc:  # counted, not raised: the figure is the error count
                with lock:
                    errors.append(str(exc)[:300])

        at_once(one, n)
        all_running = time.perf_counter() - started
        stop.set()
        sampler.join()
    in_flight = min(n, int(os.environ.get("SANDBOX_MAX_STACK_OPERATIONS", "4")))
    raw = docker_concurrent(n)
    return {
        "creates": n,
        "errors": len(errors),
        "error_samples": errors[:3],
        "all_running_s": all_running,
        "docker_all_made_s": raw,
        "ratio": all_running / raw,
        "engine_rss_idle_mb": idle,
        "engine_rss_peak_mb": peak,
        "stack_operations_at_once": in_flight,
        "mb_per_operation_in_flight": (peak - idle) / in_flight,
    }, ids


if __name__ == "__main__":
    import json

    quick = os.environ.get("QUICK") == "1"
    print(json.dumps({"cold": cold(quick), "pooled": pooled(quick)}, indent=2))
