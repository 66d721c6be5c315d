"""What the egress proxy costs (engine/egress/proxy.py): the same HTTPS work from a sandbox
with `egress: allow` (through the proxy) and from one with `egress: open` (straight out), in
the same run, against the package index (the one outside service this machine reaches).

Timed inside the workspace (no `docker exec` in the numbers): a new HTTPS connection and a
small GET of the index's page for one project, and the download of one wheel of about a
megabyte from the index's file host. ``python -m tests.bench.run egress`` (or ``python -m
tests.bench.egress``; ``QUICK=1``: fewer repeats); the engine serves the proxy on
SANDBOX_EGRESS_PORT, so nothing else may hold it or the gateway's port.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import docker

from engine.model.spec import L_ROLE, L_SANDBOX
from tests.bench.harness import (
    ROOT,
    api_client,
    create_running,
    destroy_all,
    engine_process,
    summary,
)

TEMPLATES = ROOT / "tests" / "fixtures" / "egress-templates"
BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Run in the workspace: times of `small` fresh GETs of a project's index page and `big`
# downloads of one of its wheels (its URL from the index's page), as JSON.
PROBE = r"""
import html, json, re, sys, time, urllib.parse, urllib.request
small, big = int(sys.argv[1]), int(sys.argv[2])
index = "https://pypi.org"
def get(url):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as answer:
        size = len(answer.read())
    return time.perf_counter() - started, size
pages = [get(index + "/simple/six/")[0] for _ in range(small)]
page = urllib.request.urlopen(index + "/simple/setuptools/", timeout=60).read().decode()
wheel = re.search(r'href="([^"#]+/setuptools-75\.1\.0-py3-none-any\.whl)', page).group(1)
wheel = urllib.parse.urljoin(index + "/simple/setuptools/", html.unescape(wheel))
files = [get(wheel) for _ in range(big)]
print(json.dumps({"pages": pages, "files": [t for t, _ in files], "bytes": files[0][1]}))
"""


def _probe(client: docker.DockerClient, sid: str, small: int, big: int) -> dict[str, Any]:
    (workspace,) = client.containers.list(
        filters={"label": [f"{L_SANDBOX}={sid}", f"{L_ROLE}=workspace"]}
    )
    ran = workspace.exec_run(["python3", "-c", PROBE, str(small), str(big)], user="coder")
    out = ran.output.decode("utf-8", "replace")
    assert ran.exit_code == 0, out[-800:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def run(quick: bool) -> dict[str, Any]:
    small, big = (10, 3) if quick else (40, 10)
    results: dict[str, Any] = {}
    client = docker.from_env()
    with (
        engine_process(
            SANDBOX_TEMPLATES_DIR=str(TEMPLATES),
            SANDBOX_GATEWAY_SERVE="true",
            SANDBOX_CA_BUNDLE=str(BUNDLE),
        ) as engine,
        api_client(engine) as http,
    ):
        ids = {t: create_running(http, t, 1, 1)[0] for t in ("open-py", "allow-py")}
        try:
            _probe(client, ids["allow-py"], 1, 1)  # warm both: the first TLS set-up, caches
            _probe(client, ids["open-py"], 1, 1)
            for template, sid in ids.items():
                got = _probe(client, sid, small, big)
                results[template] = {
                    "page": summary(sorted(got["pages"])),
                    "file": summary(sorted(got["files"])),
                    "file_bytes": got["bytes"],
                }
        finally:
            destroy_all(http, list(ids.values()), 2)
    return results


def report(results: dict[str, Any]) -> list[str]:
    base, proxied = results["open-py"], results["allow-py"]
    mib = base["file_bytes"] / 2**20
    rows = [
        "",
        "| from the sandbox | open (direct), median | allow (proxy), median | ratio"
        " | open p95 | allow p95 |",
        "|---|---|---|---|---|---|",
    ]
    for key, what in (("page", "new HTTPS connection + GET of an index page"),
                      ("file", f"download of a {mib:.1f} MiB wheel")):  # fmt: skip
        a, b = base[key], proxied[key]
        rows.append(
            f"| {what} | {a['median'] * 1000:.1f} ms | {b['median'] * 1000:.1f} ms |"
            f" {b['median'] / a['median']:.2f}x | {a['p95'] * 1000:.1f} ms"
            f" | {b['p95'] * 1000:.1f} ms |"
        )
    return rows


if __name__ == "__main__":
    measured = run(os.environ.get("QUICK") == "1")
    json.dump(measured, sys.stderr, indent=2)
    print("\n".join(report(measured)))
