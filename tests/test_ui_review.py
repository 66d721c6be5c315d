"""A reviewer in a real browser (Debian's Chromium through Playwright, as tests/test_ui.py):
a session typed over the terminal WebSocket is listed on the sandbox's page and replays at 8x
in the player; the candidate's page says the session is recorded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import websockets

from engine.migrate import migrate
from engine.settings import Settings
from engine.stacks import remove_labelled
from engine.store import Role, create_client
from tests.api_server import Terminal, running_sandbox, serve
from tests.conftest import ROOT
from tests.test_ui import LIVE, SHOTS, browser  # noqa: F401  (the browser fixture)


@pytest.fixture
def reviewed(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An engine with a running sandbox of the live test template (recorded by default)."""
    if not (ROOT / "web" / "dist" / "index.html").is_file():
        pytest.fail("the web UI is not built: make web")
    settings = Settings(
        database_url=database,
        pulumi_backend_url=f"file://{tmp_path}",
        templates_dir=LIVE,
        recordings_dir=tmp_path / "recordings",
        reap_interval=0,
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="reviewer", role=Role.MEMBER)
    try:
        with serve(settings) as address, running_sandbox(address, key, "web") as sid:
            yield {"address": address, "url": f"http://{address}", "key": key, "sid": sid}
    finally:
        with psycopg.connect(database) as conn:
            for (sandbox_id,) in conn.execute("SELECT id FROM sandboxes").fetchall():
                remove_labelled(sandbox_id)


def _type_a_session(address: str, sid: str, key: str) -> None:
    async def session() -> None:
        url = f"ws://{address}/api/v1/ws/terminal/{sid}?token={key}"
        async with websockets.connect(url) as ws:
            term = Terminal(ws)
            await term.type("clear; for i in 1 2 3; do echo replayed-$((i*14)); sleep 0.3; done\r")
            await term.expect("replayed-42")

    # On a thread of its own: Playwright's sync API keeps an event loop running on this one.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, session()).result()


def test_a_reviewer_replays_a_session_at_8x(reviewed: dict[str, Any], browser: Any) -> None:  # noqa: F811
    sid, key = reviewed["sid"], reviewed["key"]
    _type_a_session(reviewed["address"], sid, key)
    with httpx.Client(base_url=reviewed["url"], headers={"X-API-Key": key}) as http:
        deadline = time.monotonic() + 15
        while not all(
            r["ended_at"] for r in http.get(f"/api/v1/sandboxes/{sid}/recordings").json()["items"]
        ):
            assert time.monotonic() < deadline, "the session never ended"
            time.sleep(0.2)
        link = http.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["url"]

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(reviewed["url"])
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("No sandboxes yet").or_(page.locator(f"tr[data-sandbox='{sid}']")).wait_for()
    page.goto(f"{reviewed['url']}/sandboxes/{sid}")

    recordings = page.get_by_label("Recordings")
    finished = recordings.locator("li").filter(has_not_text="in progress")
    finished.first.wait_for(timeout=15_000)
    assert "reviewer (member)" in finished.first.inner_text()
    finished.first.get_by_role("button", name="Replay").click()
    page.get_by_role("button", name="8\u00d7").click()
    player = page.get_by_test_id("player")
    deadline = time.monotonic() + 20
    while "replayed-42" not in player.inner_text():
        assert time.monotonic() < deadline, f"not replayed:\n{player.inner_text()[-600:]}"
        time.sleep(0.2)
    assert "replayed-14" in player.inner_text()
    assert page.get_by_role("button", name="8\u00d7").get_attribute("aria-pressed") == "true"
    page.screenshot(path=SHOTS / "replay.png", full_page=True)

    # The candidate's page says the session is recorded (the template's recording.notice).
    candidate = browser.new_context(viewport={"width": 1100, "height": 700})
    cpage = candidate.new_page()
    cpage.goto(f"{reviewed['url']}{link}")
    cpage.get_by_text("This session is recorded").wait_for(timeout=15_000)
    candidate.close()
    context.close()
