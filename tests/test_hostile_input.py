"""Hostile input: template files (pure) and the terminal WebSocket (a real sandbox)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import websockets

from api.terminal import MAX_FRAME
from engine.errors import NotFoundError, TemplateError
from engine.migrate import migrate
from engine.model.templates import MAX_FILE_BYTES, find, load, load_all
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import Terminal, running_sandbox, serve
from tests.conftest import remove_labelled

GOOD = "name: task\nbase_image: workspace-base:latest\nttl: 1h\n"
# Nine levels of ten: a billion "lol"s once expanded.
LAUGHS = 'l0: &l0 "lol"\n' + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (LAUGHS, 1, "anchors and aliases"),
        (GOOD + LAUGHS, 4, "anchors and aliases"),
        (GOOD + "env: &e {A: b}\nworkspace: *e\n", 4, "anchors and aliases"),
        ("[" * 30_000 + "]" * 30_000, 1, "nested over 20 levels"),
        ("{a: " * 10_000 + "1" + "}" * 10_000, 1, "nested over 20 levels"),
        ("".join(f"{' ' * i}a{i}:\n" for i in range(100)), 21, "nested over 20 levels"),
        (GOOD + "ttl: !!python/object/apply:os.system [id]\n", 4, "not valid YAML"),
        ("\x00" + GOOD, 1, "not valid YAML"),
    ],
    ids=["laughs", "laughs-late", "alias", "flow-lists", "flow-maps", "block-maps", "tag", "nul"],
)
def test_hostile_yaml_is_refused_naming_file_and_line(
    tmp_path: Path, text: str, line: int | None, words: str
) -> None:
    file = tmp_path / "task.yaml"
    file.write_text(text)
    started = time.monotonic()
    with pytest.raises(TemplateError) as info:
        load(file)
    assert time.monotonic() - started < 2, "refusing took too long"
    assert words in str(info.value) and str(file) in str(info.value)
    if line is not None:
        assert f"{file}:{line}:" in str(info.value)


def test_huge_files_are_refused_without_being_read(tmp_path: Path) -> None:
    file = tmp_path / "task.yaml"
    with file.open("wb") as f:  # sparse: 4 GiB that costs no disk
        f.write(GOOD.encode())
        f.truncate(4 * 2**30)
    started = time.monotonic()
    with pytest.raises(TemplateError, match=f"limit of {MAX_FILE_BYTES} bytes"):
        load(file)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "name",
    [
        "../task",
        "../../etc/passwd",
        "/etc/passwd",
        "task/../task",
        "task\x00",
        "task\n",
        "task.yaml",
        ".task",
        "TASK",
        "",
        "t" * 41,
        "%2e%2e%2ftask",
    ],
)
def test_template_names_with_path_tricks_are_not_found(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "task.yaml").write_text(GOOD)
    (tmp_path / "task.yaml").write_text(GOOD)
    assert find(folder, "task").name == "task"
    with pytest.raises(NotFoundError):
        find(folder, name)


def test_links_out_of_the_folder_and_special_files_are_refused(tmp_path: Path) -> None:
    folder, outside = tmp_path / "templates", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (outside / "task.yaml").write_text(GOOD)
    (folder / "task.yaml").symlink_to(outside / "task.yaml")
    for attempt in (lambda: find(folder, "task"), lambda: load_all(folder)):
        with pytest.raises(TemplateError, match="outside the templates folder"):
            attempt()
    (folder / "task.yaml").unlink()
    os.mkfifo(folder / "task.yaml")  # reading it would wait for a writer forever
    with pytest.raises(TemplateError, match="not a regular file"):
        load_all(folder)


# --- the terminal WebSocket -------------------------------------------------------------------

FLOOD = 5000


@pytest.fixture(scope="module")
def terminal(
    module_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A server and one running sandbox of a member's."""
    state = tmp_path_factory.mktemp("pulumi-state")
    settings = Settings(database_url=module_database, pulumi_backend_url=f"file://{state}")
    migrate(module_database)
    with psycopg.connect(module_database, autocommit=True) as conn:
        _, key = create_client(conn, name="alice", role=Role.MEMBER)
    try:
        with serve(settings) as address, running_sandbox(address, key) as sandbox_id:
            url = f"ws://{address}/api/v1/ws/terminal/{sandbox_id}?token={key}"
            yield {"address": address, "url": url}
    finally:  # a failed test may have left a sandbox running
        with psycopg.connect(module_database) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
        for sid in ids:
            remove_labelled(sid)
            (settings.stack_config_path / f"Pulumi.sbx-{sid}.yaml").unlink(missing_ok=True)


async def _closed_with(ws: Any) -> int:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006


@pytest.mark.parametrize(
    "frame",
    [b"x" * (MAX_FRAME + 1), "y" * (MAX_FRAME + 1), b"z" * (4 * 2**20)],
    ids=["binary", "text", "4MiB"],
)
def test_oversized_frames_close_with_1009(terminal: dict[str, Any], frame: bytes | str) -> None:
    async def run() -> int:
        # The client's own limit is lifted: the server is what refuses.
        async with websockets.connect(terminal["url"], max_size=None) as ws:
            await Terminal(ws).type("echo ready\r")
            await ws.send(frame)
            return await _closed_with(ws)

    assert asyncio.run(run()) == 1009


async def _swallowed(t: Terminal, frame: bytes | str) -> None:
    """Send a frame to a `cat` (the shell's line editor redraws a 64 KiB line for minutes),
    then check the terminal still answers."""
    await t.type("cat >/dev/null\r")
    await asyncio.sleep(0.3)
    await t.ws.send(frame)
    await t.type("\r\x04echo after-$((6*7))\r")
    await t.expect("after-42", within=30)


def test_a_frame_at_the_limit_is_taken(terminal: dict[str, Any]) -> None:
    async def run() -> None:
        async with websockets.connect(terminal["url"]) as ws:
            await _swallowed(Terminal(ws), b"a" * MAX_FRAME)

    asyncio.run(run())


def test_a_flood_of_frames_leaves_the_terminal_and_the_api_answering(
    terminal: dict[str, Any],
) -> None:
    latencies: list[float] = []
    flooding = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=f"http://{terminal['address']}", timeout=30) as http:
            while flooding.is_set():
                started = time.monotonic()
                assert http.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    async def run() -> float:
        async with websockets.connect(terminal["url"]) as ws:
            t = Terminal(ws)
            # Output is read throughout, as a browser does; a reader that stops is the
            # transport's back-pressure to handle, not this test's.
            reader = asyncio.create_task(_drain(t))
            started = time.monotonic()
            for i in range(FLOOD):
                await ws.send(b": " + str(i).encode() + b"\r")
            elapsed = time.monotonic() - started
            reader.cancel()
            await t.type("echo flood-$((40+2))\r")
            await t.expect("flood-42", within=60)
            return elapsed

    flooding.set()
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        elapsed = asyncio.run(run())
    finally:
        flooding.clear()
        prober.join()
    worst = max(latencies)
    print(f"flood: {FLOOD} frames in {elapsed:.2f} s; /healthz {len(latencies)}x max {worst:.3f} s")
    assert latencies and worst < 1.0


async def _drain(t: Terminal) -> None:
    while True:
        message = await t.ws.recv()
        t.seen = (t.seen + (message if isinstance(message, bytes) else message.encode()))[-4096:]


@pytest.mark.parametrize(
    "resize",
    [
        {"cols": 10**9, "rows": 10**9},
        {"cols": 2**64, "rows": 40},
        {"cols": -1, "rows": 40},
        {"cols": 0, "rows": 0},
        {"cols": 80.5, "rows": 40},
        {"cols": "80", "rows": "40"},
        {"cols": True, "rows": True},
        {"cols": None, "rows": [40]},
        {"cols": 1001, "rows": 40},
    ],
    ids=["huge", "2**64", "negative", "zero", "float", "strings", "bools", "null-list", "1001"],
)
def test_absurd_resizes_are_ignored(terminal: dict[str, Any], resize: dict[str, Any]) -> None:
    async def run() -> None:
        async with websockets.connect(terminal["url"]) as ws:
            t = Terminal(ws)
            await t.resize(91, 37)
            await ws.send(json.dumps({"type": "resize", **resize}))
            await asyncio.sleep(0.3)
            await t.type("stty size\r")
            await t.expect("37 91")

    asyncio.run(run())


def test_nested_json_in_a_text_frame_is_typed_not_fatal(terminal: dict[str, Any]) -> None:
    async def run() -> None:
        async with websockets.connect(terminal["url"]) as ws:
            # Past the JSON parser's recursion limit: typed, as any text that is not a message.
            await _swallowed(Terminal(ws), "[" * 30_000 + "]" * 30_000)

    asyncio.run(run())
