"""Terminal recordings, watching and terminal activity: pure parts (submit detection, idle
periods, retention, the asciicast writer), then one real sandbox driven over the WebSocket:
a recorded session replays to the live screen, input is recorded only when the template says
so, a watcher sees the session and cannot type into it, a candidate's token can neither
download nor watch."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pyte
import pytest
import websockets

from engine import tokens
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from engine.terminal import recordings
from engine.terminal.recordings import Activity, Recorder, RecordingRow, find_submits
from tests.api_server import Terminal, running_sandbox, serve
from tests.conftest import ROOT, remove_labelled

FIXTURE = ROOT / "tests" / "fixtures" / "recording-templates" / "recorded.yaml"
SUBMIT = b"\x1b]1337;SandboxSubmit\x07"

# --- pure --------------------------------------------------------------------------------------


def _submits(chunks: list[bytes]) -> int:
    tail, total = b"", 0
    for chunk in chunks:
        found, tail = find_submits(tail, chunk)
        total += found
    return total


def test_submit_is_found_whole_split_repeated_and_not_invented() -> None:
    assert _submits([b"before " + SUBMIT + b" after"]) == 1
    for cut in range(1, len(SUBMIT)):  # split at every byte
        assert _submits([b"x" * 5 + SUBMIT[:cut], SUBMIT[cut:] + b"y"]) == 1, cut
    assert _submits([SUBMIT[:3], SUBMIT[3:9], SUBMIT[9:] + SUBMIT, SUBMIT[:10], SUBMIT[10:]]) == 3
    assert _submits([b"ls\r\n", b"\x1b]1337;SandboxSubmi", b"t\x1b\\", SUBMIT[1:]]) == 0
    assert _submits([]) == 0


def test_idle_periods_end_with_activity_or_at_close() -> None:
    activity = Activity(300, now=1000.0)
    assert activity.touch(1100.0) is None
    assert activity.touch(1500.0) == (1100.0, 1500.0)  # 400 s without input or output
    assert activity.closing(1600.0) is None
    assert activity.closing(1900.0) == (1500.0, 1900.0)
    start = datetime(2026, 1, 5, 12, 1, tzinfo=UTC).timestamp()
    assert recordings.idle_message(start, start + 420) == "idle 7 min: 12:01\u201312:08 UTC"


def _row(started: datetime, ended: datetime | None) -> RecordingRow:
    return RecordingRow(
        "0" * 16, "sbx1", None, "candidate", "candidate", started, ended, 80, 24, 0, False
    )


def test_retention_counts_from_the_sessions_end() -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    keep = timedelta(days=30)
    old, recent = now - timedelta(days=40), now - timedelta(days=5)
    assert recordings.past_retention(_row(old, old + timedelta(hours=1)), now, keep)
    assert not recordings.past_retention(_row(old, recent), now, keep)  # ended lately
    assert not recordings.past_retention(_row(recent, None), now, keep)
    assert recordings.past_retention(_row(old, None), now, keep)  # its engine died


def test_the_writer_decodes_split_characters_and_flushes(tmp_path: Path) -> None:
    async def record() -> tuple[str, int]:
        clock = iter([100.0])
        recorder = Recorder(
            tmp_path / "s" / "r.cast", title="t", record_input=False, clock=lambda: next(clock)
        )
        recorder.start()
        recorder.resize(120, 40, 100.1)
        recorder.output("caf\u00e9 \u2713".encode()[:4], 100.2)  # "caf" and half of "é"
        recorder.output("caf\u00e9 \u2713".encode()[4:], 100.3)
        recorder.input(b"secret\r", 100.4)
        await asyncio.sleep(recordings.FLUSH_EVERY + 0.5)
        flushed = (tmp_path / "s" / "r.cast").read_text()
        size = await recorder.close(101.0)
        return flushed, size

    flushed, size = asyncio.run(record())
    lines = (tmp_path / "s" / "r.cast").read_text().splitlines()
    assert flushed.splitlines() == lines  # on disk within a second, before the close
    assert size == (tmp_path / "s" / "r.cast").stat().st_size
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (120, 40)
    events = [json.loads(line) for line in lines[1:]]
    assert events[0] == [0.1, "r", "120x40"]
    assert "".join(e[2] for e in events if e[1] == "o") == "caf\u00e9 \u2713"
    assert not [e for e in events if e[1] == "i"]


def test_prune_deletes_rows_and_files_past_retention(module_database: str, tmp_path: Path) -> None:
    migrate(module_database)
    now = datetime.now(UTC)
    with psycopg.connect(module_database, autocommit=True) as conn:
        for rid, ended in (("a" * 16, now - timedelta(days=31)), ("b" * 16, now)):
            conn.execute(
                "INSERT INTO recordings (id, sandbox_id, role, client, started_at, ended_at,"
                " width, height, has_input) VALUES (%s, 'prune0001', 'candidate', 'candidate',"
                " %s, %s, 80, 24, false)",
                (rid, ended - timedelta(hours=1), ended),
            )
            path = recordings.recording_path(tmp_path, "prune0001", rid)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        with conn.transaction():
            pruned = recordings.prune(conn, root=tmp_path, now=now, retention=timedelta(days=30))
        left = [
            r[0] for r in conn.execute("SELECT id FROM recordings WHERE sandbox_id = 'prune0001'")
        ]
        conn.execute("DELETE FROM recordings WHERE sandbox_id = 'prune0001'")
    assert pruned == 1 and left == ["b" * 16]
    assert sorted(p.stem for p in (tmp_path / "prune0001").iterdir()) == ["b" * 16]


# --- a real sandbox ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    templates = tmp_path_factory.mktemp("templates")
    shutil.copy(FIXTURE, templates / "recorded.yaml")
    settings = Settings(
        database_url=module_database,
        pulumi_backend_url=f"file://{tmp_path_factory.mktemp('pulumi-state')}",
        templates_dir=templates,
        recordings_dir=tmp_path_factory.mktemp("recordings"),
        idle_after=1,
        reap_interval=0,
    )
    migrate(module_database)
    with psycopg.connect(module_database, autocommit=True) as conn:
        keys = {
            name: create_client(conn, name=name, role=role)[1]
            for name, role in (("alice", Role.MEMBER), ("bob", Role.MEMBER), ("root", Role.ADMIN))
        }
    try:
        with serve(settings) as address, running_sandbox(address, keys["alice"], "recorded") as sid:
            token = tokens.issue(
                tokens.secret_key(settings), sid, datetime.now(UTC) + timedelta(hours=1)
            )
            yield {
                "address": address,
                "keys": keys,
                "sid": sid,
                "token": token,
                "templates": templates,
                "recordings": settings.recordings_path,
            }
    finally:  # a failed test may have left a sandbox running
        with psycopg.connect(module_database) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
        for sandbox_id in ids:
            remove_labelled(sandbox_id)
            (settings.stack_config_path / f"Pulumi.sbx-{sandbox_id}.yaml").unlink(missing_ok=True)


def _tmux(sid: str, *command: str) -> str:
    client = docker.from_env(timeout=30)
    try:
        container = client.containers.get(f"sbx-{sid}-workspace")
        result = container.exec_run(["tmux", *command], user="coder")
        assert result.exit_code == 0, result.output
        return str(result.output.decode())
    finally:
        client.close()


def _replay(cast: str) -> list[str]:
    """The screen a terminal emulator shows after the whole recording, line by line."""
    lines = cast.splitlines()
    header = json.loads(lines[0])
    screen = pyte.Screen(header["width"], header["height"])
    stream = pyte.Stream(screen)
    for line in lines[1:]:
        _, code, data = json.loads(line)
        if code == "o":
            stream.feed(data)
        elif code == "r":
            cols, rows = (int(n) for n in data.split("x"))
            screen.resize(rows, cols)
    return _trimmed(screen.display)


def _trimmed(lines: list[str]) -> list[str]:
    out = [line.rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def _http(world: dict, credential: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://{world['address']}",
        headers={"Authorization": f"Bearer {credential}"},
        timeout=60,
    )


def test_a_session_is_recorded_watched_and_replayed(world: dict[str, Any]) -> None:
    sid, keys = world["sid"], world["keys"]
    base = f"ws://{world['address']}/api/v1/ws/terminal/{sid}"

    async def sessions() -> None:
        async with (
            websockets.connect(f"{base}?token={keys['alice']}") as a,
            websockets.connect(f"{base}?token={keys['root']}&mode=watch") as w,
        ):
            member, watcher = Terminal(a), Terminal(w)
            await member.resize(100, 30)
            await member.type("clear; echo caf\u00e9-$((6*7)); seq 3\r")
            await member.expect("caf\u00e9-42")
            await watcher.expect("caf\u00e9-42")  # the watcher sees the session live
            await watcher.resize(40, 10)  # its own size only
            await watcher.type("echo WATCHER-TYPED-$((1+1))\r")
            await w.send(json.dumps({"not": "a resize"}))
            await asyncio.sleep(1.5)  # idle (idle_after is 1 s in this module)
            await member.type("echo after-idle\r")
            await member.expect("after-idle\r\n")
            await asyncio.sleep(0.5)
            live = _tmux(sid, "capture-pane", "-p", "-t", "main")
            size = _tmux(
                sid, "display-message", "-p", "-t", "main", "#{window_width}x#{window_height}"
            )
            assert size.strip() == "100x30"  # the watcher's resize changed nothing
            assert "WATCHER-TYPED" not in live and b"WATCHER-TYPED-2" not in member.seen
            world["live"] = _trimmed(live.splitlines())

        # A candidate's session, its keystrokes not recorded (the template says so now).
        path = world["templates"] / "recorded.yaml"
        path.write_text(path.read_text().replace("input: true", "input: false"))
        async with websockets.connect(f"{base}?token={world['token']}") as c:
            candidate = Terminal(c)
            await candidate.type("echo no-input-$((7*6))\r")
            await candidate.expect("no-input-42")

    asyncio.run(sessions())
    with _http(world, keys["alice"]) as http:
        deadline = time.monotonic() + 15
        while True:  # the server ends a session just after its client has left
            listed = http.get(f"/api/v1/sandboxes/{sid}/recordings")
            assert listed.status_code == 200, listed.text
            items = listed.json()["items"]
            if all(i["ended_at"] for i in items) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # Two recordings: the member's and the candidate's; the watch session is not recorded.
        assert [(i["role"], i["client"], i["has_input"]) for i in items] == [
            ("candidate", "candidate", False),
            ("member", "alice", True),
        ]
        assert all(i["ended_at"] and i["bytes"] > 0 for i in items)
        casts = []
        for item in items:
            got = http.get(item["download"])
            assert got.status_code == 200
            assert got.headers["content-type"] == "application/x-asciicast"
            assert got.headers["content-disposition"].startswith("attachment")
            assert len(got.content) == item["bytes"]
            casts.append(got.text)
        events = http.get(f"/api/v1/sandboxes/{sid}/events").text
    candidate_cast, member_cast = casts

    # The member's recording replays to the screen the live session showed.
    assert _replay(member_cast) == world["live"]
    assert any("caf\u00e9-42" in line for line in world["live"])
    inputs = [json.loads(line)[2] for line in member_cast.splitlines()[1:] if '"i"' in line]
    assert "".join(inputs).startswith("clear; echo caf\u00e9")
    assert not [line for line in candidate_cast.splitlines()[1:] if json.loads(line)[1] == "i"]
    assert "no-input-42" in candidate_cast

    # Terminal activity, as events.
    terminal = [
        json.loads(line[6:])["message"] for line in events.splitlines() if '"terminal"' in line
    ]
    assert "connected: alice" in terminal and "connected: root (watch)" in terminal
    assert "connected: candidate" in terminal
    assert any(m.startswith("idle 1 s: ") or m.startswith("idle 2 s: ") for m in terminal), terminal
    assert any(m.startswith("disconnected: candidate after ") for m in terminal), terminal
    assert any(m.startswith("disconnected: root (watch) after ") for m in terminal), terminal


def test_who_may_read_recordings_and_watch(world: dict[str, Any]) -> None:
    sid, keys = world["sid"], world["keys"]
    path = f"/api/v1/sandboxes/{sid}/recordings"
    for who, status in (("bob", 404), ("root", 200)):
        with _http(world, keys[who]) as http:
            assert http.get(path).status_code == status, who
    with _http(world, world["token"]) as http:
        assert http.get(path).status_code == 401  # a token is not a key
        assert http.get(f"{path}/{'0' * 16}").status_code == 401
    with _http(world, keys["alice"]) as http:
        assert http.get(f"{path}/{'0' * 16}").status_code == 404

    async def watch(credential: str) -> int:
        url = f"ws://{world['address']}/api/v1/ws/terminal/{sid}?token={credential}&mode=watch"
        try:
            async with websockets.connect(url) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else 1006
        return 0

    assert asyncio.run(watch(world["token"])) == 4403
    assert asyncio.run(watch(keys["bob"])) == 4404


def test_the_candidate_page_says_the_terminal_is_recorded(world: dict[str, Any]) -> None:
    with httpx.Client(base_url=f"http://{world['address']}") as http:
        view = http.get(f"/api/v1/access/{world['token']}").json()
    assert view["recorded"] is True


def test_a_recording_that_cannot_be_written_refuses_the_terminal_plainly(
    world: dict[str, Any],
) -> None:
    """A recorded template's session does not go on unrecorded: when its file cannot be made
    (here a file holds the recordings folder's name), the terminal is closed with 1011 and a
    reason the user can pass on, and its tmux client does not stay attached."""
    folder: Path = world["recordings"]
    aside = folder.with_name(folder.name + "-aside")
    url = f"ws://{world['address']}/api/v1/ws/terminal/{world['sid']}?token={world['token']}"

    async def refused() -> tuple[int, str]:
        try:
            async with websockets.connect(url) as ws:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason

    folder.rename(aside)
    folder.write_text("in the way")
    try:
        code, reason = asyncio.run(refused())
    finally:
        folder.unlink()
        aside.rename(folder)
    assert (code, reason) == (1011, "this session is recorded and its recording cannot be written")
    deadline = time.monotonic() + 30
    while _tmux(world["sid"], "list-clients").strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tmux(world["sid"], "list-clients").strip() == ""
