"""Template loading: the shipped templates load; bad ones name file, field and line (pure)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from engine.errors import TemplateError
from engine.model.schema import with_table
from engine.model.templates import MAX_FILE_BYTES, Expose, load, load_all
from engine.units import format_duration, parse_cpus, parse_duration, parse_memory
from tests.conftest import ROOT


def test_shipped_templates_load() -> None:
    templates = load_all(ROOT / "templates")
    assert set(templates) == {"backend-python", "backend-node", "backend-go", "interview-python"}
    py = templates["backend-python"]
    assert py.base_image == "workspace-python:latest"
    assert py.services == ("postgres", "redis")
    assert (py.cpu_limit, py.memory_limit) == (2.0, 4 * 2**30)
    assert py.ttl == timedelta(hours=4)
    assert py.expose == (Expose(8000, True),)


GOOD = """\
name: task
base_image: workspace-base:latest
ttl: 1h
"""


@pytest.mark.parametrize(
    ("text", "path", "line", "words"),
    [
        (GOOD + "colour: blue\n", "colour", 4, "unknown field"),
        (GOOD + "resources:\n  memory_limit: 4GB\n", "resources.memory_limit", 5, "memory size"),
        (GOOD + "resources:\n  cpu_limit: lots\n", "resources.cpu_limit", 5, "CPU cores"),
        (GOOD + "archive:\n  max_bytes: 10\n", "archive.max_bytes", 5, "at least 1Mi"),
        (GOOD + "archive:\n  max_bytes: lots\n", "archive.max_bytes", 5, "memory size"),
        (GOOD + "resources:\n  disk_limit: 1Mi\n", "resources.disk_limit", 5, "at least 64Mi"),
        (GOOD + "resources:\n  disk_limit: 20Ti\n", "resources.disk_limit", 5, "at most 16Ti"),
        (GOOD + "resources:\n  disk_limit: big\n", "resources.disk_limit", 5, "memory size"),
        (GOOD + "network:\n  egress: closed\n", "network.egress", 5, "open, none, allow"),
        (GOOD + "network:\n  egress: allow\n", "network.allow", 5, "at least one entry"),
        (GOOD + "network:\n  allow: [pypi.org]\n", "network.allow", 5, "set egress: allow"),
        (
            GOOD + "network:\n  egress: allow\n  allow: [pypi.org, 'http://x']\n",
            "network.allow[1]",
            6,
            "not a host name",
        ),
        (
            GOOD + "network:\n  egress: allow\n  allow: [10.0.0.0/33]\n",
            "network.allow[0]",
            6,
            "not an IP network",
        ),
        (
            GOOD + "network:\n  egress: allow\n  allow: [pypi.org, PyPI.org]\n",
            "network.allow[1]",
            6,
            "listed twice",
        ),
        ("name: task\nttl: 1h\n", "base_image", None, "is required"),
        (GOOD + "max_ttl: 30m\n", "ttl", 3, "longer than max_ttl"),
        (GOOD.replace("1h", "4 hours"), "ttl", 3, "duration"),
        (GOOD + "services: [postgres, mongo]\n", "services[1]", 4, "unknown service"),
        (
            GOOD + "expose:\n  - container: 80\n    public: yes-please\n",
            "expose[0].public",
            6,
            "true or false",
        ),
        (GOOD + "expose:\n  - container: 99999\n", "expose[0].container", 5, "port number"),
        (GOOD + "resources:\n  pids_limit: 3\n", "resources.pids_limit", 5, "16 to 65536"),
        (GOOD + "env:\n  9BAD: x\n", "env.9BAD", 5, "variable name"),
        (GOOD + "workspace:\n  workdir: relative\n", "workspace.workdir", 5, "absolute"),
        (GOOD.replace("name: task", "name: other"), "name", 1, "file name"),
        ("a: &x [1]\nb: *x\n", "", 1, "anchors and aliases"),
        ("name: [unclosed\n", "", 2, "not valid YAML"),
        ("", "", 1, "empty"),
        ("- just\n- a list\n", "", 1, "mapping of fields"),
    ],
)
def test_bad_templates_name_file_field_and_line(
    tmp_path: Path, text: str, path: str, line: int | None, words: str
) -> None:
    file = tmp_path / "task.yaml"
    file.write_text(text)
    with pytest.raises(TemplateError) as info:
        load(file)
    problems = {p: (ln, msg) for p, ln, msg in info.value.problems}
    assert path in problems, info.value.problems
    got_line, message = problems[path]
    assert words in message
    if line is not None:
        assert got_line == line
    assert str(info.value).startswith(f"{file}:")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    file = tmp_path / "task.yaml"
    file.write_text("name: task\nttl: soon\nextra: 1\n")
    with pytest.raises(TemplateError) as info:
        load(file)
    assert {p for p, _, _ in info.value.problems} == {"ttl", "extra", "base_image"}


def test_huge_file_is_refused_before_parsing(tmp_path: Path) -> None:
    file = tmp_path / "task.yaml"
    file.write_text(GOOD + "description: '" + "x" * MAX_FILE_BYTES + "'\n")
    with pytest.raises(TemplateError, match="limit"):
        load(file)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4Gi", 4 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("1048576", 2**20)],
)
def test_memory_units(text: str, value: int) -> None:
    assert parse_memory(text) == value


@pytest.mark.parametrize(("text", "value"), [("2", 2.0), ("0.5", 0.5), ("500m", 0.5)])
def test_cpu_units(text: str, value: float) -> None:
    assert parse_cpus(text) == value


@pytest.mark.parametrize(("text", "seconds"), [("4h", 14400), ("1h30m", 5400), ("90s", 90)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


def test_the_docs_field_table_is_the_schema_s() -> None:
    doc = (ROOT / "docs" / "templates.md").read_text()
    assert "<!-- fields: begin -->" in doc
    assert with_table(doc) == doc, "docs/templates.md's field table is stale: run `make docs`"
