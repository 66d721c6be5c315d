"""50 creates at once against an engine bounded to a few: every request ends running or is
refused with 429/503 and Retry-After; nothing is lost, duplicated or left behind."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import httpx
import psycopg

from engine.backend.docker import engine_objects
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import serve

ROOT = Path(__file__).resolve().parent.parent
LIVE = ROOT / "tests" / "fixtures" / "live-templates"
KEYS, PER_KEY, PENDING = 10, 5, 6


async def _burst(address: str, keys: list[str]) -> list[tuple[str, httpx.Response]]:
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=60) as http:

        async def one(key: str) -> tuple[str, httpx.Response]:
            answer = await http.post(
                "/api/v1/sandboxes", json={"template": "web"}, headers={"X-API-Key": key}
            )
            return key, answer

        return await asyncio.gather(*(one(k) for k in keys for _ in range(PER_KEY)))


def test_fifty_creates_at_once_end_running_or_refused(database: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}",
        templates_dir=LIVE,
        max_live_sandboxes_per_key=1,
        max_pending_creates=PENDING,
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        keys = [create_client(conn, name=f"k{i}", role=Role.MEMBER)[1] for i in range(KEYS)]
        instance = str(conn.execute("SELECT id FROM engine_instance").fetchone()[0])
    with serve(settings) as address, httpx.Client(base_url=f"http://{address}") as http:
        t0 = time.monotonic()
        answers = asyncio.run(_burst(address, keys))
        burst = time.monotonic() - t0
        codes = collections.Counter(a.status_code for _, a in answers)
        accepted = {a.json()["id"]: key for key, a in answers if a.status_code == 202}
        assert set(codes) <= {202, 429, 503}, codes
        assert codes[202] == len(accepted) and 1 <= len(accepted) <= PENDING, codes
        for _, a in answers:
            if a.status_code != 202:
                assert a.headers["content-type"] == "application/problem+json"
                assert int(a.headers["retry-after"]) > 0
        assert len(set(accepted.values())) == len(accepted)  # one per key: the quota held

        deadline = time.monotonic() + 240
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {
                sid: http.get(f"/api/v1/sandboxes/{sid}", headers={"X-API-Key": key}).json()[
                    "state"
                ]
                for sid, key in accepted.items()
            }
            if all(s == "running" for s in states.values()):
                break
            assert "failed" not in states.values(), states
            time.sleep(0.5)
        ready = time.monotonic() - t0
        assert all(s == "running" for s in states.values()), states
        with psycopg.connect(database) as conn:
            rows = {r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()}
        assert rows == set(accepted)  # a row for each accepted create, none for a refused one
        objects = engine_objects(instance)
        assert set(objects) == set(accepted)  # Docker objects of accepted sandboxes only
        print(
            f"load: {len(answers)} creates at once in {burst:.2f} s: "
            f"{codes[202]} accepted (all running after {ready:.1f} s), {codes[503]} x 503 busy, "
            f"{codes[429]} x 429 over quota; rows {len(rows)}, sandboxes in Docker {len(objects)}"
        )

        for sid, key in accepted.items():
            assert http.delete(f"/api/v1/sandboxes/{sid}", headers={"X-API-Key": key}).is_success
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with psycopg.connect(database) as conn:
                live = conn.execute(
                    "SELECT count(*) FROM sandboxes WHERE state <> 'destroyed'"
                ).fetchone()
            if live == (0,):
                break
            time.sleep(0.5)
        assert live == (0,)
        assert not engine_objects(instance)
        assert not any(
            (settings.stack_config_path / f"Pulumi.sbx-{sid}.yaml").exists() for sid in accepted
        )
