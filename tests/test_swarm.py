"""Sandboxes on a Docker Swarm (``SANDBOX_BACKEND=swarm``), on the lab swarm of three dockerds
in network namespaces (``make swarm-lab``; ``make test-slow`` makes it and removes it after):
the real Pulumi engine, the project's provider's ``Service``, a real PostgreSQL.

- Twelve sandboxes whose reservations fit four per node land four per node (read from their
  tasks' nodes); the thirteenth fails with Swarm's capacity message and leaves nothing.
- A sandbox on a worker (not the manager): its seeded task, the terminal over the WebSocket,
  a command run by the engine, the candidate's submit and its archive.
- Across nodes: a sandbox's own services answer by name; sandboxes on other nodes and on the
  same node do not; a node's Docker API refuses a sandbox (no client certificate).
- Plain ``pulumi preview --diff`` shows no drift; a memory change applies in place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from engine.ai.workspace import MANAGED_SETTINGS
from engine.backend.swarm import SwarmBackend
from engine.settings import Settings
from tests.ai_upstream import Upstream, serving
from tests.api_server import Terminal, member_api
from tests.conftest import ROOT
from tests.gateway_lock import gateway_port
from tests.isolation_lab import ATTACKS, in_shell
from tests.provider_helpers import cli_env

pytestmark = [pytest.mark.slow, pytest.mark.swarm]

LAB_ENV = ROOT / ".state" / "swarm-lab" / "env"
TEMPLATES = ROOT / "tests" / "fixtures" / "swarm-templates"
OPERATOR_KEY = "sk-ant-api03-the-operators-key-on-the-engine-host-" + "s" * 20
PER_NODE = 4  # the quarter template reserves half a CPU; every lab node offers two


def lab_settings() -> dict[str, str]:
    if not LAB_ENV.is_file():
        pytest.fail(f"the lab swarm is not up ({LAB_ENV} is missing): run make swarm-lab")
    pairs = (line.split("=", 1) for line in LAB_ENV.read_text().split())
    return {k.removeprefix("SANDBOX_").lower(): v for k, v in pairs}


@dataclass
class Cluster:
    http: httpx.Client
    backend: SwarmBackend
    settings: Settings
    templates: Path
    quarters: dict[str, str]  # sandbox id → the hostname of its workspace's node
    made: list[str]  # every sandbox the module made: all destroyed at its end
    upstream: Upstream  # the stand-in for the Messages API behind the engine's AI gateway

    def sh(self, sid: str, command: str, timeout: int = 60) -> tuple[int, str]:
        ran = self.backend.run(
            f"sbx-{sid}-workspace",
            ["bash", "-c", f"timeout {timeout} bash -c {shlex.quote(command)}"],
            user="coder",
        )
        return ran.exit_code, ran.text

    def on(self, node: str) -> list[str]:
        return sorted(s for s, n in self.quarters.items() if n == node)

    @contextlib.contextmanager
    def running(self, template: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """A new sandbox of ``template``, running; destroyed after the block, nothing left."""
        made = self.http.post("/api/v1/sandboxes", json={"template": template})
        assert made.status_code == 202, made.text
        sid = made.json()["id"]
        self.made.append(sid)
        try:
            body = wait(self.http, sid, ("running", "failed"), timeout=300)
            assert body["state"] == "running", body
            yield sid, body
        finally:
            self.http.delete(f"/api/v1/sandboxes/{sid}")
            wait(self.http, sid, ("destroyed", "failed"))
        assert wait(self.http, sid, ("destroyed",))["state"] == "destroyed"
        assert self.backend.objects(sid) == []


def overlay_address(backend: SwarmBackend, sid: str) -> str:
    """The sandbox's workspace's address on its own overlay."""
    nets = backend.inspect(f"sbx-{sid}-workspace")["NetworkSettings"]["Networks"]
    return str(nets[f"sbx-{sid}-net"]["IPAddress"])


def wait(http: httpx.Client, sid: str, states: tuple[str, ...], timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/sandboxes/{sid}").json()
        if body["state"] in states:
            return body
        time.sleep(1)
    raise AssertionError(f"{sid} never reached {states}: {body}")


@pytest.fixture(scope="module")
def cluster(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    lab = lab_settings()
    backend = SwarmBackend(lab["swarm_manager"], Path(lab["swarm_tls"]))
    ready = [n for n in backend.nodes() if n["Status"]["State"] == "ready"]
    assert len(ready) == 3, f"the lab swarm has {len(ready)} ready nodes, not 3: make swarm-lab"
    # This host's firewall answers the nodes on the AI gateway's port (another test may
    # have applied it without them).
    applied = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "sandbox-engine"), "firewall", "apply"],
        env={**os.environ, "SANDBOX_GATEWAY_PEERS": lab["gateway_peers"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    templates = tmp_path_factory.mktemp("templates")
    shutil.copytree(TEMPLATES, templates, dirs_exist_ok=True)
    state = tmp_path_factory.mktemp("pulumi-state")
    options: dict[str, Any] = {
        **lab,
        "max_live_sandboxes_per_key": 20,
        "creates_per_minute": 100,
        "warn_before": 0,
        "swarm_placement_timeout": 20,
        "stack_reserve": 0,
        # Node faults are seen by the reaper's pass (its drift check) and what a lost node
        # left by the orphan sweep: both often here.
        "reap_interval": 3,
        "sweep_interval": 10,
    }
    settings = Settings(
        database_url=module_database,
        pulumi_backend_url=f"file://{state}",
        templates_dir=templates,
        **options,
    )
    ids: list[str] = []
    with (
        gateway_port() as port,
        serving() as (upstream_url, upstream),
        member_api(
            module_database,
            state,
            templates,
            **options,
            gateway_serve=True,
            gateway_port=port,
            anthropic_upstream=upstream_url,
            anthropic_api_key=OPERATOR_KEY,
        ) as http,
    ):
        try:
            for _ in range(3 * PER_NODE):
                made = http.post("/api/v1/sandboxes", json={"template": "quarter"})
                assert made.status_code == 202, made.text
                ids.append(made.json()["id"])
            for sid in ids:
                body = wait(http, sid, ("running", "failed"))
                assert body["state"] == "running", body
            nodes = {sid: backend.node_of(f"sbx-{sid}-workspace") for sid in ids}
            yield Cluster(http, backend, settings, templates, nodes, ids, upstream)
        finally:
            for sid in ids:
                http.delete(f"/api/v1/sandboxes/{sid}")
            for sid in ids:
                wait(http, sid, ("destroyed", "failed"))
            left = {sid: backend.objects(sid) for sid in ids}
            assert not any(left.values()), left


def test_twelve_land_four_per_node_and_the_thirteenth_is_refused(cluster: Cluster) -> None:
    counted = collections.Counter(cluster.quarters.values())
    assert counted == {"lab-n1": PER_NODE, "lab-n2": PER_NODE, "lab-n3": PER_NODE}, counted

    made = cluster.http.post("/api/v1/sandboxes", json={"template": "quarter"})
    assert made.status_code == 202, made.text
    sid = made.json()["id"]
    cluster.made.append(sid)
    body = wait(cluster.http, sid, ("running", "failed"), timeout=300)
    assert body["state"] == "failed", body
    # Swarm's own words: no node has room (after the placement timeout).
    assert "insufficient resources on 3 nodes" in body["error"], body["error"]
    assert cluster.backend.objects(sid) == []


def test_a_worker_s_sandbox_works_as_on_one_host(cluster: Cluster) -> None:
    sid = cluster.on("lab-n3")[0]
    # The task was seeded on its node, as its user.
    code, out = cluster.sh(sid, "cat ~/workspace/seeded.txt || find ~ -name seeded.txt")
    assert code == 0 and "as coder" in out, out
    # The terminal: a candidate's token, the WebSocket, tmux in the container on lab-n3.
    http = cluster.http
    token = http.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
    url = f"ws://{http.base_url.host}:{http.base_url.port}/api/v1/ws/terminal/{sid}?token={token}"

    async def session() -> None:
        async with websockets.connect(url) as ws:
            term = Terminal(ws)
            await term.type("echo $((6*7))-$(id -un)\r")
            await term.expect("42-coder", within=30)

    asyncio.run(session())
    # Submit: the archive is taken from the container on its node.
    with httpx.Client(base_url=http.base_url, timeout=120) as candidate:
        report = candidate.post(f"/api/v1/access/{token}/submit").json()
    assert (report["archive"]["reason"], report["archive"]["error"]) == ("submitted", None), report
    [archive] = http.get(f"/api/v1/sandboxes/{sid}/archives").json()["items"]
    got = http.get(f"/api/v1/sandboxes/{sid}/archives/{archive['id']}")
    assert got.status_code == 200 and len(got.content) > 100, got.status_code


def test_sandboxes_on_other_nodes_and_beside_are_unreachable(cluster: Cluster) -> None:
    a, beside = cluster.on("lab-n2")[:2]
    other = cluster.on("lab-n3")[0]
    listen = "require('net').createServer(s => s.end('hello\\n')).listen(7000)"
    probe = "timeout 5 bash -c 'exec 3<>/dev/tcp/{}/7000 && head -c 5 <&3' 2>&1; echo rc=$?"
    for target in (beside, other):
        address = overlay_address(cluster.backend, target)
        cluster.sh(target, f"setsid node -e {shlex.quote(listen)} >/dev/null 2>&1 < /dev/null &")
        # It answers in its own sandbox: what the neighbour gets below is the network's doing.
        for _ in range(20):
            _, out = cluster.sh(target, probe.format(address))
            if "hello" in out:
                break
            time.sleep(0.5)
        assert "hello" in out, out
        _, out = cluster.sh(a, probe.format(address))
        assert "hello" not in out and "rc=0" not in out, (target, out)
    # A node's Docker API: TLS with a client certificate only.
    for node in ("10.214.0.11", "10.214.0.13"):
        _, out = cluster.sh(a, f"curl -sk -m 5 https://{node}:2376/containers/json; echo rc=$?")
        assert "rc=0" not in out and "Id" not in out, out


def test_a_sandbox_s_services_answer_by_name_across_nodes(cluster: Cluster) -> None:
    http = cluster.http
    # The cluster is full of quarters: two go from lab-n1 and one from lab-n2, so that
    # PostgreSQL's reservation (a CPU) fits lab-n1 alone and then its workspace's (a quarter
    # of a CPU) lab-n2 alone: the sandbox spans two nodes, its workspace on a worker.
    freed = cluster.on("lab-n1")[:2] + cluster.on("lab-n2")[:1]
    for sid in freed:
        http.delete(f"/api/v1/sandboxes/{sid}")
    for sid in freed:
        wait(http, sid, ("destroyed",))
        cluster.quarters.pop(sid)
    with cluster.running("with-db") as (sid, _):
        nodes = {k: cluster.backend.node_of(f"sbx-{sid}-{k}") for k in ("workspace", "postgres")}
        assert nodes == {"workspace": "lab-n2", "postgres": "lab-n1"}, nodes
        # From the workspace on lab-n2: PostgreSQL on lab-n1 by its name on the sandbox's
        # overlay (dnsrr: the task's own address), and it answers.
        code, out = cluster.sh(
            sid, "getent hosts postgres && timeout 5 bash -c 'echo > /dev/tcp/postgres/5432'"
        )
        assert code == 0, out
        print(f"with-db: {nodes}; postgres answers the workspace by name")


def test_claude_code_on_a_node_answers_through_the_gateway_its_token_bound_to_the_node(
    cluster: Cluster,
) -> None:
    """The real Claude Code CLI in a sandbox on a node, through the engine's AI gateway on
    the engine's host (the node's firewall admits it), to the stand-in upstream: the
    operator's key goes upstream only; the sandbox's token is refused from another node."""
    with cluster.running("claude") as (sid, _):
        node = cluster.backend.node_of(f"sbx-{sid}-workspace")
        before = len(cluster.upstream.seen)
        code, out = cluster.sh(sid, "cd ~ && claude -p 'hello from a node'", timeout=180)
        assert code == 0, out
        assert "Hello from the stand-in model" in out and "hello from a node" in out, out
        assert cluster.upstream.seen[before:], "nothing reached the upstream"
        for request in cluster.upstream.seen[before:]:
            assert request.headers.get("x-api-key") == OPERATOR_KEY
        code, out = cluster.sh(sid, f"cat {MANAGED_SETTINGS}")
        assert code == 0, out
        env = json.loads(out).get("env") or {}
        _, seen = cluster.sh(sid, "env; cat ~/.claude.json ~/.claude/* 2>/dev/null")
        assert OPERATOR_KEY not in out + seen, "the operator's key is in the sandbox"
        token, base = env.get("ANTHROPIC_AUTH_TOKEN", ""), env.get("ANTHROPIC_BASE_URL", "")
        assert token.startswith("sgt_") and base, env
        # The same token from a sandbox on another node: refused, for its address.
        other = next(s for s, n in cluster.quarters.items() if n != node)
        request = json.dumps(
            {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        )
        code, out = cluster.sh(
            other,
            f"curl -s -o /tmp/answer -w '%{{http_code}}\\n' -X POST {base}/v1/messages"
            f" -H 'Authorization: Bearer {token}' -H 'content-type: application/json'"
            f" -d {shlex.quote(request)}; cat /tmp/answer",
        )
        assert out.startswith("403\n") and "not from its sandbox" in out, out
        print(f"claude -p on {node}: answered; its token from {cluster.quarters[other]}: 403")


def edge_networks(cluster: Cluster) -> set[str]:
    client = cluster.backend.manager.connect(10)
    try:
        attrs = client.api.inspect_container(cluster.settings.swarm_edge)
    finally:
        client.close()
    return set((attrs.get("NetworkSettings") or {}).get("Networks") or {})


def test_a_published_port_is_routed_by_the_swarm_s_edge(cluster: Cluster) -> None:
    """Traefik on the manager reads the service's labels through its swarm provider and
    reaches the workspace's task on the sandbox's own overlay, which the engine connected it
    to; after the destroy the edge has left it and nothing is left."""
    edge = cluster.settings.swarm_edge_url
    with cluster.running("published") as (sid, body):
        host = f"{sid}-8000.{cluster.settings.domain}"
        assert body["endpoints"] == [{"port": 8000, "public": True, "url": f"http://{host}"}]
        assert f"sbx-{sid}-net" in edge_networks(cluster)
        page = f"hello from {sid} on {cluster.backend.node_of(f'sbx-{sid}-workspace')}"
        serve = f"require('http').createServer((q, s) => s.end({json.dumps(page)})).listen(8000)"
        code, out = cluster.sh(
            sid, f"setsid node -e {shlex.quote(serve)} >/dev/null 2>&1 < /dev/null &"
        )
        assert code == 0, out
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline:  # the provider polls the swarm every 2 s
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(edge, headers={"Host": host}, timeout=5)
                if answer.status_code == 200:
                    break
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, answer
        assert answer.text.strip() == page, answer.text
        other = httpx.get(edge, headers={"Host": f"{sid}-8001.{cluster.settings.domain}"})
        assert other.status_code == 404, other.text
        print(f"published on a swarm: {page!r} through the edge at {edge}")
    assert f"sbx-{sid}-net" not in edge_networks(cluster)


def test_plain_pulumi_sees_no_drift_and_a_memory_change_is_in_place(cluster: Cluster) -> None:
    sid = cluster.on("lab-n2")[-1]
    stack = f"sbx-{sid}"
    env = cli_env(cluster.settings, cluster.settings.backend_url())

    def pulumi(*args: str) -> str:
        done = subprocess.run(
            ["pulumi", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    pulumi("preview", "--diff", "--expect-no-changes", "--stack", stack)
    service = f"{stack}-workspace"
    before = cluster.backend.manager_service(service)
    template = cluster.templates / "quarter.yaml"
    original = template.read_text()
    template.write_text(original.replace('memory_limit: "256Mi"', 'memory_limit: "320Mi"'))
    try:
        diff = pulumi("preview", "--diff", "--stack", stack)
        assert "~ docker:index/service:Service" in diff and "replace" not in diff, diff
        assert str(256 * 2**20) in diff and str(320 * 2**20) in diff, diff
        pulumi("up", "--yes", "--skip-preview", "--stack", stack)
        after = cluster.backend.manager_service(service)
        assert after["ID"] == before["ID"]  # the same service, updated
        limits = after["Spec"]["TaskTemplate"]["Resources"]["Limits"]
        assert limits["MemoryBytes"] == 320 * 2**20, limits
        code, out = cluster.sh(sid, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
        assert code == 0 and out.strip() == str(320 * 2**20), out
    finally:
        template.write_text(original)


def lab(*args: str) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "deploy" / "swarm" / "lab.sh"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_lost_node_s_sandboxes_show_it_and_come_back_with_their_work(cluster: Cluster) -> None:
    http, backend = cluster.http, cluster.backend
    on_n3 = cluster.on("lab-n3")
    assert len(on_n3) == PER_NODE, cluster.quarters
    kept, dropped = on_n3[0], on_n3[1]
    code, out = cluster.sh(kept, "echo 'the candidate wrote this' > ~/work.txt")
    assert code == 0, out
    t0 = time.monotonic()
    lab("kill", "3")
    try:
        lost: dict[str, float] = {}
        while len(lost) < len(on_n3):
            assert time.monotonic() - t0 < 120, f"not all of {on_n3} shown lost: {lost}"
            for sid in on_n3:
                body = http.get(f"/api/v1/sandboxes/{sid}").json()
                if sid not in lost and body["state"] == "lost":
                    assert "lab-n3" in body["error"], body
                    lost[sid] = time.monotonic() - t0
            time.sleep(0.5)
        print(f"node lab-n3 killed: its {len(lost)} sandboxes shown lost after"
              f" {max(lost.values()):.1f} s at most")  # fmt: skip
        assert max(lost.values()) < 30, lost
        events = http.get(f"/api/v1/sandboxes/{kept}/timeline").text
        assert "lab-n3" in events, events[-2000:]
        # Creates go on, elsewhere: there is room on lab-n1 (the database test freed some).
        made = http.post("/api/v1/sandboxes", json={"template": "quarter"})
        assert made.status_code == 202, made.text
        new = made.json()["id"]
        cluster.made.append(new)
        assert wait(http, new, ("running", "failed"), timeout=300)["state"] == "running"
        assert backend.node_of(f"sbx-{new}-workspace") != "lab-n3"
        cluster.quarters[new] = backend.node_of(f"sbx-{new}-workspace")
        # The operator's choice for one: destroy it while its node is down.
        assert http.delete(f"/api/v1/sandboxes/{dropped}").status_code == 202
        wait(http, dropped, ("destroyed", "failed"))
        cluster.quarters.pop(dropped)
    finally:
        lab("start", "3")
    # Back: the rest are started again on lab-n3, with what the candidate wrote.
    for sid in on_n3:
        if sid != dropped:
            assert wait(http, sid, ("running", "failed"), timeout=300)["state"] == "running"
            assert backend.node_of(f"sbx-{sid}-workspace") == "lab-n3"
    code, out = cluster.sh(kept, "cat ~/work.txt")
    assert code == 0 and "the candidate wrote this" in out, out
    # What the destroyed one left on lab-n3 (its volume) goes once the node is back.
    deadline = time.monotonic() + 120
    while backend.objects(dropped):
        assert time.monotonic() < deadline, backend.objects(dropped)
        time.sleep(2)


def set_availability(backend: SwarmBackend, hostname: str, availability: str) -> None:
    """``docker node update --availability …`` through the manager's API."""
    client = backend.manager.connect(10)
    try:
        api = client.api
        node = next(n for n in api.nodes() if n["Description"]["Hostname"] == hostname)
        spec = {**node["Spec"], "Availability": availability}
        api.update_node(node["ID"], node["Version"]["Index"], node_spec=spec)
    finally:
        client.close()


def test_a_drained_node_s_sandboxes_show_it_and_come_back_when_it_is_active(
    cluster: Cluster,
) -> None:
    """The operator drains lab-n2: Swarm stops its tasks and, their restart policy being
    none, starts none elsewhere (their volumes are on lab-n2); the engine shows them lost,
    naming the node and the drain; creates go to the other nodes; once the node is active
    again they start there with their work."""
    http, backend = cluster.http, cluster.backend
    on_n2 = cluster.on("lab-n2")
    assert on_n2, cluster.quarters
    code, out = cluster.sh(on_n2[0], "echo kept-through-the-drain > ~/drained.txt")
    assert code == 0, out
    set_availability(backend, "lab-n2", "drain")
    try:
        t0 = time.monotonic()
        while True:
            bodies = {sid: http.get(f"/api/v1/sandboxes/{sid}").json() for sid in on_n2}
            if all(b["state"] == "lost" for b in bodies.values()):
                break
            assert time.monotonic() - t0 < 120, {s: b["state"] for s, b in bodies.items()}
            time.sleep(1)
        took = time.monotonic() - t0
        for body in bodies.values():
            assert "node lab-n2 drained" in body["error"], body
            assert "active again" in body["error"], body
        with cluster.running("quarter") as (new, _):
            assert backend.node_of(f"sbx-{new}-workspace") != "lab-n2"
    finally:
        set_availability(backend, "lab-n2", "active")
    for sid in on_n2:
        assert wait(http, sid, ("running", "failed"), timeout=300)["state"] == "running"
        assert backend.node_of(f"sbx-{sid}-workspace") == "lab-n2"
    code, out = cluster.sh(on_n2[0], "cat ~/drained.txt")
    assert code == 0 and "kept-through-the-drain" in out, out
    print(f"lab-n2 drained: its {len(on_n2)} sandboxes shown lost in {took:.1f} s; back on it")


@dataclass
class _Ran:
    exit_code: int
    output: bytes


class TaskContainer:
    """A task's container as ``tests.isolation_lab.in_shell`` uses one (docker-py's
    ``exec_run`` and ``put_archive``), through the swarm backend: on its node, over TLS."""

    def __init__(self, backend: SwarmBackend, service: str) -> None:
        self.backend, self.name = backend, service

    def exec_run(self, argv: list[str], user: str = "") -> _Ran:
        ran = self.backend.run(self.name, argv, user=user or None)
        return _Ran(ran.exit_code, ran.output)

    def put_archive(self, path: str, data: bytes) -> bool:
        self.backend.put_files(self.name, path, data)
        return True


def test_the_isolation_suite_s_attacks_are_blocked_on_a_node(cluster: Cluster) -> None:
    """tests/fixtures/attacks.py from a sandbox's terminal session, on its node: the node
    itself (its Docker API, the swarm's ports), the other nodes, the engine's host (but its AI
    gateway), metadata, and a neighbour on another node and beside it."""
    http, backend = cluster.http, cluster.backend
    made = http.post("/api/v1/sandboxes", json={"template": "quarter-py"})
    assert made.status_code == 202, made.text
    sid = made.json()["id"]
    cluster.made.append(sid)
    assert wait(http, sid, ("running", "failed"), timeout=300)["state"] == "running"
    service = f"sbx-{sid}-workspace"
    node = backend.node_of(service)
    nets = (backend.inspect(service).get("NetworkSettings") or {}).get("Networks") or {}
    tcp: list[list[object]] = []
    for net, conf in nets.items():
        if conf.get("Gateway"):
            tcp += [[f"the node via the {net} gateway", conf["Gateway"], p] for p in (2376, 7946)]
    for k in (1, 2, 3):
        address = f"10.214.0.{10 + k}"
        tcp += [[f"lab-n{k}'s {what}", address, port]
                for what, port in (("Docker API", 2376), ("swarm control", 2377),
                                   ("gossip", 7946))]  # fmt: skip
    tcp += [["the engine's host", "10.214.0.1", port] for port in (22, 5432, 8000, 55432)]
    tcp.append(["instance metadata", "169.254.169.254", 80])
    neighbours = [s for s, n in cluster.quarters.items() if n == node][:1]
    neighbours += [s for s, n in cluster.quarters.items() if n != node][:1]
    for other in neighbours:
        address = overlay_address(backend, other)
        tcp.append([f"a sandbox on {cluster.quarters[other]}", address, 22])
    names = [["a neighbour by name", f"sbx-{other}-workspace", 22] for other in neighbours]
    code, out = in_shell(
        TaskContainer(backend, service), ATTACKS, json.dumps({"tcp": tcp, "names": names})
    )
    assert code == 0, out
    results = json.loads(out)
    for r in results:
        print(f"{node}: {'BLOCKED' if r['blocked'] else 'OPEN   '}  {r['attack']}: {r['detail']}")
    open_ = [r for r in results if not r["blocked"]]
    blocked = len(results) - len(open_)
    print(f"attacks from a sandbox on {node}: {len(results)} made, {blocked} blocked")
    assert not open_, open_
    # Control: the engine's AI gateway port is the one port of the host it may reach (the
    # firewall's exception): a listener there answers, so the probes above met rules.
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # taken: an AI gateway already listens there
            listener = stack.enter_context(socket.create_server(("10.214.0.1", 8790)))
            threading.Thread(target=lambda: listener.accept(), daemon=True).start()
        probe = "import socket; socket.create_connection(('10.214.0.1', 8790), 3); print('ok')"
        ran = backend.run(service, ["python3", "-c", probe], user="coder")
        assert ran.text.strip() == "ok", ran.text


def test_what_a_swarm_does_not_do_yet_is_refused_before_anything_is_made(
    cluster: Cluster,
) -> None:
    template, why = "restricted", "egress rules"
    refused = cluster.http.post("/api/v1/sandboxes", json={"template": template})
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert why in refused.text and "template" in refused.text, refused.text


def test_creates_at_once_do_not_collide(cluster: Cluster) -> None:
    """Names and networks are the sandbox's own: the manager sees one service per container."""
    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda s: cluster.backend.objects(s), list(cluster.quarters)))
    for objects in names:
        assert sum(o.startswith("service ") for o in objects) == 1, objects
        assert sum(o.startswith("network ") for o in objects) == 1, objects
