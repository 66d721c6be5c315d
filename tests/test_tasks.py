"""Task seeding: a template's task folder lands in the workspace, owned by the workspace user,
as a git repository with a first commit, and its init commands' output is in the events; an
init that fails fails the create and leaves nothing."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest
import yaml

from engine.errors import TemplateError
from engine.hiring.tasks import pack
from engine.model.spec import L_ROLE, L_SANDBOX
from engine.model.templates import load
from engine.sandboxes.jobs import Emitter
from tests.api_server import member_api

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "tests" / "fixtures" / "task-templates"


def test_a_task_is_packed_owned_by_the_workspace_user() -> None:
    data, files = pack(TEMPLATES / "tasks" / "hello", 1000, 1000)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert files == 3
    assert set(members) == {"README.md", "src", "src/app.py", "run.sh"}
    assert {(m.uid, m.gid) for m in members.values()} == {(1000, 1000)}
    assert members["run.sh"].mode & 0o111  # executables stay executable


@pytest.mark.parametrize(
    ("task", "field", "message"),
    [
        ({"folder": "../hello"}, "task.folder", "must name a folder"),
        ({"folder": "nope"}, "task.folder", "is not a folder beside the template"),
        ({"folder": "hello", "init": "echo"}, "task.init", "must be a list"),
        ({"folder": "hello", "init": [""]}, "task.init[0]", "must be a shell command"),
        ({"folder": "hello", "git": "yes"}, "task.git", "must be true or false"),
        ({"folder": "hello", "branch": "x"}, "task.branch", "unknown field"),
    ],
)
def test_bad_tasks_are_named_with_field_and_line(
    tmp_path: Path, task: dict[str, Any], field: str, message: str
) -> None:
    (tmp_path / "tasks" / "hello").mkdir(parents=True)
    raw = yaml.safe_load((TEMPLATES / "seeded.yaml").read_text())
    raw.update(name="bad", task=task)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TemplateError) as caught:
        load(path)
    assert any(p == field and message in m for p, _, m in caught.value.problems), caught.value
    assert f"{path}:" in str(caught.value)  # file and line


@pytest.fixture(scope="module")
def api(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with member_api(module_database, tmp_path_factory.mktemp("state"), TEMPLATES) as http:
        yield http, module_database


def _settle(http: httpx.Client, sid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        if body["state"] not in ("creating",):
            return dict(body)
        time.sleep(0.3)
    raise AssertionError(f"{sid} is still creating")


def _events(database: str, sid: str, kind: str) -> list[str]:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT message FROM sandbox_events WHERE sandbox_id = %s AND kind = %s ORDER BY id",
            (sid, kind),
        ).fetchall()
    return [r[0] for r in rows]


def test_a_seeded_task_is_in_the_workspace_with_its_owner_and_init_output(
    api: Any, docker_client: docker.DockerClient
) -> None:
    http, database = api
    sid = http.post("/api/v1/sandboxes", json={"template": "seeded"}).json()["id"]
    try:
        body = _settle(http, sid)
        assert body["state"] == "running", body
        (ws,) = docker_client.containers.list(
            filters={"label": [f"{L_SANDBOX}={sid}", f"{L_ROLE}=workspace"]}
        )
        workdir = "/home/coder/workspace"
        owners = ws.exec_run(
            ["sh", "-c", "stat -c '%U:%G %n' README.md src src/app.py run.sh"], workdir=workdir
        )
        assert owners.exit_code == 0, owners.output
        assert {line.split()[0] for line in owners.output.decode().splitlines()} == {"coder:coder"}
        log = ws.exec_run(["git", "log", "--format=%s"], workdir=workdir, user="coder")
        assert log.output.decode().strip() == "Task: hello"
        status = ws.exec_run(["git", "status", "--porcelain"], workdir=workdir, user="coder")
        assert status.output == b""  # everything of the task is in the first commit
        assert ws.exec_run(["./run.sh"], workdir=workdir, user="coder").output == b"run\n"

        events = _events(database, sid, "task")
        assert events[0] == f"copied 3 files of tasks/hello into {workdir}"
        assert f"init says coder in {workdir}" in events
        assert "hello from the task" in events
        assert events[-1] == "exit 0: python3 src/app.py"
    finally:
        http.delete(f"/api/v1/sandboxes/{sid}")
        deadline = time.monotonic() + 120
        while http.get(f"/api/v1/sandboxes/{sid}").json()["state"] != "destroyed":
            assert time.monotonic() < deadline
            time.sleep(0.3)
    whats = [e["what"] for e in http.get(f"/api/v1/sandboxes/{sid}/timeline").json()]
    assert whats[:3] == ["created", "task", "running"] and whats[-1] == "destroyed", whats


def test_an_init_that_fails_fails_the_create_and_leaves_nothing(
    api: Any, docker_client: docker.DockerClient
) -> None:
    http, database = api
    sid = http.post("/api/v1/sandboxes", json={"template": "broken"}).json()["id"]
    body = _settle(http, sid)
    assert body["state"] == "failed", body
    assert "exited 3" in body["error"] and body["error"].endswith("cleaned up"), body["error"]
    assert "about to fail" in _events(database, sid, "task")
    assert not docker_client.containers.list(all=True, filters={"label": f"{L_SANDBOX}={sid}"})
    assert not docker_client.volumes.list(filters={"label": f"{L_SANDBOX}={sid}"})


def test_a_threads_lines_are_written_in_the_order_emitted() -> None:
    """A task's output lines come from a worker thread; each is written by its own coroutine on
    the event loop. However long a write takes, the events keep the lines' order (the sink
    stands in for the database)."""
    written: list[str] = []

    class Sink:
        async def _event(self, sandbox_id: str, kind: str, line: str) -> None:
            await asyncio.sleep(0.005 if int(line) % 3 == 0 else 0)  # some writes are slower
            written.append(line)

    async def main() -> None:
        emit = Emitter(Sink()._event, "sbx1", "task", asyncio.get_running_loop())

        def produce() -> None:
            for n in range(60):
                emit(str(n))

        await asyncio.to_thread(produce)
        await emit.written()

    asyncio.run(main())
    assert written == [str(n) for n in range(60)]
