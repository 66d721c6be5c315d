"""The browser UI end to end: Debian's headless Chromium, driven by Playwright, against a real
engine (API server, PostgreSQL, dockerd, Pulumi). Screenshots of each screen are written to
$SANDBOX_SCREENSHOTS_DIR (default .state/screenshots; docs/ui/ holds the committed set)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import serve
from tests.conftest import ROOT, remove_labelled

CHROMIUM = Path("/usr/bin/chromium")
# Flags for a closed network: no background calls home, no QUIC, a throwaway profile.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("SANDBOX_SCREENSHOTS_DIR", ROOT / ".state" / "screenshots"))
LIVE = ROOT / "tests" / "fixtures" / "live-templates"


@pytest.fixture
def engine(database: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if not (ROOT / "web" / "dist" / "index.html").is_file():
        pytest.fail("the web UI is not built: make web")
    settings = Settings(
        database_url=database, pulumi_backend_url=f"file://{tmp_path}", templates_dir=LIVE
    )
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        _, key = create_client(conn, name="trainer", role=Role.MEMBER)
    try:
        with serve(settings) as address:
            yield {"url": f"http://{address}", "key": key}
    finally:
        with psycopg.connect(database) as conn:
            for (sid,) in conn.execute("SELECT id FROM sandboxes").fetchall():
                remove_labelled(sid)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: deploy/local/packages.sh installs Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: make venv")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield browser
        browser.close()


def terminal_text(page: Any) -> str:
    return str(page.locator(".xterm-rows").inner_text())


def wait_terminal(page: Any, pattern: str, timeout: float = 20) -> re.Match[str]:
    """Wait until the terminal's screen shows ``pattern`` (a regex) on a line of its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, terminal_text(page), re.MULTILINE)
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not on the terminal:\n{terminal_text(page)[-800:]}")


def type_line(page: Any, text: str) -> None:
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def test_a_trainer_and_a_candidate_in_a_real_browser(engine: dict[str, Any], browser: Any) -> None:
    trainer = browser.new_context(viewport={"width": 1280, "height": 800})
    page = trainer.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(engine["url"])

    # Sign in (a wrong key first: the API's reason is shown).
    page.get_by_label("API key").fill("sek_wrong")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").wait_for()
    assert "revoked" in page.get_by_role("alert").inner_text()
    page.screenshot(path=SHOTS / "sign-in.png")
    page.get_by_label("API key").fill(engine["key"])
    page.get_by_role("button", name="Sign in").click()

    # Templates, with a preview of what a sandbox would create.
    card = page.get_by_label("Template web")
    card.wait_for()
    assert "8000 (public)" in card.inner_text()
    page.get_by_text("No sandboxes yet").wait_for()
    card.get_by_role("button", name="Preview").click()
    page.get_by_label("Preview of web").wait_for(timeout=60_000)
    assert "docker:index/container:Container" in page.get_by_label("Preview of web").inner_text()
    page.screenshot(path=SHOTS / "templates-and-preview.png", full_page=True)

    # Create, with live progress, until the list says running.
    card.get_by_role("button", name="Create sandbox").click()
    progress = page.locator(".progress")
    progress.get_by_text("end state running").wait_for(timeout=120_000)
    assert "create docker:index/container:Container" in progress.inner_text()
    sid = progress.locator("a").inner_text()
    row = page.locator(f"tr[data-sandbox='{sid}']")
    row.get_by_text("running", exact=True).wait_for(timeout=10_000)
    assert "trainer" in row.inner_text()
    page.screenshot(path=SHOTS / "dashboard.png", full_page=True)

    # The terminal: type, see it echoed; resize the window, see stty follow.
    row.get_by_role("link", name=sid).click()
    page.get_by_text("connected", exact=True).wait_for(timeout=30_000)
    assert "Expires in" in page.locator(".banner").inner_text()
    type_line(page, "export MARK=same-shell-42; echo hi-from-$((6*7))-browser")
    wait_terminal(page, r"^hi-from-42-browser\s*$")
    type_line(page, "echo first=$(stty size)")
    first = wait_terminal(page, r"^first=(\d+) (\d+)\s*$")
    page.set_viewport_size({"width": 900, "height": 560})
    time.sleep(1)
    type_line(page, "echo second=$(stty size)")
    second = wait_terminal(page, r"^second=(\d+) (\d+)\s*$")
    rows1, cols1 = int(first[1]), int(first[2])
    rows2, cols2 = int(second[1]), int(second[2])
    assert cols2 < cols1 and rows2 < rows1, (first[0], second[0])
    page.screenshot(path=SHOTS / "terminal.png")

    # A candidate link, opened in a fresh context (no key): straight into the same shell.
    page.go_back()
    row = page.locator(f"tr[data-sandbox='{sid}']")
    row.get_by_role("button", name="Candidate link").click()
    link = page.get_by_label(f"Candidate link for {sid}").input_value()
    assert re.search(r"/s/sat_", link), link
    candidate = browser.new_context(viewport={"width": 1100, "height": 700})
    cpage = candidate.new_page()
    cpage.goto(link)
    cpage.get_by_text("connected", exact=True).wait_for(timeout=30_000)
    assert cpage.get_by_text("Sign out").count() == 0  # no other UI
    type_line(cpage, "clear; echo mark=$MARK")
    wait_terminal(cpage, r"^mark=same-shell-42\s*$")
    cpage.screenshot(path=SHOTS / "candidate.png")
    candidate.close()

    # Delete it from the list; the list explains what happened.
    row.get_by_role("button", name="Delete").click()
    row.get_by_text("destroyed", exact=True).wait_for(timeout=120_000)
    assert "destroyed on request" in row.inner_text()
    page.screenshot(path=SHOTS / "deleted.png", full_page=True)
    trainer.close()


def test_a_bad_candidate_link_says_so(engine: dict[str, Any], browser: Any) -> None:
    page = browser.new_page()
    page.goto(f"{engine['url']}/s/sat_nothing.1.abc")
    page.get_by_role("alert").wait_for()
    assert "not valid" in page.get_by_role("alert").inner_text()
    page.close()


def test_docs_reference_every_screenshot() -> None:
    doc = (ROOT / "docs" / "ui.md").read_text()
    for name in (
        "sign-in",
        "templates-and-preview",
        "dashboard",
        "terminal",
        "candidate",
        "deleted",
    ):
        assert f"ui/{name}.png" in doc
        assert (ROOT / "docs" / "ui" / f"{name}.png").is_file()
    assert shutil.which("npm"), "npm builds the UI"


def test_the_api_serves_the_ui_and_keeps_its_own_paths(engine: dict[str, Any]) -> None:
    import httpx

    with httpx.Client(base_url=engine["url"]) as http:
        index = http.get("/")
        assert index.status_code == 200 and '<div id="root">' in index.text
        assert index.headers["cache-control"] == "no-cache"
        # The UI's own paths load the same page; it routes itself.
        assert http.get("/s/sat_anything").text == index.text
        assert http.get("/sandboxes/abc123").text == index.text
        asset = re.search(r'src="(/assets/[^"]+\.js)"', index.text)
        assert asset, index.text
        built = http.get(asset[1])
        assert built.status_code == 200 and "immutable" in built.headers["cache-control"]
        # API paths stay the API's: a problem, not the page.
        missing = http.get("/api/v1/nothing")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        bad = http.get("/api/v1/access/sat_nothing.1.abc")
        assert bad.status_code == 404 and "not valid" in bad.json()["detail"]
        # Nothing outside web/dist is served.
        assert "[project]" not in http.get("/../pyproject.toml").text
