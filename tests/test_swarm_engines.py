"""Two engine processes on one database behind Traefik, on the lab swarm (``make swarm-lab``):
both take creates, serve terminals and run stack operations; thirty creates at once through
the edge are all running, none made twice; one engine SIGKILLed mid-create, the other settles
what it left (recovery through the lease of engine/workers.py) and nothing is left behind."""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from engine.backend.swarm import SwarmBackend
from engine.host.edge import Edge
from engine.settings import Settings
from tests.api_server import Engine, Terminal, _free_port, engine_http, prepare
from tests.conftest import ROOT
from tests.test_swarm import lab_settings

pytestmark = [pytest.mark.slow, pytest.mark.swarm]

TEMPLATES = ROOT / "tests" / "fixtures" / "swarm-templates"
CREATES = 30


def _states(http: httpx.Client, ids: list[str]) -> dict[str, Any]:
    return {sid: http.get(f"/api/v1/sandboxes/{sid}").json() for sid in ids}


def _settle(http: httpx.Client, ids: list[str], timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        bodies = _states(http, ids)
        if all(b["state"] in ("running", "failed", "destroyed") for b in bodies.values()):
            return bodies
        assert time.monotonic() < deadline, collections.Counter(b["state"] for b in bodies.values())
        time.sleep(2)


async def _echo(url: str, word: str) -> None:
    async with websockets.connect(url) as ws:
        term = Terminal(ws)
        await term.type(f"echo {word}-$((6*7))\r")
        await term.expect(f"{word}-42", within=30)


def test_two_engines_share_the_work_and_one_dying_leaves_nothing_behind(
    module_database: str, tmp_path: Path
) -> None:
    lab = lab_settings()
    backend = SwarmBackend(lab["swarm_manager"], Path(lab["swarm_tls"]))
    key, _, env = prepare(
        module_database,
        tmp_path / "state",
        **{f"SANDBOX_{k.upper()}": v for k, v in lab.items()},
        SANDBOX_TEMPLATES_DIR=str(TEMPLATES),
        SANDBOX_MAX_LIVE_SANDBOXES_PER_KEY="100",
        SANDBOX_CREATES_PER_MINUTE="200",
        SANDBOX_MAX_PENDING_CREATES="100",
        SANDBOX_WARN_BEFORE="0",
        SANDBOX_STACK_RESERVE="0",
        SANDBOX_REAP_INTERVAL="3",
        SANDBOX_SWARM_PLACEMENT_TIMEOUT="120",
    )
    engines = [Engine(env, tmp_path / f"engine-{i}.log") for i in (1, 2)]
    for engine in engines:
        engine.start()
    clients = [engine_http(e, key) for e in engines]
    # Both behind a Traefik of the test's own (the local edge's configuration, make run's).
    settings = Settings(
        state_dir=tmp_path / "edge",
        edge_port=_free_port(),
        edge_ping_port=_free_port(),
        listen_port=engines[0].port,
        edge_engines=f"http://127.0.0.1:{engines[1].port}",
    )
    edge = Edge(settings)
    edge.start()
    front = httpx.Client(
        base_url=edge.url,
        headers={"Host": f"api.{settings.domain}", "X-API-Key": key},
        timeout=120,
    )
    ids: list[str] = []
    try:
        # Thirty at once, through the edge, which balances them across both.
        def create(i: int) -> str:
            made = front.post("/api/v1/sandboxes", json={"template": "tiny"})
            assert made.status_code == 202, made.text
            return str(made.json()["id"])

        t0 = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            ids = list(pool.map(create, range(CREATES)))
        assert len(set(ids)) == CREATES
        bodies = _settle(clients[1], ids)
        took = time.monotonic() - t0
        states = collections.Counter(b["state"] for b in bodies.values())
        assert states == {"running": CREATES}, {s: b.get("error") for s, b in bodies.items()}
        nodes = collections.Counter(backend.node_of(f"sbx-{s}-workspace") for s in ids)
        print(f"{CREATES} creates through two engines: all running in {took:.1f} s; {nodes}")
        # None made twice: one service and one network per sandbox, one task running each.
        for sid in ids:
            objects = backend.objects(sid)
            assert sum(o.startswith("service ") for o in objects) == 1, objects
            assert sum(o.startswith("network ") for o in objects) == 1, objects
        # Both engines took creates (their access logs) and each sees every sandbox.
        took_creates = [
            e.log.read_text().count('"POST /api/v1/sandboxes HTTP/1.1" 202') for e in engines
        ]
        assert sum(took_creates) == CREATES and min(took_creates) > 0, took_creates
        workers = {b["id"]: b for b in _states(clients[0], ids).values()}
        assert len(workers) == CREATES
        # Both serve terminals, of sandboxes either made (the task's node, over TLS).
        for i, engine in enumerate(engines):
            sid = ids[i]
            token = clients[i].post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
            url = f"ws://127.0.0.1:{engine.port}/api/v1/ws/terminal/{sid}?token={token}"
            asyncio.run(_echo(url, f"engine-{i + 1}"))
        print(f"creates taken by each engine through the edge: {took_creates}")

        # Engine 1 killed while creates it took are in flight.
        more = [clients[0].post("/api/v1/sandboxes", json={"template": "tiny"}) for _ in range(3)]
        assert all(m.status_code == 202 for m in more), [m.text for m in more]
        mid = [str(m.json()["id"]) for m in more]
        ids += mid
        time.sleep(3)  # their stacks are being brought up
        engines[0].kill9()
        settled = _settle(clients[1], mid, timeout=600)
        for sid, body in settled.items():
            # Finished or failed and cleaned by the other engine: never left half-made.
            assert body["state"] in ("running", "failed"), body
            if body["state"] == "failed":
                assert backend.objects(sid) == [], (sid, backend.objects(sid))
        print("after a SIGKILL mid-create:", {s: b["state"] for s, b in settled.items()})
    finally:
        for sid in ids:
            clients[1].delete(f"/api/v1/sandboxes/{sid}")
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            left = [
                s
                for s, b in _states(clients[1], ids).items()
                if b["state"] not in ("destroyed", "failed", "expired")
            ]
            if not left:
                break
            for sid in left:  # those that were still creating when asked
                clients[1].delete(f"/api/v1/sandboxes/{sid}")
            time.sleep(3)
        for c in (*clients, front):
            c.close()
        edge.stop()
        for e in engines:
            e.stop()
    leftovers = {sid: backend.objects(sid) for sid in ids}
    assert not any(leftovers.values()), {s: o for s, o in leftovers.items() if o}
