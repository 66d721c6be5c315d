"""Which images a build selects, and when an image counts as changed (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.host.images import BASE_IMAGE, IMAGES, build_args, context_hash, select


def test_everything_in_dependency_order() -> None:
    names = [i.name for i in select(None)]
    assert names.index("workspace-base") < names.index("workspace-python")
    assert len(names) == 6


def test_only_pulls_in_what_an_image_starts_from() -> None:
    assert [i.name for i in select(["workspace-go"])] == ["workspace-base", "workspace-go"]
    assert [i.name for i in select(["service-redis"])] == ["service-redis"]


def test_unknown_names_are_named() -> None:
    with pytest.raises(ValueError, match="workspace-rust"):
        select(["workspace-rust"])


def test_online_build_starts_from_a_registry_image() -> None:
    base = next(i for i in IMAGES if i.name == "workspace-base")
    assert build_args(base, BASE_IMAGE) == {"BASE_IMAGE": BASE_IMAGE}
    assert build_args(base, "debian:bookworm") == {"BASE_IMAGE": "debian:bookworm"}
    python = next(i for i in IMAGES if i.name == "workspace-python")
    assert build_args(python, "debian:bookworm") == {"WORKSPACE_IMAGE": "workspace-base:latest"}


def test_hash_follows_the_folder_and_the_parent(tmp_path: Path) -> None:
    image = next(i for i in IMAGES if i.name == "service-redis")
    folder = tmp_path / image.name
    folder.mkdir()
    (folder / "Dockerfile").write_text("FROM x\n")
    first = context_hash(tmp_path, image, "sha256:a", BASE_IMAGE)
    assert context_hash(tmp_path, image, "sha256:a", BASE_IMAGE) == first
    assert context_hash(tmp_path, image, "sha256:b", BASE_IMAGE) != first
    (folder / "Dockerfile").write_text("FROM y\n")
    assert context_hash(tmp_path, image, "sha256:a", BASE_IMAGE) != first
