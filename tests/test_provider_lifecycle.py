"""The docker provider through the real Pulumi engine against the real dockerd."""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from pulumi import automation as auto

from engine.settings import Settings
from tests.provider_helpers import cli_env, leftovers, program_stack

MB = 1024 * 1024


@pytest.fixture
def prefix(docker_client: docker.DockerClient) -> Iterator[str]:
    value = f"pt{secrets.token_hex(3)}"
    yield value
    assert not leftovers(docker_client, value), leftovers(docker_client, value)


@pytest.fixture
def sandbox(
    settings: Settings,
    pulumi_cmd: auto.PulumiCommand,
    file_backend_url: str,
    tmp_path: Path,
    prefix: str,
) -> Iterator[auto.Stack]:
    stack = program_stack(
        settings, pulumi_cmd, "docker-program", tmp_path, file_backend_url, {"prefix": prefix}
    )
    yield stack
    stack.destroy()
    stack.workspace.remove_stack(stack.name)


def test_up_creates_exactly_the_declared_properties(
    sandbox: auto.Stack, docker_client: docker.DockerClient, prefix: str
) -> None:
    up = sandbox.up()
    api = docker_client.api
    c = api.inspect_container(up.outputs["container_id"].value)
    cfg, host = c["Config"], c["HostConfig"]
    assert c["Name"] == f"/{prefix}-workspace"
    assert cfg["Cmd"] == ["sleep", "infinity"]
    assert {"GREETING=hello", "LANG=C.UTF-8"} <= set(cfg["Env"])
    assert cfg["Hostname"] == "workspace"
    assert cfg["WorkingDir"] == "/tmp"
    assert cfg["Labels"] == {"io.sandbox-engine.test": "1", "role": "workspace"}
    assert host["Memory"] == 64 * MB
    assert host["NanoCpus"] == 500_000_000
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["Init"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Tmpfs"] == {"/run": "rw,size=16m"}
    assert host["Ulimits"] == [{"Name": "nofile", "Soft": 1024, "Hard": 2048}]
    assert host["Binds"] == [f"{prefix}-home:/data"]
    assert c["State"]["Running"] is True
    endpoint = c["NetworkSettings"]["Networks"][f"{prefix}-net"]
    assert "ws" in endpoint["Aliases"]
    assert up.outputs["ip"].value == endpoint["IPAddress"]

    net = api.inspect_network(up.outputs["network_id"].value)
    assert (net["Name"], net["Driver"], net["Labels"]) == (
        f"{prefix}-net",
        "bridge",
        {"io.sandbox-engine.test": "1"},
    )
    vol = api.inspect_volume(f"{prefix}-home")
    assert vol["Labels"] == {"io.sandbox-engine.test": "1"}
    assert up.outputs["mountpoint"].value == vol["Mountpoint"]

    # Reading everything back changes nothing: refresh is stable, the next preview is empty.
    sandbox.refresh()
    p = sandbox.preview(diff=True)
    assert p.change_summary == {"same": 5}, p.stdout


def test_env_change_replaces_and_limits_update_in_place(
    sandbox: auto.Stack, docker_client: docker.DockerClient
) -> None:
    first = sandbox.up().outputs["container_id"].value

    sandbox.set_config("greeting", auto.ConfigValue("bonjour"))
    preview = sandbox.preview(diff=True)
    assert preview.change_summary.get("replace") == 1, preview.change_summary
    assert "envs" in preview.stdout
    second = sandbox.up().outputs["container_id"].value
    assert second != first
    assert "GREETING=bonjour" in docker_client.api.inspect_container(second)["Config"]["Env"]
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(first)

    sandbox.set_config("memory", auto.ConfigValue("128"))
    sandbox.set_config("restart", auto.ConfigValue("unless-stopped"))
    preview = sandbox.preview()
    assert preview.change_summary.get("update") == 1, preview.change_summary
    third = sandbox.up().outputs["container_id"].value
    assert third == second, "memory and restart must change in place"
    host = docker_client.api.inspect_container(third)["HostConfig"]
    assert host["Memory"] == 128 * MB
    assert host["RestartPolicy"]["Name"] == "unless-stopped"


def test_out_of_band_removal_and_stop_are_seen_and_repaired(
    sandbox: auto.Stack, docker_client: docker.DockerClient
) -> None:
    first = sandbox.up().outputs["container_id"].value

    docker_client.api.remove_container(first, force=True)
    refresh = sandbox.refresh()
    assert refresh.summary.resource_changes.get("delete") == 1, refresh.summary.resource_changes
    second = sandbox.up().outputs["container_id"].value
    assert docker_client.api.inspect_container(second)["State"]["Running"]

    docker_client.api.stop(second, timeout=1)
    sandbox.refresh()
    preview = sandbox.preview()
    assert preview.change_summary.get("replace") == 1, (
        "a stopped container that must run is replaced"
    )
    third = sandbox.up().outputs["container_id"].value
    assert third != second
    assert docker_client.api.inspect_container(third)["State"]["Running"]


def test_destroy_leaves_nothing(
    settings: Settings,
    pulumi_cmd: auto.PulumiCommand,
    file_backend_url: str,
    tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    prefix = f"pt{secrets.token_hex(3)}"
    stack = program_stack(
        settings, pulumi_cmd, "docker-program", tmp_path, file_backend_url, {"prefix": prefix}
    )
    stack.up()
    assert len(leftovers(docker_client, prefix)) == 3
    stack.destroy()
    stack.workspace.remove_stack(stack.name)
    assert leftovers(docker_client, prefix) == []
    assert docker_client.images.get("sandbox-base:bookworm"), "keepLocally keeps the image"


def test_import_adopts_an_existing_container(
    settings: Settings,
    pulumi_cmd: auto.PulumiCommand,
    file_backend_url: str,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    prefix: str,
) -> None:
    existing = docker_client.containers.run(
        "sandbox-base:bookworm",
        ["sleep", "infinity"],
        name=f"{prefix}-adopted",
        environment=["MODE=adopted"],
        labels={"io.sandbox-engine.test": "1"},
        mem_limit="32m",
        detach=True,
    )
    stack = program_stack(
        settings,
        pulumi_cmd,
        "docker-import",
        tmp_path,
        file_backend_url,
        {"name": f"{prefix}-adopted", "id": existing.id},
    )
    try:
        up = stack.up()
        assert up.summary.resource_changes.get("import") == 1, up.summary.resource_changes
        assert up.outputs["container_id"].value == existing.id
        assert docker_client.api.inspect_container(existing.id)["State"]["Running"]
        assert stack.preview().change_summary == {"same": 2}
    finally:
        stack.destroy()
        stack.workspace.remove_stack(stack.name)
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(existing.id)


@pytest.mark.parametrize(
    ("config", "prop"),
    [
        ({"image": "sandbox-missing:nope"}, "name"),  # RemoteImage fails first, naming its name
        ({"memory": "-5"}, "memory"),
        ({"memory": "3"}, "memory"),
    ],
)
def test_bad_input_names_the_property_and_leaves_nothing(
    sandbox: auto.Stack,
    docker_client: docker.DockerClient,
    prefix: str,
    config: dict[str, str],
    prop: str,
) -> None:
    sandbox.set_all_config({k: auto.ConfigValue(v) for k, v in config.items()})
    with pytest.raises(auto.CommandError) as info:
        sandbox.up()
    message = str(info.value)
    assert prop in message, message
    assert next(iter(config.values())).lstrip("-") in message, message
    assert not docker_client.containers.list(all=True, filters={"name": f"{prefix}-workspace"})


def test_taken_port_names_ports_and_removes_the_container(
    sandbox: auto.Stack, docker_client: docker.DockerClient, prefix: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        sandbox.set_config("external_port", auto.ConfigValue(str(port)))
        with pytest.raises(auto.CommandError) as info:
            sandbox.up()
    message = str(info.value)
    assert "'ports'" in message and str(port) in message, message
    assert not docker_client.containers.list(all=True, filters={"name": f"{prefix}-workspace"})


def test_plain_cli_preview_diff_shows_property_level_changes(
    sandbox: auto.Stack, settings: Settings, file_backend_url: str
) -> None:
    sandbox.up()
    sandbox.set_config("greeting", auto.ConfigValue("hola"))
    sandbox.set_config("memory", auto.ConfigValue("96"))
    out = subprocess.run(
        ["pulumi", "preview", "--diff", "--stack", sandbox.name],
        cwd=sandbox.workspace.work_dir,
        env=cli_env(settings, file_backend_url),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "docker:index/container:Container: (replace)" in out, out
    assert '~ [0]: "GREETING=hello" => "GREETING=hola"' in out, out
    assert "~ memory" in out and "64 => 96" in out, out
    assert "warning" not in out.lower(), out
