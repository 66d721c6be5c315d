"""Shared fixtures. Every test talks to the real services that `make test` starts; a missing one
fails the test with a message naming it (nothing is skipped)."""

from __future__ import annotations

import calendar
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import psycopg
import pytest
from pulumi import automation as auto

from engine.host.toolenv import pulumi_command
from engine.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# Engines started by tests keep no stack reserve unless a test asks for one: reserved stacks
# outlive an engine by design, and tests end with nothing of theirs left.
os.environ.setdefault("SANDBOX_STACK_RESERVE", "0")
# Terminal recordings and the key that signs candidate tokens: the run's own, not the
# checkout's (.state/recordings, .state/secret-key).
if "SANDBOX_RECORDINGS_DIR" not in os.environ:
    os.environ["SANDBOX_RECORDINGS_DIR"] = tempfile.mkdtemp(prefix="sandbox-test-recordings-")
    RUN_RECORDINGS: str | None = os.environ["SANDBOX_RECORDINGS_DIR"]
else:
    RUN_RECORDINGS = None
os.environ.setdefault("SANDBOX_SECRET_KEY", secrets.token_urlsafe(32))
# Every destroy archives the workspace: tests' archives go to a folder of the run (the
# controller's, inherited by the workers), removed at its end, not to the checkout's .state/.
if "SANDBOX_ARCHIVES_DIR" not in os.environ:
    os.environ["SANDBOX_ARCHIVES_DIR"] = tempfile.mkdtemp(prefix="sandbox-test-archives-")
    RUN_ARCHIVES: str | None = os.environ["SANDBOX_ARCHIVES_DIR"]
else:
    RUN_ARCHIVES = None
# Every sandbox's disk (engine/host/disks.py): in a folder of the run, which must hold none at
# its end (each sandbox's disk goes with it).
if "SANDBOX_DISK_DIR" not in os.environ:
    os.environ["SANDBOX_DISK_DIR"] = tempfile.mkdtemp(prefix="sandbox-test-disks-")
    RUN_DISKS: str | None = os.environ["SANDBOX_DISK_DIR"]
else:
    RUN_DISKS = None
# An engine a test stops waits for its jobs as long as they take (tests end with nothing of
# theirs left); the stop tests set their own bound.
os.environ.setdefault("SANDBOX_STOP_TIMEOUT", "600")
# The AI gateway's port (8790) is one per host: engines of tests do not listen on it, except
# those of the AI tests, which take it in turn (tests/gateway_lock.py).
os.environ.setdefault("SANDBOX_GATEWAY_SERVE", "false")
# The checkout's first admin key is the newcomer's: no test may write it (their engines keep
# their state in folders of their own). The session ends by checking it was left as it was.
FIRST_ADMIN_KEY = ROOT / ".state" / "first-admin-key"


def unmount_under(folder: Path | str) -> list[str]:
    """Unmount every file system mounted under ``folder`` (sandbox disks a failed test left);
    returns their mount points."""
    prefix = str(Path(folder).resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points


def remove_labelled(sandbox_id: str) -> list[str]:
    """A test's clean-up of a sandbox behind the engine's back: every Docker object labelled
    with it (engine.backend.docker.remove_labelled), then its disk, wherever under the run's
    folder of disks an engine made it."""
    from engine.backend.docker import remove_labelled as remove_objects
    from engine.host.disks import Disks

    removed = remove_objects(sandbox_id)
    root = Path(os.environ["SANDBOX_DISK_DIR"])
    for image in root.rglob(f"{sandbox_id}.img"):
        Disks(image.parent.parent).drop(image.parent.name, sandbox_id)
        removed.append(f"disk {image}")
    return removed


def _left_disks(folder: str) -> list[str]:
    """Sandbox disks (their files or mounts) left in the run's disk folder."""
    images = [f"disk {p.relative_to(folder)}" for p in Path(folder).rglob("*.img")]
    return images + [f"mount {p}" for p in unmount_under(folder)]


def _fingerprint(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


FIRST_ADMIN_KEY_AT_START = _fingerprint(FIRST_ADMIN_KEY)
# Every Docker object a test creates carries this label; the session ends by checking none is left.
TEST_LABEL = "io.sandbox-engine.test"


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        pytest.fail(f"dockerd is not reachable ({exc}); start it with deploy/local/dockerd.sh")
    yield client
    client.close()


SESSION_STARTED = time.time()


def _made_by_this_run(container: Any) -> bool:
    created = str(container.attrs.get("Created", ""))[:19]
    try:
        at = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%S"))  # Docker's is UTC
    except ValueError:
        return False
    return at >= SESSION_STARTED - 1


def _leftovers() -> list[str]:
    client = docker.from_env(timeout=30)
    try:
        # Sandboxes the run's engines made (a warm pool's refill, say) count too: engines of
        # tests end with nothing of theirs left; sandboxes made before the run are not theirs.
        sandboxes = client.containers.list(
            all=True, filters={"label": ["io.sandbox-engine.managed-by=sandbox-engine",
                                         "io.sandbox-engine.sandbox"]}
        )  # fmt: skip
        return [
            *(
                f"container {c.name}"
                for c in client.containers.list(all=True, filters={"label": TEST_LABEL})
            ),
            *(f"sandbox container {c.name}" for c in sandboxes if _made_by_this_run(c)),
            *(f"network {n.name}" for n in client.networks.list(filters={"label": TEST_LABEL})),
            *(f"volume {v.name}" for v in client.volumes.list(filters={"label": TEST_LABEL})),
        ]
    finally:
        client.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run ends by checking no test left a Docker object behind. With pytest-xdist this
    runs once, in the controller, after every worker has finished."""
    if hasattr(session.config, "workerinput"):
        return
    for folder in (RUN_ARCHIVES, RUN_RECORDINGS):
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    if RUN_DISKS:
        disks = _left_disks(RUN_DISKS)
        shutil.rmtree(RUN_DISKS, ignore_errors=True)
        if disks:
            session.config.get_terminal_writer().line(
                f"FAILED: tests left sandbox disks behind: {disks}", red=True
            )
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _fingerprint(FIRST_ADMIN_KEY) != FIRST_ADMIN_KEY_AT_START:
        session.config.get_terminal_writer().line(
            f"FAILED: a test wrote or removed {FIRST_ADMIN_KEY}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    try:
        left = _leftovers()
    except docker.errors.DockerException:
        return  # no dockerd: the tests that needed it have failed naming it
    if left:
        session.config.get_terminal_writer().line(
            f"FAILED: tests left Docker objects behind: {left}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def db_conn(settings: Settings) -> Iterator[psycopg.Connection]:
    try:
        conn = psycopg.connect(settings.database_url.get_secret_value(), autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable ({exc}); start it with deploy/local/postgres.sh")
    with conn:
        yield conn


@pytest.fixture(scope="session")
def pulumi_cmd(settings: Settings) -> auto.PulumiCommand:
    exe = settings.toolchain_path / "pulumi"
    if not os.access(exe, os.X_OK):
        pytest.fail(f"the pulumi CLI is missing at {exe}; build it with toolchain/build.sh")
    return pulumi_command(settings)


@pytest.fixture
def pg_backend_url(settings: Settings, db_conn: psycopg.Connection) -> Iterator[str]:
    """A PostgreSQL DIY backend in the project's database, in a table of this test's own."""
    table = f"pulumi_state_test_{secrets.token_hex(4)}"
    from engine.settings import postgres_backend_url

    yield postgres_backend_url(settings.database_url.get_secret_value(), table)
    db_conn.execute(f"drop table if exists {table}")


@pytest.fixture
def file_backend_url(tmp_path: Path) -> str:
    state = tmp_path / "state"
    state.mkdir()
    return f"file://{state}"


@pytest.fixture
def database(settings: Settings, db_conn: psycopg.Connection) -> Iterator[str]:
    """A throwaway database beside the project's (the role may create databases)."""
    yield from _throwaway_database(settings, db_conn)


@pytest.fixture(scope="module")
def module_database(settings: Settings, db_conn: psycopg.Connection) -> Iterator[str]:
    yield from _throwaway_database(settings, db_conn)


def _throwaway_database(settings: Settings, db_conn: psycopg.Connection) -> Iterator[str]:
    from urllib.parse import urlsplit

    name = f"sandbox_test_{secrets.token_hex(4)}"
    admin = settings.database_url.get_secret_value()
    # A connection of its own each time: a fault test restarts PostgreSQL under the session's.
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield urlsplit(admin)._replace(path=f"/{name}").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        # FORCE may not end an autovacuum worker for a role that is no superuser: wait it out.
        for attempt in range(20):
            try:
                conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
                break
            except psycopg.errors.InsufficientPrivilege:
                if attempt == 19:
                    raise
                time.sleep(0.5)
