"""The read API under a fixed request rate, with many live sandboxes.

N sandboxes of the workspace-only ``web`` template are created through the API (4 at a time;
the time is reported), then each endpoint gets an open-loop load: requests are sent at fixed
times (200 per second) whatever the responses do, and each latency is measured from the time
the request was due, so a slow response cannot hide the requests queued behind it
(coordinated omission). The load runs in this process's event loop with a minimal keep-alive
HTTP client, cheap enough to keep its schedule; the engine is another process, so the two do
not share a GIL. ``/healthz`` (no key, no database) gives the floor of the HTTP stack and the
load generator. Also reported: the engine's resident memory (process tree) idle with 0 and N
sandboxes, its CPU per request, and how long destroying them all took.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from tests.bench.harness import (
    Engine,
    api_client,
    cpu_tree_seconds,
    create_running,
    destroy_all,
    engine_process,
    process_tree,
    rss_tree_mb,
    summary,
)

RATE = 200  # requests per second
CONCURRENCY = 4  # creates and destroys in flight


class HttpPool:
    """A small keep-alive HTTP/1.1 GET client on asyncio streams: a stack of idle connections,
    a new one opened when none is idle (up to ``limit``; beyond it requests wait, and the wait
    counts in their latency). About 0.2 ms of CPU per request, against 2-3 ms for
    httpx.AsyncClient, so the generator keeps its schedule on a machine it shares with the
    engine."""

    def __init__(self, base_url: str, headers: dict[str, str], limit: int = 512) -> None:
        address = urlsplit(base_url)
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(limit)
        self.opened = 0

    async def get(self, path: str) -> tuple[int, int]:
        """(status, body length). A kept-alive connection the server closed meanwhile (its
        idle timeout) is replaced by a new one, as any HTTP client does."""
        async with self.slots:
            while self.idle:
                reader, writer = self.idle.pop()
                if not reader.at_eof() and not writer.is_closing():
                    try:
                        return await self._exchange(reader, writer, path)
                    except asyncio.IncompleteReadError as exc:
                        if exc.partial:
                            raise
                        continue  # closed by the server before it answered: a GET, retried
                    except ConnectionResetError:
                        continue
                writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
            return await self._exchange(reader, writer, path)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> tuple[int, int]:
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"{self.headers}\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            if fields.get("transfer-encoding", "").lower() == "chunked":
                length = await self._chunked(reader)
            else:
                length = int(fields.get("content-length", "0"))
                await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(lines[0].split(" ", 2)[1]), length

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> int:
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            total += size
            if size == 0:
                return total

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def open_loop(
    engine: Engine, path: Callable[[], str], rate: float, seconds: float
) -> dict[str, Any]:
    """GET ``path()`` ``rate`` times a second for ``seconds``, open loop."""
    pool = HttpPool(engine.base_url, {"X-API-Key": engine.member_key})
    try:
        # Warm-up, not measured: a few connections and the route's first calls.
        await asyncio.gather(*(pool.get(path()) for _ in range(16)))
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        sizes: list[int] = []
        last_done = 0.0

        async def fire(due: float) -> None:
            nonlocal last_done
            try:
                code, size = await pool.get(path())
                status = str(code)
                sizes.append(size)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            last_done = max(last_done, done)
            latencies.append((done - due) * 1000)
            statuses[status] = statuses.get(status, 0) + 1

        total = round(rate * seconds)
        tasks: set[asyncio.Task[None]] = set()
        cpu_engine, cpu_self = cpu_tree_seconds(engine.pid), time.process_time()
        start = time.perf_counter() + 0.05
        late = 0.0  # how far behind schedule this process sent (its own overload)
        for i in range(total):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                late = max(late, -wait)
            task = asyncio.create_task(fire(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        elapsed = last_done - start
        cpu_engine = cpu_tree_seconds(engine.pid) - cpu_engine
        cpu_self = time.process_time() - cpu_self
    finally:
        await pool.close()
    lat = summary(latencies)
    ok = statuses.get("200", 0)
    return {
        "requests": total,
        "target_rps": rate,
        "achieved_rps": ok / elapsed,
        "errors": total - ok,
        "statuses": statuses,
        "latency_ms": {k: lat[k] for k in ("p50", "p95", "p99", "max")},
        "response_bytes": statistics.median(sizes) if sizes else 0,
        "connections": pool.opened,
        "engine_cpu_ms_per_request": cpu_engine / total * 1000,
        # The rate at which the engine's CPU time alone would fill one core (its GIL).
        "one_core_rps": total / cpu_engine if cpu_engine else None,
        "engine_cpu_percent": cpu_engine / elapsed * 100,
        "generator_cpu_percent": cpu_self / elapsed * 100,
        "generator_max_late_ms": late * 1000,
    }


def run(engine: Engine, quick: bool, ids: list[str] | None = None) -> dict[str, Any]:
    """Load with N live sandboxes: ``ids`` (running already) and as many more as it takes,
    all destroyed at the end."""
    n = 20 if quick else 100
    seconds = 5 if quick else 20
    result: dict[str, Any] = {
        "sandboxes": n,
        "seconds_per_endpoint": seconds,
        # The machine's own load (other work on it shows in every number here).
        "load_average_before": os.getloadavg(),
    }
    with api_client(engine) as http:
        time.sleep(2)
        result["rss_mb_before_creating"] = rss_tree_mb(engine.pid)
        start = time.perf_counter()
        given = list(ids or [])
        ids = given + create_running(http, "web", max(0, n - len(given)), CONCURRENCY)
        result["created_here"] = n - len(given)
        result["create_seconds"] = time.perf_counter() - start
        time.sleep(5)  # settle: stack operations' child processes exit
        result["rss_mb_idle_with_sandboxes"] = rss_tree_mb(engine.pid)
        result["engine_processes"] = len(process_tree(engine.pid))
        result["list_items"] = len(http.get("/api/v1/sandboxes").json()["items"])

        def one() -> str:
            return f"/api/v1/sandboxes/{secrets.choice(ids)}"

        endpoints: dict[str, Callable[[], str]] = {
            "GET /healthz": lambda: "/healthz",
            "GET /api/v1/sandboxes": lambda: "/api/v1/sandboxes",
            "GET /api/v1/sandboxes/{id}": one,
        }
        result["endpoints"] = {}
        for name, path in endpoints.items():
            result["endpoints"][name] = asyncio.run(open_loop(engine, path, RATE, seconds))
        result["rss_mb_after_load"] = rss_tree_mb(engine.pid)
        start = time.perf_counter()
        result["destroy_refused"] = destroy_all(http, ids, CONCURRENCY)
        result["destroy_seconds"] = time.perf_counter() - start
    result["load_average_after"] = os.getloadavg()
    return result


if __name__ == "__main__":
    with engine_process() as eng:
        print(json.dumps(run(eng, os.environ.get("QUICK") == "1"), indent=2))
