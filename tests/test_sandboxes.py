"""Real sandboxes from the shipped templates: template → spec → stack → containers."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from engine.errors import StackError, TemplateError
from engine.model.spec import CLAUDE_AUTH_VOLUME
from engine.model.templates import find, load
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings
from tests.conftest import ROOT
from tests.provider_helpers import cli_env, leftovers


@pytest.fixture(scope="module")
def manager(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> StackManager:
    state = tmp_path_factory.mktemp("state")
    return StackManager(settings, backend_url=f"file://{state}")


def _exec(client: docker.DockerClient, container: str, script: str) -> str:
    """The script's output; asked again when an exec answers nothing at all (exit 0, no
    output: seen once in CI on a loaded host, as engine/ai/workspace.py's home_of saw)."""
    for attempt in range(3):
        code, out = client.containers.get(container).exec_run(["bash", "-lc", script])
        assert code == 0, out.decode()
        if out:
            break
        time.sleep(0.5 * (attempt + 1))
    return out.decode()


@pytest.mark.parametrize("name", ["backend-python", "backend-node", "backend-go"])
def test_template_makes_a_working_sandbox(
    manager: StackManager, docker_client: docker.DockerClient, name: str
) -> None:
    template = find(ROOT / "templates", name)
    lines: list[str] = []
    out = manager.create(template, ROOT / "templates", owner="tests", progress=lines.append)
    sid = out["sandboxId"]
    try:
        assert any("Container workspace" in ln for ln in lines), "no progress was reported"
        ws = out["workspace"]
        # Services answer by name from inside the workspace.
        if "postgres" in template.services:
            assert "pg" in _exec(docker_client, ws, "exec 3<>/dev/tcp/postgres/5432 && echo pg")
            assert _exec(docker_client, ws, "echo $DATABASE_URL").startswith(
                "postgresql://sandbox:"
            )
        if "redis" in template.services:
            reply = _exec(
                docker_client,
                ws,
                "exec 3<>/dev/tcp/redis/6379; printf 'PING\\r\\n' >&3; head -c 7 <&3",
            )
            assert reply == "+PONG\r\n"
        attrs = docker_client.api.inspect_container(ws)
        host, labels = attrs["HostConfig"], attrs["Config"]["Labels"]
        assert host["NanoCpus"] == int(template.cpu_limit * 1e9)
        assert host["Memory"] == template.memory_limit
        assert host["PidsLimit"] == template.pids_limit
        assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
        assert attrs["Config"]["User"] == "coder"
        assert labels["io.sandbox-engine.sandbox"] == sid
        assert labels["io.sandbox-engine.template"] == name
        assert labels["io.sandbox-engine.owner"] == "tests"
        assert labels["io.sandbox-engine.managed-by"] == "sandbox-engine"
        port = template.expose[0].container
        assert labels[f"traefik.http.routers.sbx-{sid}-{port}.rule"] == (
            f"Host(`{sid}-{port}.localhost`)"
        )
        mounts = {m["Destination"]: m["Name"] for m in attrs["Mounts"]}
        # Its own home, ~/.claude in it: the claude-auth volume is never mounted; /tmp and
        # /var/tmp on its disk as well.
        assert mounts == {
            "/home/coder": f"sbx-{sid}-home",
            "/tmp": f"sbx-{sid}-tmp",
            "/var/tmp": f"sbx-{sid}-var-tmp",
        }
        # Each a folder of the sandbox's own disk (engine/host/disks.py).
        home = docker_client.volumes.get(f"sbx-{sid}-home").attrs["Options"]
        assert home["device"] == f"{manager.disks.path(sid)}/home", home
        assert CLAUDE_AUTH_VOLUME not in {m["Name"] for m in attrs["Mounts"]}
        assert "Claude Code" in _exec(docker_client, ws, "claude --version")
    finally:
        manager.destroy(sid)
    assert leftovers(docker_client, f"sbx-{sid}") == []
    assert not (ROOT / ".state" / "stacks" / f"Pulumi.sbx-{sid}.yaml").exists()


def test_two_sandboxes_created_at_once_both_run(
    manager: StackManager, docker_client: docker.DockerClient
) -> None:
    template = find(ROOT / "templates", "backend-go")
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            results[i] = manager.create(template, ROOT / "templates")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len({r["sandboxId"] for r in results.values()}) == 2
        for r in results.values():
            assert docker_client.containers.get(r["workspace"]).status == "running"
    finally:
        for r in results.values():
            manager.destroy(r["sandboxId"])


def test_plain_cli_sees_sandboxes_and_template_changes(
    settings: Settings, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """With `make env`'s environment, from the repository root, against the project's database."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    manager = StackManager(settings)  # the default backend: PostgreSQL
    out = manager.create(load(templates / "backend-go.yaml"), templates)
    sid = out["sandboxId"]
    env = cli_env(settings, settings.backend_url())

    def pulumi(*args: str) -> str:
        done = subprocess.run(
            ["pulumi", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        assert f"sbx-{sid}" in pulumi("stack", "ls")
        pulumi("preview", "--diff", "--expect-no-changes", "--stack", f"sbx-{sid}")

        text = (templates / "backend-go.yaml").read_text()
        text = text.replace('memory_limit: "4Gi"', 'memory_limit: "2Gi"')
        text = text.replace("  pids_limit: 1024", "  pids_limit: 512")
        (templates / "backend-go.yaml").write_text(text)
        diff = pulumi("preview", "--diff", "--stack", f"sbx-{sid}")
        # memory changes in place; the pids-limit label forces a new workspace container.
        assert "+-docker:index/container:Container: (replace)" in diff, diff
        assert "~ memory" in diff and "4096 => 2048" in diff, diff
        assert '"1024" => "512"' in diff, diff
        # Exactly that: the postgres container, network and volumes (home, postgres data,
        # /tmp, /var/tmp) stay as they are.
        assert "+-1 to replace" in diff and "7 unchanged" in diff, diff
    finally:
        manager.destroy(sid)
    assert leftovers(docker_client, f"sbx-{sid}") == []


def test_invalid_template_and_ttl_create_nothing(manager: StackManager, tmp_path: Path) -> None:
    before = {s.name for s in manager.list()}
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\nbase_image: workspace-base:latest\nttl: 1h\nram: 4Gi\n")
    with pytest.raises(TemplateError) as info:
        load(bad)
    assert f"{bad}:4: ram: unknown field" in str(info.value)
    result = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "sandbox-engine"),
            "sandbox",
            "create",
            "--template",
            "backend-go",
            "--ttl",
            "100h",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1 and "max_ttl" in result.stderr, result.stderr
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "sandbox-engine"), "templates", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "ram: unknown field" in result.stderr
    assert {s.name for s in manager.list()} == before


def test_a_failed_up_tears_down_what_it_made(
    manager: StackManager, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "missing-image.yaml").write_text(
        "name: missing-image\nbase_image: no-such-image:latest\nttl: 1h\nservices: [redis]\n"
    )
    before = {s.name for s in manager.list()}
    with pytest.raises(StackError, match="image"):
        manager.create(load(templates / "missing-image.yaml"), templates, sandbox_id="failedup1")
    assert leftovers(docker_client, "sbx-failedup1") == []
    assert {s.name for s in manager.list()} == before


@pytest.fixture(autouse=True, scope="module")
def _images_present(docker_client: docker.DockerClient) -> Iterator[None]:
    for image in (
        "workspace-python",
        "workspace-node",
        "workspace-go",
        "service-postgres",
        "service-redis",
    ):
        try:
            docker_client.images.get(f"{image}:latest")
        except docker.errors.ImageNotFound:
            pytest.fail(f"image {image}:latest is missing: run make images")
    yield


def test_an_all_digit_sandbox_id_stays_a_string(
    manager: StackManager, docker_client: docker.DockerClient
) -> None:
    """Ids are hex: about one in a hundred is all digits, which YAML would read as a number
    (and the sandbox's objects would be named after 591488581, not 0591488581)."""
    sid = "0591488581"
    out = manager.create(
        find(ROOT / "tests" / "fixtures" / "live-templates", "web"),
        ROOT / "tests" / "fixtures" / "live-templates",
        sandbox_id=sid,
    )
    try:
        assert out["sandboxId"] == sid
        assert out["workspace"] == f"sbx-{sid}-workspace"
        labels = docker_client.containers.get(out["workspace"]).labels
        assert labels["io.sandbox-engine.sandbox"] == sid
    finally:
        manager.destroy(sid)
    assert not docker_client.containers.list(
        all=True, filters={"label": f"io.sandbox-engine.sandbox={sid}"}
    )
