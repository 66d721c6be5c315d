"""Task seeding: what a candidate finds in a new workspace.

A template's ``task`` names a folder of ``templates/tasks/``. Right after the sandbox's stack is
up (before it is ``running``, and before a warm pool sandbox is offered) the folder is copied
into the workspace's workdir, owned by the workspace user; with ``git`` (the default) the
workdir becomes a repository with the task as its first commit, so a reviewer can diff the
candidate's work against it; then each ``init`` command runs as the workspace user, in the
workdir, through ``bash -lc``. Every step and every output line is an event of kind ``task``.
A step that fails fails the create (the sandbox is torn down, the error names the step).
"""

from __future__ import annotations

import io
import shlex
import tarfile
from collections.abc import Callable
from pathlib import Path

from engine.backend import Backend, BackendError
from engine.errors import StackError
from engine.model.templates import TASKS_FOLDER, Template

MAX_TASK_BYTES = 16 * 2**20  # a task is source code, not a data set
MAX_LINES = 200  # output lines of one init command kept as events; the rest are counted
INIT_TIMEOUT = 600  # seconds one init command may run
AUTHOR = ["-c", "user.name=Sandbox Engine", "-c", "user.email=task@sandbox-engine.invalid"]

Emit = Callable[[str], None]


def task_folder(template: Template, templates_dir: Path) -> Path:
    assert template.task is not None
    return templates_dir / TASKS_FOLDER / template.task.folder


def pack(folder: Path, uid: int, gid: int) -> tuple[bytes, int]:
    """The folder as a tar owned by uid:gid (modes kept, symlinks kept as links, nothing from
    outside the folder); (bytes, files)."""
    data = io.BytesIO()
    files = total = 0
    with tarfile.open(fileobj=data, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
            info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
            if info.isfile():
                files += 1
                total += info.size
                if total > MAX_TASK_BYTES:
                    raise StackError(f"task folder {folder} is over {MAX_TASK_BYTES >> 20} MiB")
                with path.open("rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)
    return data.getvalue(), files


def seed(
    backend: Backend, template: Template, templates_dir: Path, workspace: str, emit: Emit
) -> None:
    """Copy the task into the workspace, make it a repository, run its init commands."""
    if template.task is None:
        return
    task = template.task
    folder = task_folder(template, templates_dir)
    workdir = template.workspace.workdir
    user = template.workspace.user
    try:
        uid, gid = _ids(backend, workspace, user)
        data, files = pack(folder, uid, gid)
        _run(backend, workspace, user, "/", ["mkdir", "-p", workdir], "make the workdir")
        try:
            backend.put_files(workspace, workdir, data)
        except BackendError as exc:
            raise StackError(f"task: copying {folder.name} into {workdir} failed") from exc
        emit(f"copied {files} files of {TASKS_FOLDER}/{task.folder} into {workdir}")
        if task.git:
            steps = [
                (["git", "init", "-q", "-b", "main"], "git init"),
                (["git", "add", "-A"], "git add"),
                (["git", *AUTHOR, "commit", "-q", "--allow-empty", "-m", f"Task: {task.folder}"],
                 "git commit"),
            ]  # fmt: skip
            for argv, what in steps:
                _run(backend, workspace, user, workdir, argv, what)
            emit(f"{workdir} is a git repository; the task is its first commit")
        for command in task.init:
            _init(backend, workspace, user, workdir, command, emit)
    except BackendError as exc:
        raise StackError(f"task: {exc}") from exc


def _ids(backend: Backend, workspace: str, user: str) -> tuple[int, int]:
    out = _run(
        backend, workspace, user, "/", ["sh", "-c", "id -u; id -g"], "find the workspace user"
    )
    uid, gid = out.split()
    return int(uid), int(gid)


def _run(
    backend: Backend, workspace: str, user: str, workdir: str, cmd: list[str], what: str
) -> str:
    ran = backend.run(workspace, cmd, user=user, workdir=workdir)
    if ran.exit_code != 0:
        raise StackError(f"task: {what} failed ({ran.exit_code}): {ran.text.strip()[-500:]}")
    return ran.text


def _init(
    backend: Backend, workspace: str, user: str, workdir: str, command: str, emit: Emit
) -> None:
    """One init command, its output streamed line by line into the events."""
    emit(f"$ {command}")
    # timeout(1) bounds the command inside the container; the stream itself has no timeout.
    argv = ["timeout", str(INIT_TIMEOUT), "bash", "-lc", command]
    stream = backend.stream(
        workspace, argv, user=user, workdir=workdir, environment={"TERM": "dumb"}
    )
    shown = hidden = 0
    pending = b""
    for chunk in stream.chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if shown < MAX_LINES:
                emit(line.decode(errors="replace").rstrip("\r"))
                shown += 1
            else:
                hidden += 1
    if pending:
        if shown < MAX_LINES:
            emit(pending.decode(errors="replace").rstrip("\r"))
        else:
            hidden += 1
    if hidden:
        emit(f"… {hidden} more lines")
    code = stream.exit_code()
    if code != 0:
        why = "timed out" if code == 124 else f"exited {code}"
        raise StackError(f"task: init command {shlex.quote(command)} {why}")
    emit(f"exit 0: {command}")
