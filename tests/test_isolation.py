"""Isolation, proven from inside: a candidate's shell attacks the host, the engine and another
sandbox (tests/fixtures/attacks.py). Every probe that must fail has a control that shows the
target is really there: the host listener and the API answer a container on Docker's default
bridge (not a sandbox bridge), and the other sandbox answers itself. Each test runs under runc
and under runsc (gVisor): the same attacks, every one blocked under both. The figures go to
docs/security.md (``-s`` prints them). The resource attacks are in test_isolation_resources.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest

from engine.settings import Settings
from tests.conftest import TEST_LABEL
from tests.isolation_lab import ATTACKS, RUNTIMES, SERVED, Lab, in_shell, make_lab


@pytest.fixture(scope="module", params=RUNTIMES)
def lab(
    request: pytest.FixtureRequest,
    module_database: str,
    tmp_path_factory: pytest.TempPathFactory,
    docker_client: docker.DockerClient,
) -> Iterator[Lab]:
    yield from make_lab(module_database, tmp_path_factory, docker_client, runtime=request.param)


def _networks(container: Any) -> dict[str, dict[str, str]]:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"]


def _host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines() if " lo " not in line]


def _host_status(container: Any) -> dict[str, str]:
    """/proc/<pid>/status, on the host, of the container's first process as the host sees it:
    under runc the workspace's init itself, under runsc gVisor's Sentry (runsc-sandbox),
    which runs every process of the sandbox."""
    container.reload()
    text = Path(f"/proc/{container.attrs['State']['Pid']}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_attacks_from_inside_a_sandbox_are_blocked(
    lab: Lab, docker_client: docker.DockerClient
) -> None:
    pg_port = urlsplit(Settings().database_url.get_secret_value()).port or 5432
    # The neighbour serves something: a connection would succeed if traffic were let through.
    lab.b.exec_run(["python3", "-m", "http.server", str(SERVED)], detach=True)
    deadline = time.monotonic() + 15
    while lab.b.exec_run(
        ["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {SERVED}), 1)"]
    ).exit_code:
        assert time.monotonic() < deadline, "the neighbour's listener did not start"
        time.sleep(0.2)

    tcp: list[list[object]] = []
    for net, conf in _networks(lab.a).items():
        gw = conf["Gateway"]
        tcp += [
            [f"the host's service via the {net} gateway", gw, lab.listener_port],
            [f"the API's port via the {net} gateway", gw, lab.api_port],
            [f"the engine's PostgreSQL via the {net} gateway", gw, pg_port],
        ]
    for address in _host_addresses():
        tcp += [
            [f"the host's service on {address}", address, lab.listener_port],
            [f"the API's port on {address}", address, lab.api_port],
        ]
    for net, conf in _networks(lab.b).items():
        tcp.append([f"the other sandbox on {net}", conf["IPAddress"], SERVED])
    tcp.append(["instance metadata", "169.254.169.254", 80])
    names = [["the other sandbox", lab.b.name, SERVED]]

    # As the candidate would: in the terminal's tmux session (under runsc what a `docker exec`
    # starts gets no seccomp profile from this runsc: the terminal's tmux installs its own).
    code, out = in_shell(lab.a, ATTACKS, json.dumps({"tcp": tcp, "names": names}))
    assert code == 0, out
    results = json.loads(out)
    for r in results:
        verdict = "BLOCKED" if r["blocked"] else "OPEN   "
        print(f"{lab.runtime}: {verdict}  {r['attack']}: {r['detail']}")
    open_ = [r for r in results if not r["blocked"]]
    print(
        f"attacks from inside ({lab.runtime}): {len(results)} made,"
        f" {len(results) - len(open_)} blocked"
    )

    # Controls: the same host service and API port answer a container on Docker's default
    # bridge, and the neighbour answers itself, so the probes above met a firewall, not silence.
    subnet = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Subnet"]
    gateway = str(ipaddress.ip_network(subnet)[1])
    probe = (
        "import socket, sys\n"
        "for port in sys.argv[2:]: socket.create_connection((sys.argv[1], int(port)), 3).close()"
    )
    out = docker_client.containers.run(
        lab.a.image.id,
        ["python3", "-c", probe, gateway, str(lab.listener_port), str(lab.api_port)],
        network="bridge",
        labels={TEST_LABEL: "1"},
        remove=True,
    )
    assert out == b""
    assert lab.b.exec_run(["python3", "-c", probe, "127.0.0.1", str(SERVED)]).exit_code == 0

    # From outside: nothing of the host is mounted, nothing privileged is granted.
    host = lab.a.attrs["HostConfig"]
    assert not [b for b in host.get("Binds") or [] if b.startswith("/")]  # named volumes only
    assert not host.get("Devices") and not host["Privileged"]
    assert {m["Type"] for m in lab.a.attrs["Mounts"]} <= {"volume"}
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] and host["Memory"] and host["NanoCpus"]
    assert host["MemorySwap"] == host["Memory"]
    assert host["Runtime"] == lab.runtime, host["Runtime"]
    # The kernel the sandbox sees: the host's under runc, gVisor's under runsc. Either way what
    # runs it on the host is under a seccomp filter and may gain no privileges.
    kernel = lab.a.exec_run(["uname", "-r"]).output.decode().strip()
    assert kernel == ("4.4.0" if lab.runtime == "runsc" else os.uname().release), kernel
    status = _host_status(lab.a)
    command = Path(f"/proc/{lab.a.attrs['State']['Pid']}/cmdline").read_bytes().split(b"\0")[0]
    print(
        f"{lab.runtime}: the sandbox sees kernel {kernel} (the host's: {os.uname().release});"
        f" on the host it runs as {command.decode()}: Seccomp {status['Seccomp']}, NoNewPrivs"
        f" {status['NoNewPrivs']}, CapEff {status['CapEff']}"
    )
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", status

    # Last, so that every figure above is printed even when an attack got through.
    hint = ""
    if any(r["attack"] == "no seccomp filter" for r in open_):
        # This runsc applies no profile to what `docker exec` starts: the terminal's tmux
        # installs its own, sandbox-confine (images/workspace-base/confine.c).
        found = lab.a.exec_run(["sh", "-c", "command -v sandbox-confine"]).output.decode()
        hint = f"; sandbox-confine in the image: {found.strip() or 'missing (make images)'}"
    assert not open_, f"{open_}{hint}"
