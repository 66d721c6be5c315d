"""The real Pulumi engine, driven by the Automation API, on both state backends."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest
from pulumi import automation as auto

from engine.host.toolenv import workspace_options
from engine.settings import Settings
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "file-program"


def _lifecycle(
    settings: Settings, pulumi_cmd: auto.PulumiCommand, backend_url: str, tmp_path: Path
) -> None:
    work_dir = tmp_path / "program"
    shutil.copytree(FIXTURE, work_dir)
    marker = tmp_path / "marker.txt"
    stack = auto.create_stack(
        "sbx-toolchain-check",
        work_dir=str(work_dir),
        opts=workspace_options(
            settings, work_dir=work_dir, command=pulumi_cmd, backend_url=backend_url
        ),
    )
    try:
        stack.set_config("path", auto.ConfigValue(str(marker)))

        preview = stack.preview()
        assert preview.change_summary.get("create") == 2, preview.change_summary
        assert not marker.exists(), "preview must not create anything"

        events: list[auto.EngineEvent] = []
        up = stack.up(on_event=events.append)
        assert up.summary.result == "succeeded"
        assert up.outputs["path"].value == str(marker)
        assert up.outputs["stack"].value == "sbx-toolchain-check"
        assert marker.read_text() == "made by pulumi"
        assert any(e.res_outputs_event for e in events), "no progress events streamed"

        again = stack.preview()
        assert again.change_summary.get("same") == 2, again.change_summary

        refresh = stack.refresh()
        assert refresh.summary.result == "succeeded"

        down = stack.destroy()
        assert down.summary.result == "succeeded"
        assert not marker.exists(), "destroy must delete the resource"
    finally:
        stack.workspace.remove_stack("sbx-toolchain-check", force=True)
    names = [s.name for s in stack.workspace.list_stacks()]
    assert "sbx-toolchain-check" not in names


def test_lifecycle_with_file_backend(
    settings: Settings, pulumi_cmd: auto.PulumiCommand, file_backend_url: str, tmp_path: Path
) -> None:
    _lifecycle(settings, pulumi_cmd, file_backend_url, tmp_path)


def test_lifecycle_with_postgres_backend(
    settings: Settings,
    pulumi_cmd: auto.PulumiCommand,
    pg_backend_url: str,
    db_conn: psycopg.Connection,
    tmp_path: Path,
) -> None:
    _lifecycle(settings, pulumi_cmd, pg_backend_url, tmp_path)
    # The state really went to PostgreSQL: the backend made its table and wrote rows into it.
    table = dict(q.split("=") for q in pg_backend_url.split("?")[1].split("&"))["table"]
    rows = db_conn.execute(f"select count(*) from {table}").fetchone()  # noqa: S608
    assert rows is not None and rows[0] > 0


def test_the_repository_is_a_pulumi_project(
    settings: Settings, pulumi_cmd: auto.PulumiCommand, file_backend_url: str
) -> None:
    """The engine's own program (Pulumi.yaml at the root, main: stacks/) runs through the CLI."""
    opts = workspace_options(
        settings, work_dir=ROOT, command=pulumi_cmd, backend_url=file_backend_url
    )
    stack = auto.create_stack("sbx-projectcheck", work_dir=str(ROOT), opts=opts)
    try:
        stack.set_all_config(
            {
                "sandbox:id": auto.ConfigValue("projectcheck"),
                "sandbox:template": auto.ConfigValue("backend-go"),
                "sandbox:templatesDir": auto.ConfigValue(str(ROOT / "templates")),
                "sandbox:servicePassword": auto.ConfigValue("x", secret=True),
            }
        )
        preview = stack.preview()
        # network, two volumes, two containers, and the docker provider
        assert preview.change_summary.get("create") == 6, preview.change_summary
    finally:
        stack.workspace.remove_stack("sbx-projectcheck", force=True)
        (ROOT / ".state" / "stacks" / "Pulumi.sbx-projectcheck.yaml").unlink(missing_ok=True)


def test_missing_plugin_fails_without_download(
    settings: Settings, pulumi_cmd: auto.PulumiCommand, file_backend_url: str, tmp_path: Path
) -> None:
    """Plugin acquisition is off: a program needing an absent provider fails and names it."""
    work_dir = tmp_path / "needs-plugin"
    work_dir.mkdir()
    (work_dir / "Pulumi.yaml").write_text("name: needs-plugin\nruntime: python\n")
    (work_dir / "__main__.py").write_text(
        "import pulumi\n"
        "pulumi.CustomResource('nosuchprovider:index:Thing', 'thing', {},\n"
        "    opts=pulumi.ResourceOptions(version='1.2.3'))\n"
    )
    stack = auto.create_stack(
        "sbx-plugin-check",
        work_dir=str(work_dir),
        opts=workspace_options(
            settings, work_dir=work_dir, command=pulumi_cmd, backend_url=file_backend_url
        ),
    )
    try:
        with pytest.raises(auto.CommandError) as info:
            stack.up()
        message = str(info.value)
        assert "nosuchprovider" in message
        assert "1.2.3" in message
    finally:
        stack.workspace.remove_stack("sbx-plugin-check", force=True)
    plugins = settings.pulumi_home / "plugins"
    assert not list(plugins.glob("resource-nosuchprovider*")), "a plugin was downloaded"
