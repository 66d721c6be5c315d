"""Workspace archives: an expired sandbox's work (a file and its git diff) is archived before
its destroy, a submit archives and reports once, an archive that cannot be made does not hold
the destroy, archives are for API keys only, and expired archives are deleted."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest
import websockets

from engine.backend.docker import DockerBackend
from engine.hiring.archives import Archiver, pack, take_expired
from engine.migrate import migrate
from engine.settings import Settings
from tests.api_server import Terminal, member_api
from tests.conftest import ROOT
from tests.provider_helpers import leftovers

TEMPLATES = ROOT / "tests" / "fixtures" / "archive-templates"


@pytest.fixture
def api(database: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An engine on a database of its own; ``reap_interval`` from the test's parameter, or
    a dict of settings."""
    given = request.param if isinstance(request.param, dict) else {"reap_interval": request.param}
    with member_api(database, tmp_path, TEMPLATES, **given) as http:
        yield http


def _create(http: httpx.Client) -> dict[str, Any]:
    created = http.post("/api/v1/sandboxes", json={"template": "archived"})
    assert created.status_code == 202, created.text
    return _wait(http, created.json()["id"], ("running",))


def _wait(http: httpx.Client, sid: str, states: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        body: dict[str, Any] = http.get(f"/api/v1/sandboxes/{sid}").json()
        if body["state"] in states:
            return body
        assert body["state"] != "failed", body
        time.sleep(0.3)
    raise AssertionError(f"{sid} never reached {states}")


def _events(http: httpx.Client, sid: str) -> list[str]:
    text = http.get(f"/api/v1/sandboxes/{sid}/events").text
    return [line for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("api", [1], indirect=True)
def test_an_expired_sandbox_is_archived_with_its_git_diff(
    api: httpx.Client, docker_client: docker.DockerClient
) -> None:
    sandbox = _create(api)
    sid = sandbox["id"]
    work = docker_client.containers.get(sandbox["workspace"])
    done = work.exec_run(
        ["sh", "-c", "echo 'a change' >> README.md && echo 'my answer' > answer.txt"],
        user="coder",
        workdir="/home/coder/workspace",
    )
    assert done.exit_code == 0, done.output
    # A short TTL from now; the reaper (every second) destroys it, archiving first.
    assert api.post(f"/api/v1/sandboxes/{sid}/extend", json={"ttl": "2s"}).status_code == 200
    assert _wait(api, sid, ("expired",))["reason"] == "ttl"

    [archive] = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
    assert (archive["reason"], archive["error"]) == ("expired", None), archive
    assert "+a change" in archive["git"] and "+my answer" in archive["git"], archive["git"]
    assert "answer.txt" in archive["git"]
    assert archive["notes"] is None  # nothing left out: no credential is in a sandbox
    got = api.get(archive["download"])
    assert got.headers["content-type"] == "application/gzip"
    assert f"sandbox-{sid}-expired-" in got.headers["content-disposition"]
    assert hashlib.sha256(got.content).hexdigest() == archive["sha256"]
    assert len(got.content) == archive["bytes"]
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        answer = members["home/coder/workspace/answer.txt"]
        assert (answer.uid, answer.mode) == (1000, 0o644)
        body = tar.extractfile(answer)
        assert body is not None and body.read() == b"my answer\n"
    assert "home/coder/workspace/.git/HEAD" in members
    # The sandbox's own Claude Code state is the candidate's: archived with the home. It
    # never used the AI gateway: no transcript beside it.
    assert "home/coder/.claude.json" in members
    assert "sandbox-engine/ai-transcript.json" not in members
    assert archive["files"] == sum(m.isreg() for m in members.values())
    assert any("archived: " in e and "(expired)" in e for e in _events(api, sid))
    assert leftovers(docker_client, f"sbx-{sid}") == []


@pytest.mark.parametrize("api", [0], indirect=True)  # no reaper: no repair of the removed container
def test_submit_reports_once_and_a_failed_archive_does_not_hold_the_destroy(
    api: httpx.Client, docker_client: docker.DockerClient
) -> None:
    sandbox = _create(api)
    sid = sandbox["id"]
    token = api.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
    candidate = httpx.Client(
        base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    )
    submit = f"/api/v1/access/{token}/submit"

    # Two submits at once (a double click): one archive, the same report twice.
    with candidate, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: candidate.post(submit), range(2)))
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        report = answers[0].json()
        assert answers[1].json() == report
        assert report["destroyed"] is False
        assert (report["archive"]["reason"], report["archive"]["error"]) == ("submitted", None)
        assert report["archive"]["files"] >= 1
        assert candidate.post(submit).json() == report

        # A candidate's token opens neither the list nor a download.
        for path in (f"/api/v1/sandboxes/{sid}/archives", report["archive"]["download"]):
            assert candidate.get(path).status_code == 401
    listed = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
    assert [a["id"] for a in listed] == [report["archive"]["id"]]
    assert len(api.get(report["archive"]["download"]).content) == report["archive"]["bytes"]
    submitted = [e for e in _events(api, sid) if "submitted by candidate" in e]
    assert len(submitted) == 1, submitted

    # The workspace removed by hand: its archive fails at once, the destroy goes on.
    docker_client.containers.get(sandbox["workspace"]).remove(force=True)
    started = time.monotonic()
    assert api.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
    _wait(api, sid, ("destroyed",))
    took = time.monotonic() - started
    failed = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"][-1]
    assert failed["reason"] == "deleted" and "is gone" in failed["error"], failed
    assert failed["download"] is None
    assert api.get(f"/api/v1/sandboxes/{sid}/archives/{failed['id']}").status_code == 404
    assert any("archive failed: " in e for e in _events(api, sid))
    assert leftovers(docker_client, f"sbx-{sid}") == []
    print(f"destroy with a failed archive: {took:.1f} s")


@pytest.mark.parametrize("api", [0], indirect=True)
def test_a_transient_archive_failure_is_retried(
    api: httpx.Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The archives folder cannot be made while a file holds its name (as a full or failing
    disk would refuse it): the first attempt fails; the obstacle goes; a later attempt makes
    the archive, and the destroy goes on."""
    sandbox = _create(api)
    sid = sandbox["id"]
    folder = tmp_path / "archives"  # the api fixture's archives_dir
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("in the way")
    caplog.set_level(logging.WARNING, logger="sandbox_engine.archives")
    assert api.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
    deadline = time.monotonic() + 120
    while not any(f"archive of {sid}, attempt 1" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the first attempt never failed"
        time.sleep(0.02)
    folder.unlink()  # within the 1 s before the next attempt
    _wait(api, sid, ("destroyed",))
    [archive] = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
    assert (archive["reason"], archive["error"]) == ("deleted", None), archive
    assert archive["files"] >= 1
    assert len(api.get(archive["download"]).content) == archive["bytes"]


def test_expired_archives_are_taken_with_their_files(database: str, tmp_path: Path) -> None:
    migrate(database)
    now = datetime.now(UTC)
    folder = tmp_path / "archives"
    folder.mkdir()
    with psycopg.connect(database, autocommit=True) as conn:
        for name, file, expires in (
            ("old", "old.tar.gz", now - timedelta(minutes=1)),
            ("failed", None, now - timedelta(days=1)),
            ("fresh", "fresh.tar.gz", now + timedelta(minutes=1)),
        ):
            if file:
                (folder / file).write_bytes(b"x")
            conn.execute(
                "INSERT INTO archives (sandbox_id, reason, file, error, expires_at)"
                " VALUES (%s, 'expired', %s, %s, %s)",
                (name, file, None if file else "gone", expires),
            )

    async def db(fn: Any, *args: Any, **kwargs: Any) -> Any:
        with psycopg.connect(database) as conn:
            return fn(conn, *args, **kwargs)

    settings = Settings(database_url=database, archives_dir=folder)
    assert asyncio.run(Archiver(settings, db, DockerBackend()).prune(now)) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["fresh.tar.gz"]
    with psycopg.connect(database) as conn:
        assert [r[0] for r in conn.execute("SELECT sandbox_id FROM archives")] == ["fresh"]
        assert take_expired(conn, now=now + timedelta(hours=1)) == ["fresh.tar.gz"]


@pytest.mark.parametrize("api", [0], indirect=True)
def test_submit_typed_in_the_shell_archives_and_tells_the_terminal(api: httpx.Client) -> None:
    """The whole path: the image's `submit` command, its escape sequence through tmux, the
    terminal bridge, the service's submit, the line on the candidate's terminal."""
    sid = _create(api)["id"]
    token = api.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
    url = f"ws://{api.base_url.host}:{api.base_url.port}/api/v1/ws/terminal/{sid}?token={token}"

    async def type_submit() -> None:
        async with websockets.connect(url) as ws:
            term = Terminal(ws)
            await term.type("submit\r")
            await term.expect("Submitting")
            await term.expect("Submitted: ", within=60)

    try:
        asyncio.run(type_submit())
        archives = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
        assert [(a["reason"], a["error"]) for a in archives] == [("submitted", None)], archives
        assert any("submitted by shell" in e for e in _events(api, sid))
    finally:
        api.delete(f"/api/v1/sandboxes/{sid}")
        _wait(api, sid, ("destroyed",))


# A workspace made to be hard to archive, as the candidate: a file past the cap, 100,000 small
# files in a deep tree, links that loop and point out of the home.
_HOSTILE = r"""
set -e
head -c 250000000 /dev/zero > ~/workspace/big.bin
python3 - <<'PY'
import os
root = os.path.expanduser("~/many")
for i in range(100):
    folder = os.path.join(root, "d%03d" % i)
    os.makedirs(folder)
    for j in range(1000):
        with open(os.path.join(folder, str(j)), "w") as f:
            f.write("x" * 10)
deep = os.path.expanduser("~/deep")
os.makedirs(os.path.join(deep, *["d"] * 200))
PY
ln -s / ~/root
ln -s . ~/loop
ln ~/workspace/big.bin ~/workspace/big-link.bin
"""


# The engine's cap is the ceiling: the template's 1Gi is above it.
HOSTILE_SETTINGS = {"archive_max_bytes": "192Mi", "archive_timeout": 60, "reap_interval": 0}


@pytest.mark.parametrize("api", [HOSTILE_SETTINGS], indirect=True)
def test_an_archive_is_capped_and_bounded_in_time_however_hostile_the_workspace(
    api: httpx.Client, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    cap, timeout = 192 * 2**20, 60
    created = api.post("/api/v1/sandboxes", json={"template": "capped"})
    assert created.status_code == 202, created.text
    sandbox = _wait(api, created.json()["id"], ("running",))
    sid = sandbox["id"]
    made = docker_client.containers.get(sandbox["workspace"]).exec_run(
        ["bash", "-c", _HOSTILE], user="coder"
    )
    assert made.exit_code == 0, made.output
    started = time.monotonic()
    assert api.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
    _wait(api, sid, ("destroyed",))
    took = time.monotonic() - started
    [archive] = api.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
    assert archive["error"] is None, archive
    notes = archive["notes"] or ""
    assert notes.startswith("left out past the 192.0 MiB cap: 2 entries, 238.4 MiB: "), notes
    # The file and its hard link are one file: Docker's tar names either one first.
    assert re.search(r"/home/coder/workspace/big(-link)?\.bin \(238\.4 MiB\)", notes), notes
    got = api.get(archive["download"]).content
    # The engine's disk: the one archive, within the cap; no partial file left.
    kept = list((tmp_path / "archives").iterdir())
    assert [p.name for p in kept] == [p.name for p in kept if p.suffix == ".gz"] and len(kept) == 1
    assert archive["bytes"] == len(got) == kept[0].stat().st_size <= cap
    with tarfile.open(fileobj=io.BytesIO(got)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "home/coder/workspace/big.bin" not in members
    assert "home/coder/workspace/big-link.bin" not in members  # its file was left out
    assert members["home/coder/loop"].issym() and members["home/coder/root"].issym()
    assert archive["files"] > 100_000  # everything else fits: the small files, the links
    # The documented bound: SANDBOX_ARCHIVE_TIMEOUT, one file of at most the cap, one Docker
    # call's 30 s — and the stack's destroy beside it.
    assert took < timeout + 30 + 60, took
    assert leftovers(docker_client, f"sbx-{sid}") == []
    print(f"hostile workspace: destroyed in {took:.1f} s, archive {len(got)} bytes; {notes[:200]}")


class _SlowTar:
    """A backend whose one path is a tar stream of 20 one-MiB files, one file every 0.1 s."""

    def get_files(self, container: str, path: str, chunk_size: int) -> Iterator[bytes]:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i in range(20):
                info = tarfile.TarInfo(f"work/f{i:02d}")
                info.size = 2**20
                tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        data = buffer.getvalue()
        for at in range(0, len(data), 2**20 + 512):
            yield data[at : at + 2**20 + 512]
            time.sleep(0.1)


def test_an_archive_cut_at_its_time_bound_keeps_what_it_packed_whole(tmp_path: Path) -> None:
    dest = tmp_path / "a.tar.gz"
    packed = pack(
        _SlowTar(),  # type: ignore[arg-type]  # the seam's one method pack uses on this path
        "ws",
        ("/home/coder/work", "/etc/never-read"),
        dest,
        deadline=time.monotonic() + 0.55,
        max_bytes=2**30,
    )
    [note] = packed.notes
    assert note.startswith("cut at the time bound (SANDBOX_ARCHIVE_TIMEOUT) in /home/coder/work/")
    assert note.endswith("; not read: /etc/never-read")
    with tarfile.open(dest) as tar:  # a whole archive: every member it has is complete
        members = tar.getmembers()
        for member in members:
            body = tar.extractfile(member)
            assert body is not None
            assert body.read() == bytes([int(member.name[-2:])]) * 2**20
    assert 2 <= len(members) == packed.files < 20
