"""`make env` makes pulumi, traefik, sandbox-engine and the project's python usable."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import ROOT


def test_make_env_exports_a_working_shell(tmp_path: Path) -> None:
    script = (
        'eval "$(make -s -C ' + str(ROOT) + ' env)"\n'
        "set -e\n"
        f"cd {tmp_path}\n"
        "pulumi version\n"
        "traefik version | head -n 1\n"
        "sandbox-engine --help | head -n 1\n"
        "python -c 'import engine, api, pulumi_docker; print(\"imports ok\")'\n"
        'echo "backend=$PULUMI_BACKEND_URL"\n'
        'echo "downloads=$PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION"\n'
    )
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("v3.")
    assert "Version:" in lines[1]
    assert lines[2].startswith("usage: sandbox-engine")
    assert lines[3] == "imports ok"
    assert lines[4].startswith("backend=postgres://") and "table=pulumi_state" in lines[4]
    assert lines[5] == "downloads=true"
