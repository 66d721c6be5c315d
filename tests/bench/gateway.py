"""The AI gateway's cost: the same streamed Messages API request sent to the stand-in upstream
directly and through the gateway (each in a process of its own, the client in the benchmark's),
alternating, 1,000 times (QUICK: 200): time to the first byte and to the whole answer, p50 and
p99, and the difference; then 50 streams at once through the gateway (QUICK: 20), each held open
by a slow upstream, with their errors.

What the gateway does per request, inside the difference: the token, address and budget
check and the exchange's row (one transaction), forwarding, reading the stream on its way, and
after the answer (off its path) the record, the usage and a timeline event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg

from engine.ai import store as ai_store
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.bench.harness import ROOT, VENV_PYTHON, _free_port, summary

REQUEST = {
    "model": "claude-bench",
    "max_tokens": 1024,
    "stream": True,
    "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "benchmark " * 200}]}],
}


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({proc.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            httpx.head(url + "/", timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def _processes(pieces: int, pause: float = 0.0) -> Iterator[tuple[str, str, str]]:
    """(upstream URL, gateway URL, token) over a throwaway database."""
    admin_url = Settings().database_url.get_secret_value()
    name = f"sandbox_bench_gw_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    procs: list[subprocess.Popen[bytes]] = []
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            owner, _ = create_client(conn, name="bench", role=Role.MEMBER)
            conn.execute(
                "INSERT INTO sandboxes (id, owner_id, template, state, expires_at) VALUES"
                " ('bench00001', %s, 'bench', 'running', now() + interval '1 day')",
                (owner.id,),
            )
            token = ai_store.mint(conn, sandbox_id="bench00001", owner_id=owner.id,
                                  template="bench", model=None, max_tokens=4096,
                                  budget_tokens=10**12, addresses=["127.0.0.1"])  # fmt: skip
        up_port, gw_port = _free_port(), _free_port()
        procs.append(
            subprocess.Popen(
                [python, "-m", "tests.ai_upstream", str(up_port), str(pieces), str(pause)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        upstream = f"http://127.0.0.1:{up_port}"
        env = {
            **os.environ,
            "SANDBOX_DATABASE_URL": url,
            "SANDBOX_GATEWAY_HOST": "127.0.0.1",
            "SANDBOX_GATEWAY_PORT": str(gw_port),
            "SANDBOX_GATEWAY_METRICS_PORT": "0",
            "SANDBOX_ANTHROPIC_UPSTREAM": upstream,
            "SANDBOX_ANTHROPIC_API_KEY": "sk-ant-bench",
        }
        procs.append(
            subprocess.Popen(
                [python, "-m", "engine.cli", "gateway"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        gateway = f"http://127.0.0.1:{gw_port}"
        _wait(upstream, procs[0])
        _wait(gateway, procs[1])
        yield upstream, gateway, token
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _one(http: httpx.Client, url: str, headers: dict[str, str], body: bytes) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    with http.stream("POST", url + "/v1/messages", content=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.read()[:200]!r}")
        for _ in response.iter_raw():
            if not first:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


async def _concurrent(url: str, token: str, n: int, body: bytes) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json",
               "anthropic-version": "2023-06-01"}  # fmt: skip
    errors: list[str] = []
    events = 0

    async def stream(http: httpx.AsyncClient) -> None:
        nonlocal events
        try:
            async with http.stream("POST", url + "/v1/messages", content=body,
                                   headers=headers) as response:  # fmt: skip
                if response.status_code != 200:
                    errors.append(str(response.status_code))
                async for chunk in response.aiter_raw():
                    events += chunk.count(b"\n\n")
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)

    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(stream(http) for _ in range(n)))
        return {"streams": n, "errors": len(errors), "error_kinds": sorted(set(errors)),
                "seconds": time.perf_counter() - started, "events": events}  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    n = 200 if quick else 1000
    body = json.dumps(REQUEST).encode()
    with _processes(pieces=4) as (upstream, gateway, token):
        headers = {"Authorization": f"Bearer {token}", "content-type": "application/json",
                   "anthropic-version": "2023-06-01", "anthropic-beta": "bench"}  # fmt: skip
        got: dict[str, dict[str, list[float]]] = {
            "direct": {"first": [], "total": []},
            "gateway": {"first": [], "total": []},
        }
        with httpx.Client(timeout=60) as http:
            for _ in range(20):  # warm both paths (connections, caches)
                _one(http, upstream, headers, body)
                _one(http, gateway, headers, body)
            for _ in range(n):
                for name, url in (("direct", upstream), ("gateway", gateway)):
                    first, total = _one(http, url, headers, body)
                    got[name]["first"].append(first * 1000)
                    got[name]["total"].append(total * 1000)
    result: dict[str, Any] = {"requests": n, "body_bytes": len(body)}
    for kind in ("first", "total"):
        d, g = summary(got["direct"][kind]), summary(got["gateway"][kind])
        result[kind] = {
            "direct": d,
            "gateway": g,
            "added_p50_ms": g["p50"] - d["p50"],
            "added_p99_ms": g["p99"] - d["p99"],
        }
    streams = 20 if quick else 50
    # Streams held open: the upstream sends an event every 50 ms (about 1 s a stream).
    with _processes(pieces=16, pause=0.05) as (upstream, gateway, token):
        result["concurrent"] = asyncio.run(_concurrent(gateway, token, streams, body))
        result["concurrent_direct"] = asyncio.run(_concurrent(upstream, token, streams, body))
    return result


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"AI gateway: {r['requests']} streamed requests ({r['body_bytes']} bytes each) to the"
        " stand-in upstream, directly and through the gateway, alternating:",
        "",
        "| | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 | added p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, label in (("first", "first byte"), ("total", "whole answer")):
        x = r[kind]
        lines.append(
            f"| {label} | {x['direct']['p50']:.2f} ms | {x['direct']['p99']:.2f} ms"
            f" | {x['gateway']['p50']:.2f} ms | {x['gateway']['p99']:.2f} ms"
            f" | {x['added_p50_ms']:.2f} ms | {x['added_p99_ms']:.2f} ms |"
        )
    c, d = r["concurrent"], r["concurrent_direct"]
    lines += [
        "",
        f"{c['streams']} streams at once through the gateway: {c['errors']} errors,"
        f" all done in {c['seconds']:.2f} s ({d['seconds']:.2f} s directly, {d['errors']}"
        " errors)",
    ]
    return lines


if __name__ == "__main__":
    results = run(os.environ.get("QUICK") == "1")
    print(json.dumps(results, indent=2))
    print("\n".join(report(results)))
