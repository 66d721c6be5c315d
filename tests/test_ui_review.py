"""A reviewer in a real browser (Debian's Chromium through Playwright, as tests/test_ui.py):
a session typed over the terminal WebSocket is listed on the sandbox's page and replays at 8x
in the player; the candidate's page says the session is recorded; the candidate's Claude Code
conversation (the real CLI, through the AI gateway) reads on the sandbox's page with its
usage, prompt, tool call and result, and answer."""

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
from pydantic import SecretStr

from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.ai_upstream import serving
from tests.api_server import Terminal, running_sandbox, serve
from tests.conftest import ROOT, remove_labelled
from tests.gateway_lock import gateway_port
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


@pytest.fixture
def with_claude(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An engine serving the AI gateway (to the stand-in upstream) and a running sandbox."""
    if not (ROOT / "web" / "dist" / "index.html").is_file():
        pytest.fail("the web UI is not built: make web")
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="reviewer", role=Role.MEMBER)
    with gateway_port() as port, serving() as (upstream_url, _):
        settings = Settings(
            database_url=database,
            pulumi_backend_url=f"file://{tmp_path}",
            templates_dir=LIVE,
            reap_interval=0,
            gateway_serve=True,
            gateway_port=port,
            anthropic_upstream=upstream_url,
            anthropic_api_key=SecretStr("sk-ant-api03-ui-test"),
        )
        try:
            with serve(settings) as address, running_sandbox(address, key, "web") as sid:
                yield {"url": f"http://{address}", "key": key, "sid": sid}
        finally:
            with psycopg.connect(database) as conn:
                for (sandbox_id,) in conn.execute("SELECT id FROM sandboxes").fetchall():
                    remove_labelled(sandbox_id)


def test_a_reviewer_reads_the_candidate_s_ai_transcript(
    with_claude: dict[str, Any],
    browser: Any,  # noqa: F811
    docker_client: Any,
) -> None:
    sid, key = with_claude["sid"], with_claude["key"]
    with httpx.Client(base_url=with_claude["url"], headers={"X-API-Key": key}) as http:
        workspace = http.get(f"/api/v1/sandboxes/{sid}").json()["workspace"]
    said = docker_client.containers.get(workspace).exec_run(
        ["bash", "-lc", "cd ~/workspace && claude -p 'Please RUN: echo reviewed-$((6*7))'"
         " --allowedTools Bash"],
        user="coder",
    )  # fmt: skip
    assert said.exit_code == 0 and b"The tool said: reviewed-42" in said.output, said.output

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(with_claude["url"])
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator(f"tr[data-sandbox='{sid}']").wait_for()
    page.goto(f"{with_claude['url']}/sandboxes/{sid}")
    section = page.get_by_label("AI transcript")
    section.locator("[data-kind='answer']").filter(has_text="The tool said").wait_for(
        timeout=20_000
    )
    text = section.inner_text()
    assert "of 2,000,000 tokens" in text, text
    assert "Please RUN: echo reviewed-$((6*7))" in text  # the candidate's prompt
    assert "echo reviewed-$((6*7))" in section.locator("[data-kind='tool_use']").inner_text()
    assert "reviewed-42" in section.locator("[data-kind='tool_result']").inner_text()
    kinds = section.locator("[data-kind]").evaluate_all(
        "nodes => nodes.map(n => n.getAttribute('data-kind'))"
    )
    assert kinds.index("prompt") < kinds.index("tool_use") < kinds.index("tool_result")
    assert kinds.index("tool_result") < len(kinds) - 1 - kinds[::-1].index("answer")

    page.screenshot(path=SHOTS / "ai-transcript.png", full_page=True)
    context.close()
