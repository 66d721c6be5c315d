"""A program written the way pulumi-docker's nginx example is runs on the engine's provider."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import docker
import pytest
from pulumi import automation as auto

from engine.settings import Settings
from tests.conftest import ROOT, TEST_LABEL
from tests.provider_helpers import program_stack

NGINX = "nginx:latest"


@pytest.fixture(scope="session")
def nginx_image(docker_client: docker.DockerClient) -> str:
    """A local nginx image (no registry is reachable): Debian's nginx on the base image."""
    try:
        docker_client.images.get(NGINX)
    except docker.errors.ImageNotFound:
        docker_client.images.build(
            path=str(ROOT / "tests" / "fixtures" / "nginx-image"),
            tag=NGINX,
            rm=True,
            labels={f"{TEST_LABEL}.image": "1"},
        )
    return NGINX


def test_nginx_example_runs_unchanged(
    settings: Settings,
    pulumi_cmd: auto.PulumiCommand,
    file_backend_url: str,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    nginx_image: str,
) -> None:
    stack = program_stack(settings, pulumi_cmd, "nginx-example", tmp_path, file_backend_url, {})
    try:
        up = stack.up()
        assert up.summary.resource_changes.get("create") == 3, up.summary.resource_changes
        resources = stack.export_stack().deployment["resources"]
        container = next(r for r in resources if r["type"] == "docker:index/container:Container")
        # Autonamed as upstream does: the resource name and a random suffix.
        assert container["outputs"]["name"].startswith("nginx-")
        port = container["outputs"]["ports"][0]["external"]
        body = ""
        for _ in range(50):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert "nginx" in body.lower()
    finally:
        stack.destroy()
        stack.workspace.remove_stack(stack.name)
    assert not [c for c in docker_client.containers.list(all=True) if c.name.startswith("nginx-")]
    assert docker_client.images.get(nginx_image), "keep_locally=True keeps the image"
