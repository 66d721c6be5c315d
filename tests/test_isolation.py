"""Isolation, proven from inside: a candidate's shell attacks the host, the engine and another
sandbox (tests/fixtures/attacks.py). Every probe that must fail has a control that shows the
target is really there: the host listener and the API answer a container on Docker's default
bridge (not a sandbox bridge), and the other sandbox answers itself. The figures go to
docs/security.md (``-s`` prints them). The resource attacks are in test_isolation_resources.py.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest

from engine.settings import Settings
from tests.conftest import TEST_LABEL
from tests.isolation_lab import ATTACKS, SERVED, Lab, make_lab


@pytest.fixture(scope="module")
def lab(
    module_database: str,
    tmp_path_factory: pytest.TempPathFactory,
    docker_client: docker.DockerClient,
) -> Iterator[Lab]:
    yield from make_lab(module_database, tmp_path_factory, docker_client)


def _networks(container: Any) -> dict[str, dict[str, str]]:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"]


def _host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines() if " lo " not in line]


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

    done = lab.a.exec_run(["python3", "-c", ATTACKS, json.dumps({"tcp": tcp, "names": names})])
    assert done.exit_code == 0, done.output.decode()
    results = json.loads(done.output)
    for r in results:
        print(f"{'BLOCKED' if r['blocked'] else 'OPEN   '}  {r['attack']}: {r['detail']}")
    open_ = [r for r in results if not r["blocked"]]
    assert not open_, open_
    print(f"attacks from inside: {len(results)} made, {len(results) - len(open_)} blocked")

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
