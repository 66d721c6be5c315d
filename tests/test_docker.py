"""dockerd answers and the offline base image runs."""

from __future__ import annotations

import docker

from engine.host.doctor import BASE_IMAGE
from tests.conftest import TEST_LABEL


def test_a_container_from_the_base_image_runs_and_exits_0(
    docker_client: docker.DockerClient,
) -> None:
    container = docker_client.containers.run(
        BASE_IMAGE,
        ["sh", "-c", "cat /etc/debian_version && id -u"],
        labels={TEST_LABEL: "1"},
        detach=True,
    )
    try:
        result = container.wait(timeout=60)
        logs = container.logs().decode()
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 0, logs
    debian_version, uid = logs.split()
    assert debian_version.startswith("12."), "the base image is Debian bookworm"
    assert uid == "0"


def test_base_image_was_built_offline(docker_client: docker.DockerClient) -> None:
    """Imported from a root filesystem (one layer, no parent), not pulled from a registry."""
    image = docker_client.images.get(BASE_IMAGE)
    assert image.attrs["RepoDigests"] == []
    assert len(image.attrs["RootFS"]["Layers"]) == 1
