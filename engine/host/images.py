"""Workspace and service images: build what changed, in dependency order, with progress.

Every image is built from ``images/<name>/Dockerfile`` with ``images/`` as the context. An
image carries the hash of what it was built from (its folder, its Dockerfile's build arguments
and the id of the image it starts FROM) in a label; a build whose hash matches is skipped, so an
unchanged ``make images`` takes seconds.

Downloads over HTTPS inside builds (npm, PyPI, the Go module proxy) trust the build host's CA
bundle, handed to the build's fetch stages only (``images/.build/host-ca.crt``): no final image
contains it.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors

HASH_LABEL = "io.sandbox-engine.build-hash"
BASE_IMAGE = "sandbox-base:bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Image:
    name: str
    parent: str  # the image its final stage starts FROM (tag)
    parent_arg: str = "BASE_IMAGE"  # the build argument that names the parent
    args: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.name}:latest"


IMAGES: tuple[Image, ...] = (
    Image("workspace-base", BASE_IMAGE),
    Image("workspace-python", "workspace-base:latest", "WORKSPACE_IMAGE"),
    Image("workspace-node", "workspace-base:latest", "WORKSPACE_IMAGE"),
    Image("workspace-go", "workspace-base:latest", "WORKSPACE_IMAGE"),
    Image("service-postgres", BASE_IMAGE),
    Image("service-redis", BASE_IMAGE),
)


class ImageBuildError(Exception):
    """A build failed; the message names the image and the failing step's output."""


def select(only: Iterable[str] | None) -> list[Image]:
    """The images to build, in dependency order; ``only`` also builds what those start FROM."""
    if not only:
        return list(IMAGES)
    by_name = {i.name: i for i in IMAGES}
    unknown = sorted(set(only) - set(by_name))
    if unknown:
        raise ValueError(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    wanted = set(only)
    for image in reversed(IMAGES):
        if image.name in wanted and image.parent.removesuffix(":latest") in by_name:
            wanted.add(image.parent.removesuffix(":latest"))
    return [i for i in IMAGES if i.name in wanted]


def context_hash(images_dir: Path, image: Image, parent_id: str, base_image: str) -> str:
    digest = hashlib.sha256()
    for path in sorted((images_dir / image.name).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(images_dir)).encode())
            digest.update(path.read_bytes())
    digest.update(repr(sorted(build_args(image, base_image).items())).encode())
    digest.update(parent_id.encode())
    return digest.hexdigest()[:16]


def build_args(image: Image, base_image: str) -> dict[str, str]:
    parent = base_image if image.parent == BASE_IMAGE else image.parent
    return {image.parent_arg: parent, **image.args}


def _stage_ca(images_dir: Path) -> None:
    target = images_dir / ".build" / "host-ca.crt"
    target.parent.mkdir(exist_ok=True)
    if HOST_CA_BUNDLE.is_file():
        shutil.copyfile(HOST_CA_BUNDLE, target)
    else:
        target.write_bytes(b"")  # the fetch stages then use the image's own trust store


def build(
    images_dir: Path,
    *,
    only: Iterable[str] | None = None,
    base_image: str = BASE_IMAGE,
    force: bool = False,
    progress: Callable[[str], None] = print,
    client: docker.DockerClient | None = None,
) -> dict[str, str]:
    """Build the selected images; returns name -> "built" | "up to date"."""
    client = client or docker.from_env(timeout=3600)
    selected = select(only)
    _stage_ca(images_dir)
    results: dict[str, str] = {}
    for image in selected:
        parent = base_image if image.parent == BASE_IMAGE else image.parent
        try:
            parent_id = client.images.get(parent).id
        except docker.errors.ImageNotFound as exc:
            hint = "images/base/build.sh" if parent == BASE_IMAGE else f"--only {parent}"
            raise ImageBuildError(f"{image.name}: its base {parent} is missing ({hint})") from exc
        wanted = context_hash(images_dir, image, parent_id, base_image)
        if not force and _current_hash(client, image.tag) == wanted:
            progress(f"[images] {image.tag}: up to date")
            results[image.name] = "up to date"
            continue
        progress(f"[images] {image.tag}: building")
        start = time.monotonic()
        _run_build(client, images_dir, image, base_image, wanted, progress)
        size = client.images.get(image.tag).attrs["Size"]
        progress(
            f"[images] {image.tag}: built in {time.monotonic() - start:.0f}s, {size / 1e6:.0f} MB"
        )
        results[image.name] = "built"
    return results


def _current_hash(client: docker.DockerClient, tag: str) -> str | None:
    try:
        labels = client.images.get(tag).labels or {}
    except docker.errors.ImageNotFound:
        return None
    value = labels.get(HASH_LABEL)
    return str(value) if value else None


def _run_build(
    client: docker.DockerClient,
    images_dir: Path,
    image: Image,
    base_image: str,
    build_hash: str,
    progress: Callable[[str], None],
) -> None:
    tail: list[str] = []
    stream: Iterable[dict[str, Any]] = client.api.build(
        path=str(images_dir),
        dockerfile=f"{image.name}/Dockerfile",
        tag=image.tag,
        buildargs=build_args(image, base_image),
        labels={HASH_LABEL: build_hash},
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            detail = "\n".join(tail[-15:])
            raise ImageBuildError(f"{image.name}: {chunk['error'].strip()}\n{detail}")
        text = str(chunk.get("stream", "")).rstrip()
        for line in text.splitlines():
            tail.append(line)
            if line.startswith("Step "):
                progress(f"[images] {image.name}: {line}")
