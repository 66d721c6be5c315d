"""The swarm backend against one host, on the lab swarm (``make swarm-lab``), in the same run:

- 30 creates at once of a small workspace (``tiny``: a tenth of a CPU) — on this host
  (``SANDBOX_BACKEND=docker``), on the 3-node swarm through one engine, and through two engines
  on one database (alternate requests): seconds until all are running;
- cold create p50 (POST to ``running``, one after another) and pooled create p50 (a claim of
  the warm pool) on the swarm against this host.

``python -m tests.bench.run swarm`` (part ``swarm``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.bench.harness import (
    ROOT,
    Engine,
    api_client,
    destroy_all,
    engine_process,
    serve_process,
    summary,
    wait_state,
)

LAB_ENV = ROOT / ".state" / "swarm-lab" / "env"
TEMPLATES = ROOT / "tests" / "fixtures" / "swarm-templates"
AT_ONCE = 30


def lab_env() -> dict[str, str]:
    if not LAB_ENV.is_file():
        raise SystemExit(f"the swarm benchmark needs the lab swarm ({LAB_ENV}): make swarm-lab")
    return dict(line.split("=", 1) for line in LAB_ENV.read_text().split())


@contextlib.contextmanager
def templates(pool: int) -> Iterator[Path]:
    """The swarm fixtures, with ``warm``: ``tiny`` keeping a pool of ``pool``."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-bench-swarm-"))
    try:
        shutil.copytree(TEMPLATES, folder, dirs_exist_ok=True)
        text = (TEMPLATES / "tiny.yaml").read_text().replace("name: tiny", "name: warm")
        (folder / "warm.yaml").write_text(text + f"pool: {pool}\n")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def second_engine(first: Engine, env: dict[str, str]) -> Iterator[str]:
    """Another ``serve`` on the first one's database and Pulumi backend; its base URL."""
    state = Path(first.log_path).parent
    # The first engine serves the AI gateway and the egress proxy on this host's ports.
    extra = {**env, "SANDBOX_GATEWAY_SERVE": "false"}
    with serve_process(first.database_url, state, state / "engine-2.log", **extra) as (base, _):
        yield base


def at_once(clients: list[httpx.Client], n: int) -> tuple[float, list[str]]:
    """``n`` creates sent together, alternately through ``clients``: seconds until all run."""

    def one(i: int) -> str:
        http = clients[i % len(clients)]
        made = http.post("/api/v1/sandboxes", json={"template": "tiny", "ttl": "30m"})
        made.raise_for_status()
        sid: str = made.json()["id"]
        wait_state(clients[0], sid, "running", timeout=900)
        return sid

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(one, range(n)))
    return time.perf_counter() - started, ids


def cold_and_pooled(http: httpx.Client, repeats: int) -> dict[str, Any]:
    cold, pooled = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        made = http.post("/api/v1/sandboxes", json={"template": "tiny", "ttl": "10m"})
        made.raise_for_status()
        wait_state(http, made.json()["id"], "running")
        cold.append(time.perf_counter() - started)
        destroy_all(http, [made.json()["id"]], concurrency=1)
    for _ in range(repeats):
        deadline = time.monotonic() + 600
        while True:  # a full pool before each claim
            started = time.perf_counter()
            made = http.post("/api/v1/sandboxes", json={"template": "warm", "ttl": "10m"})
            took = time.perf_counter() - started
            if made.status_code == 201:
                pooled.append(took)
                destroy_all(http, [made.json()["id"]], concurrency=1)
                break
            if made.status_code == 202:  # not from the pool: made cold; wait for the pool
                destroy_all(http, [made.json()["id"]], concurrency=1)
            if time.monotonic() > deadline:
                raise TimeoutError("the warm pool did not fill")
            time.sleep(2)
    return {"cold": summary(cold), "pooled": summary(pooled)}


def run(quick: bool) -> dict[str, Any]:
    lab = lab_env()
    n = 10 if quick else AT_ONCE
    repeats = 3 if quick else 7
    results: dict[str, Any] = {"at_once": n}
    with templates(pool=2) as folder:
        common = {"SANDBOX_TEMPLATES_DIR": str(folder), "SANDBOX_REAP_INTERVAL": "1",
                  "SANDBOX_MAX_PENDING_CREATES": "100"}  # fmt: skip
        for label, env in (("host", {}), ("swarm", lab)):
            with engine_process(**common, **env) as engine, api_client(engine) as http:
                took, ids = at_once([http], n)
                results[f"{label}, one engine"] = took
                destroy_all(http, ids, concurrency=8)
                if label == "swarm":
                    with (
                        second_engine(engine, {**common, **env}) as other,
                        httpx.Client(
                            base_url=other, headers={"X-API-Key": engine.member_key}, timeout=120
                        ) as http2,
                    ):
                        took, ids = at_once([http, http2], n)
                        results["swarm, two engines"] = took
                        destroy_all(http, ids, concurrency=8)
                results[f"{label} creates"] = cold_and_pooled(http, repeats)
    return results


def report(r: dict[str, Any]) -> list[str]:
    host = r["host, one engine"]
    lines = [
        "",
        f"| {r['at_once']} creates at once (tiny), time to all running | seconds | vs one host |",
        "|---|---|---|",
    ]
    for key in ("host, one engine", "swarm, one engine", "swarm, two engines"):
        lines.append(f"| {key} | {r[key]:.1f} s | {r[key] / host:.2f}x |")
    lines += [
        "",
        "| create p50 (POST to running) | one host | swarm | ratio |",
        "|---|---|---|---|",
    ]
    for kind in ("cold", "pooled"):
        h, s = r["host creates"][kind]["p50"], r["swarm creates"][kind]["p50"]
        lines.append(f"| {kind} | {h:.2f} s | {s:.2f} s | {s / h:.2f}x |")
    return lines
