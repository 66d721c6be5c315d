"""Egress rules in real sandboxes (part of the isolation suite): the engine's egress proxy, the
host firewall's rules for restricted networks, presets read from the image's pip, and the
refusals on the sandbox's timeline and in the metrics.

Only the package registries are reached (this machine reaches nothing else): the refused
names are refused by the proxy before it resolves or connects anything, and the connections
that try to get past the proxy are aimed at a registry's own address, where the firewall
stops them on this host. The engine runs as its own process with the gateway and the proxy
on the ports the host firewall admits (taken in turn with other tests: tests/gateway_lock.py).
"""

from __future__ import annotations

import json
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import psycopg
import pytest

from engine.ai.workspace import MANAGED_SETTINGS
from engine.model.spec import CA_BUNDLE_PATH, L_ROLE, L_SANDBOX
from engine.settings import Settings
from tests.api_server import Engine, engine_http, prepare, wait_for_event, wait_for_state
from tests.conftest import ROOT
from tests.gateway_lock import gateway_port

TEMPLATES = ROOT / "tests" / "fixtures" / "egress-templates"
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
INDEX = "pypi.org"  # what python-packages allows (as pip in the image says)
NPM = "registry.npmjs.org"  # another registry: what an allow-py sandbox is refused


@dataclass
class World:
    engine: Engine
    http: httpx.Client
    database: str
    docker: docker.DockerClient
    ids: dict[str, str]

    def address(self, name: str) -> str:
        """The workspace's address on its sandbox's network."""
        networks = self._workspace(name).attrs["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])

    def _workspace(self, name: str) -> Any:
        found = self.docker.containers.list(
            filters={"label": [f"{L_SANDBOX}={self.ids[name]}", f"{L_ROLE}=workspace"]}
        )
        assert len(found) == 1, found
        return found[0]

    def sh(self, name: str, command: str, timeout: int = 120) -> tuple[int, str]:
        ran = self._workspace(name).exec_run(
            ["bash", "-c", f"timeout {timeout} bash -c {shlex.quote(command)}"], user="coder"
        )
        return ran.exit_code, ran.output.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def world(
    module_database: str,
    tmp_path_factory: pytest.TempPathFactory,
    docker_client: docker.DockerClient,
) -> Iterator[World]:
    assert HOST_BUNDLE.is_file(), f"{HOST_BUNDLE} (the host's CA bundle) is missing"
    with gateway_port() as port:
        key, _, env = prepare(
            module_database,
            tmp_path_factory.mktemp("pulumi-state"),
            SANDBOX_TEMPLATES_DIR=str(TEMPLATES),
            SANDBOX_WARN_BEFORE="0",
            SANDBOX_MAX_LIVE_SANDBOXES_PER_KEY="10",
            SANDBOX_GATEWAY_SERVE="true",
            SANDBOX_GATEWAY_PORT=str(port),
            # This machine's TLS to the registries is intercepted: the workspaces trust the
            # host's bundle, which holds the intercepting CA.
            SANDBOX_CA_BUNDLE=str(HOST_BUNDLE),
        )
        engine = Engine(env, tmp_path_factory.mktemp("engine") / "engine.log")
        engine.start()
        ids: dict[str, str] = {}
        http = engine_http(engine, key)
        try:
            names = ("allow-py", "closed", "open-py", "allow-py-gvisor", "allow-node", "allow-go")
            for name in names:
                made = http.post("/api/v1/sandboxes", json={"template": name})
                assert made.status_code == 202, made.text
                ids[name] = made.json()["id"]
            for sid in ids.values():
                wait_for_state(http, sid, "running")
            yield World(engine, http, module_database, docker_client, ids)
        finally:
            try:
                for sid in ids.values():
                    http.delete(f"/api/v1/sandboxes/{sid}")
                for sid in ids.values():
                    wait_for_state(http, sid, "destroyed")
            finally:
                http.close()
                engine.stop()


def address_of(name: str) -> str:
    """This host's address for a registry: the target of the attempts past the proxy."""
    return socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


def test_the_presets_are_what_pip_in_the_image_is_configured_with(world: World) -> None:
    code, said = world.sh(
        "allow-py",
        "python3 -c 'from pip._internal.models.index import PyPI; from urllib.parse import"
        " urlsplit; print(urlsplit(PyPI.url).hostname, PyPI.file_storage_domain)'",
    )
    assert code == 0, said
    hosts = sorted(said.split())
    assert len(hosts) == 2
    wait_for_event(world.database, world.ids["allow-py"], f"python-packages ({', '.join(hosts)})")


@pytest.mark.parametrize(
    ("name", "asked", "fetch"),
    [
        (
            "allow-node",
            "npm config get registry",
            "cd /tmp && npm view --silent is-number@7.0.0 version",
        ),
        (
            "allow-go",
            "go env GOPROXY GOSUMDB",
            "cd /tmp && rm -rf m && mkdir m && cd m && go mod init m >/dev/null 2>&1"
            " && go mod download -json golang.org/x/text@v0.3.8 | grep -c Version",
        ),
    ],
)
def test_node_and_go_presets_are_their_tools_own_and_work(
    world: World, name: str, asked: str, fetch: str
) -> None:
    code, said = world.sh(name, asked)
    assert code == 0, said
    wanted = sorted(
        {
            urlsplit(word if "//" in word else "//" + word).hostname or ""
            for word in said.replace(",", " ").replace("|", " ").split()
            if word not in ("direct", "off")
        }
    )
    wait_for_event(world.database, world.ids[name], f"({', '.join(wanted)})")
    code, out = world.sh(name, fetch, timeout=240)
    assert code == 0 and out.strip(), out
    code, out = world.sh(name, "curl -sS --max-time 20 https://pypi.org/")
    assert code != 0 and "403" in out, out  # another registry: not in its list


@pytest.mark.parametrize("name", ["allow-py", "allow-py-gvisor"])
def test_pip_installs_through_the_proxy_with_nothing_set_by_the_candidate(
    world: World, name: str
) -> None:
    code, out = world.sh(
        name,
        "cd /tmp && rm -rf dl && pip download --no-deps --no-cache-dir --disable-pip-version-check"
        " -d dl six && python3 -c 'import os; print(os.listdir(\"dl\"))'",
    )
    assert code == 0 and "six-" in out, out
    # The bundle the workspace trusts is the operator's, read-only.
    code, out = world.sh(name, f"touch {CA_BUNDLE_PATH}")
    assert code != 0 and ("Read-only" in out or "Permission denied" in out), out


@pytest.mark.parametrize("name", ["allow-py", "allow-py-gvisor"])
def test_nothing_gets_past_the_proxy(world: World, name: str) -> None:
    address = address_of(NPM)
    # Through the proxy: refused with its reason.
    code, out = world.sh(name, f"curl -sS --max-time 20 https://{NPM}/")
    assert code != 0 and "CONNECT tunnel failed, response 403" in out, out
    # The proxy variables unset, the registry's address given by hand: the firewall sends it
    # to the proxy's catch port, which records it (with the TLS name it sends) and closes it.
    code, out = world.sh(
        name,
        f"curl -sS --noproxy '*' --max-time 20 --resolve {NPM}:443:{address} https://{NPM}/",
    )
    assert code != 0 and "403" not in out, (code, out)
    # By raw address, through the proxy and past it.
    code, out = world.sh(name, f"curl -sS --max-time 20 -k https://{address}/")
    assert code != 0 and "403" in out, out
    code, out = world.sh(name, f"curl -sS --noproxy '*' --max-time 20 -k https://{address}/")
    assert code != 0, (code, out)
    # Another port of the same address.
    code, out = world.sh(name, f"curl -sS --noproxy '*' --max-time 20 http://{address}:8080/")
    assert code != 0, (code, out)
    # A private address (another sandbox's, on this host): reset by the firewall.
    neighbour = world.address("open-py")
    code, out = world.sh(name, f"curl -sS --noproxy '*' --max-time 20 http://{neighbour}:8000/")
    assert code == 7, (code, out)
    # UDP: refused at once (an ICMP answer), not silently lost.
    probe = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10);"
        f" s.connect(('{address}', 53)); s.send(b'x')\n"
        "try:\n    s.recv(1)\nexcept OSError as e:\n    print(type(e).__name__, e.errno)"
    )
    code, out = world.sh(name, f"python3 -c {shlex.quote(probe)}")
    assert code == 0 and "timeout" not in out.lower() and out.split()[0].endswith("Error"), out
    # Names outside do not resolve inside (this host's resolver is not on loopback, so
    # Docker's DNS asks it from the sandbox's network, which the firewall closes).
    code, out = world.sh(name, f"getent hosts {NPM}")
    assert code != 0, out
    sid = world.ids[name]
    wait_for_event(world.database, sid, f"refused {NPM}:443: not in the sandbox's allow list")
    wait_for_event(world.database, sid, f"refused {address}:443: not in the sandbox's allow list")
    past = "not through the egress proxy"
    wait_for_event(world.database, sid, f"refused {address}:443: a direct connection (to {NPM})")
    wait_for_event(world.database, sid, f"refused {address}:443: a direct connection, {past}")
    wait_for_event(world.database, sid, f"refused {address}:8080: a direct connection, {past}")


def test_a_name_outside_the_list_is_refused_and_shows_on_the_timeline(world: World) -> None:
    sid = world.ids["allow-py"]
    code, out = world.sh("allow-py", "curl -sS --max-time 20 https://chat.example.com/")
    assert code != 0 and "403" in out, out
    code, out = world.sh(
        "allow-py", "curl -sS -w ' %{http_code}' --max-time 20 http://chat.example.com/x"
    )
    assert out.endswith(" 403") and "not in the sandbox's allow list" in out, out
    # An allowed name on another port.
    code, out = world.sh("allow-py", f"curl -sS --max-time 20 https://{INDEX}:8443/")
    assert code != 0 and "403" in out, out
    wait_for_event(world.database, sid, "refused chat.example.com:443: not in the sandbox's")
    wait_for_event(world.database, sid, f"refused {INDEX}:8443: port 8443")
    timeline = world.http.get(f"/api/v1/sandboxes/{sid}/timeline")
    assert timeline.status_code == 200, timeline.text
    refused = [e["detail"] for e in timeline.json() if e["what"] == "egress"]
    assert any("chat.example.com:443" in d for d in refused), timeline.json()
    # Said once, as it was refused.
    assert "refused chat.example.com:443: not in the sandbox's allow list" in refused, refused
    assert any(f"{NPM}:443" in d for d in refused), timeline.json()
    # A repeat within the minute is counted, not recorded again.
    world.sh("allow-py", "curl -sS --max-time 20 https://chat.example.com/")
    with psycopg.connect(world.database) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM sandbox_events WHERE sandbox_id = %s AND message LIKE %s",
            (sid, "refused chat.example.com:443%"),
        ).fetchone() or (0,)
    assert count == 1
    metrics = world.http.get("/metrics").text
    line = next(
        (
            m
            for m in metrics.splitlines()
            if m.startswith("sandbox_engine_egress_connections_total")
            and 'template="allow-py"' in m
            and 'result="refused"' in m
        ),
        "",
    )
    assert line and float(line.split()[-1]) >= 4, metrics


def test_an_open_sandbox_beside_them_is_unaffected(world: World) -> None:
    code, out = world.sh("open-py", "env | grep -ic _proxy; true")
    assert out.strip() == "0", out  # no proxy of its own
    code, out = world.sh(
        "open-py",
        "cd /tmp && rm -rf dl && pip download --no-deps --no-cache-dir --disable-pip-version-check"
        " -d dl six",
    )
    assert code == 0 and "Saved" in out, out
    code, out = world.sh("open-py", f"curl -sS -o /dev/null -w '%{{http_code}}' https://{NPM}/")
    assert code == 0 and out.strip() != "000", out
    # The proxy (reached at its network's gateway address) lets it through nowhere: no rules
    # are its, and another sandbox's never apply.
    port = Settings().egress_port
    probe = (
        "import socket, struct\n"
        "hexed = [l.split()[2] for l in open('/proc/net/route') if l.split()[1] == '00000000'][0]\n"
        "gateway = socket.inet_ntoa(struct.pack('<I', int(hexed, 16)))\n"
        f"s = socket.create_connection((gateway, {port}), 10)\n"
        f"s.sendall(b'CONNECT {INDEX}:443 HTTP/1.1\\r\\n\\r\\n')\n"
        "print(s.recv(300).decode())"
    )
    code, out = world.sh("open-py", f"python3 -c {shlex.quote(probe)}")
    assert code == 0 and out.startswith("HTTP/1.1 403") and "egress rules only" in out, out


def test_a_tls_name_other_than_the_tunnel_s_is_refused(world: World) -> None:
    fronted = (
        "import socket, ssl, os\n"
        "port = os.environ['HTTPS_PROXY'].rsplit(':', 1)[1]\n"
        "s = socket.create_connection(('egress-proxy', int(port)), 20)\n"
        f"s.sendall(b'CONNECT {INDEX}:443 HTTP/1.1\\r\\nHost: {INDEX}:443\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
        "try:\n"
        "    ssl.create_default_context().wrap_socket(s, server_hostname='chat.example.com')\n"
        "    print('handshake done')\n"
        "except (OSError, ssl.SSLError) as e:\n"
        "    print('closed', type(e).__name__)\n"
    )
    _, out = world.sh("allow-py", f"python3 -c {shlex.quote(fronted)}")
    assert "200" in out and "closed" in out and "handshake done" not in out, out
    wait_for_event(
        world.database, world.ids["allow-py"], "TLS server name 'chat.example.com' is not"
    )


def test_its_own_services_and_the_ai_gateway_stay_reachable(world: World) -> None:
    probe = "import socket; socket.create_connection(('postgres', 5432), 10); print('ok')"
    code, out = world.sh("allow-py", f"python3 -c {shlex.quote(probe)}")
    assert code == 0 and "ok" in out, out
    for name in ("allow-py", "closed"):
        code, out = world.sh(name, f"cat {MANAGED_SETTINGS}")
        assert code == 0, out
        env = json.loads(out)["env"]
        # Claude Code's own variables send it to the gateway directly, not to the proxy.
        code, out = world.sh(
            name,
            f"NO_PROXY={env['NO_PROXY']} no_proxy={env['no_proxy']} curl -sS -i --max-time 20"
            f" {env['ANTHROPIC_BASE_URL']}/v1/models",
        )
        # The gateway's own answer (its token check), not the proxy's.
        assert code == 0 and out.startswith("HTTP/1.1 "), (name, out)
        assert "egress proxy" not in out and "gateway" in out, (name, out)


def test_a_sandbox_without_egress_reaches_nothing(world: World) -> None:
    code, out = world.sh(
        "closed", "pip download --no-deps --no-cache-dir -d /tmp/dl --retries 0 six"
    )
    assert code != 0 and "six" in out, out
    code, out = world.sh("closed", f"curl -sS --max-time 20 https://{NPM}/")
    assert code != 0 and "CONNECT tunnel failed, response 403" in out, out
    address = address_of(NPM)
    code, out = world.sh("closed", f"curl -sS --noproxy '*' --max-time 20 -k https://{address}/")
    assert code != 0, (code, out)
    sid = world.ids["closed"]
    wait_for_event(world.database, sid, f"refused {INDEX}:443: this sandbox may not reach")
    wait_for_event(world.database, sid, f"refused {NPM}:443: this sandbox may not reach")
    wait_for_event(world.database, sid, f"refused {address}:443: a direct connection")
    probe = "import socket; socket.create_connection(('postgres', 5432), 10); print('ok')"
    code, out = world.sh("closed", f"python3 -c {shlex.quote(probe)}")
    assert code == 0 and "ok" in out, out


def test_the_proxy_serves_restricted_sandboxes_only(world: World) -> None:
    port = Settings().egress_port
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(f"CONNECT {INDEX}:443 HTTP/1.1\r\n\r\n".encode())
        answer = s.recv(500).decode()
    assert answer.startswith("HTTP/1.1 403") and "egress rules only" in answer, answer
