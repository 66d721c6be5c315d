"""Egress rules, pure: entries, the check, the proxy's reading of requests and TLS hellos, the
restricted sandbox's spec and the firewall's rules for it."""

from __future__ import annotations

import ipaddress
import ssl

import pytest

from engine.egress import proxy
from engine.egress.presets import go_hosts, npm_hosts, pip_hosts
from engine.egress.setup import describe
from engine.host import firewall
from engine.model.egress import Rules, entry_problem, never_reached
from engine.model.spec import (
    CA_BUNDLE_PATH,
    EGRESS_PROXY_HOST,
    RESTRICTED_PREFIX,
    SandboxRequest,
    SpecSettings,
    bridge_name,
    build_spec,
)
from engine.model.templates import load
from tests.conftest import ROOT

PRESETS = {"python-packages": ["pypi.org", "files.pythonhosted.org"]}


@pytest.mark.parametrize(
    "entry",
    ["pypi.org", "*.corp.example", "10.20.0.0/16", "2001:db8::/32", "192.0.2.7", "go-modules"],
)
def test_entries_an_allow_list_takes(entry: str) -> None:
    assert entry_problem(entry) is None


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("http://pypi.org", "not a host name"),
        ("localhost", "not a host name"),  # a name of no domain: the host's own, say
        ("*.", "not a host name"),
        ("10.0.0.0/40", "not an IP network"),
        ("", "must be a host name"),
        (7, "must be a host name"),
        ("python_packages", "not a host name"),
    ],
)
def test_entries_an_allow_list_refuses(entry: object, words: str) -> None:
    found = entry_problem(entry)
    assert found is not None and words in found


def test_the_check_of_names_addresses_and_ports() -> None:
    rules = Rules.of("allow", ["python-packages", "*.corp.example", "10.20.0.0/16"], PRESETS)
    assert rules.refuses_name("pypi.org", 443) is None
    assert rules.refuses_name("PyPI.org.", 80) is None  # case and the root's dot
    assert rules.refuses_name("files.pythonhosted.org", 443) is None
    assert rules.refuses_name("mirror.corp.example", 443) is None
    assert "allow list" in (rules.refuses_name("corp.example", 443) or "")  # *.x: not x itself
    assert "allow list" in (rules.refuses_name("chat.example.com", 443) or "")
    assert "allow list" in (rules.refuses_name("evilpypi.org", 443) or "")
    assert "ports 80 and 443" in (rules.refuses_name("pypi.org", 22) or "")
    assert rules.refuses_address(ipaddress.ip_address("10.20.3.4")) is None
    assert rules.refuses_address(ipaddress.ip_address("10.21.0.1")) is not None
    assert rules.refuses_address(ipaddress.ip_address("2001:db8::1")) is not None
    none = Rules("none")
    assert none.refuses_name("pypi.org", 443) and none.refuses_address(
        ipaddress.ip_address("10.20.3.4")
    )
    # Kept as JSON in the database and read back the same.
    assert Rules.from_json(rules.to_json()) == rules
    assert describe(rules) == (
        "allow python-packages (pypi.org, files.pythonhosted.org), *.corp.example,"
        " 10.20.0.0/16, through the egress proxy"
    )


@pytest.mark.parametrize(
    ("address", "never"),
    [
        ("127.0.0.1", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("fe80::1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("203.0.113.80", False),
        ("10.1.2.3", False),
    ],
)
def test_addresses_the_proxy_never_connects_to(address: str, never: bool) -> None:
    assert never_reached(ipaddress.ip_address(address)) is never


def client_hello(name: str | None) -> bytes:
    """A real ClientHello, from Python's TLS stack."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    if name is None:
        context.check_hostname = False
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_of_a_client_hello() -> None:
    assert proxy.server_name(client_hello("files.pythonhosted.org")) == "files.pythonhosted.org"
    assert proxy.server_name(client_hello(None)) is None
    assert proxy.server_name(b"GET / HTTP/1.1\r\n") is None
    assert proxy.server_name(client_hello("pypi.org")[:20]) is None  # cut short: none


def test_requests_through_the_proxy_are_read_strictly() -> None:
    assert proxy._split("pypi.org:443", None) == ("pypi.org", 443)
    assert proxy._split("[2001:db8::1]:443", None) == ("2001:db8::1", 443)
    assert proxy._split("pypi.org", 80) == ("pypi.org", 80)
    for bad in ("pypi.org", "pypi.org:0", "pypi.org:99999", "pypi.org:x"):
        with pytest.raises(ValueError):
            proxy._split(bad, None)
    host, port, request = proxy._origin_form(
        "GET",
        "http://deb.example:8080/dists/x?y=1",
        ["Host: deb.example:8080", "Proxy-Connection: keep-alive", "Accept: */*"],
    )
    assert (host, port) == ("deb.example", 8080)
    assert request == b"GET /dists/x?y=1 HTTP/1.1\r\nHost: deb.example:8080\r\nAccept: */*\r\n\r\n"
    with pytest.raises(ValueError, match="http:// URL"):
        proxy._origin_form("GET", "/relative", [])
    with pytest.raises(ValueError, match="request line"):
        proxy._parse_head(b"hello\r\n\r\n")


def test_a_restricted_sandbox_s_spec(tmp_path: object) -> None:
    template = load(ROOT / "templates" / "interview-python.yaml")
    assert template.egress == "allow" and template.network.allow == ("python-packages",)
    settings = SpecSettings(
        egress_port=8792,
        egress_address="10.213.0.1",
        ca_bundle="/etc/ssl/certs/ca-certificates.crt",
    )
    spec = build_spec(template, SandboxRequest("abc123"), settings)
    assert spec.bridge.startswith(RESTRICTED_PREFIX) and len(spec.bridge) == 15
    workspace = next(c for c in spec.containers if c.key == "workspace")
    assert workspace.env["HTTPS_PROXY"] == f"http://{EGRESS_PROXY_HOST}:8792"
    assert workspace.env["https_proxy"] == workspace.env["HTTPS_PROXY"]
    assert workspace.extra_hosts == {EGRESS_PROXY_HOST: "10.213.0.1"}
    assert workspace.extra_networks == ()  # not on the shared edge network
    assert [b.target for b in workspace.binds] == [CA_BUNDLE_PATH]
    # An open template: no proxy, no prefix; the CA bundle only when the setting is set.
    open_template = load(ROOT / "templates" / "backend-python.yaml")
    plain = build_spec(open_template, SandboxRequest("abc123"), SpecSettings())
    ws = next(c for c in plain.containers if c.key == "workspace")
    assert not plain.bridge.startswith(RESTRICTED_PREFIX) and "HTTPS_PROXY" not in ws.env
    assert ws.binds == () and ws.extra_hosts == {}
    # A published port of a restricted workspace: Traefik reaches it on its own network.
    published = template.model_copy(update={"expose": open_template.expose})
    spec = build_spec(published, SandboxRequest("abc123"), SpecSettings())
    workspace = next(c for c in spec.containers if c.key == "workspace")
    assert workspace.labels["traefik.docker.network"] == spec.network
    assert workspace.extra_networks == ()


def test_no_open_bridge_name_carries_the_restricted_prefix() -> None:
    # "r" is no hex digit: an open sandbox's bridge never matches the firewall's sbxr+.
    names = [bridge_name(f"sbx-{i:06d}-net") for i in range(2000)]
    assert not any(n.startswith(RESTRICTED_PREFIX) for n in names)
    assert bridge_name("sbx-abc123-net", restricted=True).startswith(RESTRICTED_PREFIX)


def test_the_firewall_forwards_nothing_out_of_a_restricted_network() -> None:
    rules = firewall.chain_rules(firewall.FAMILIES[0], 8790)
    forward = [" ".join(r) for r in rules[firewall.FORWARD_CHAIN]]
    assert any(r.startswith("-i sbxr+ ! -o sbxr+ -p tcp -j REJECT") for r in forward)
    assert any(r.startswith("-i sbxr+ ! -o sbxr+ -j REJECT") for r in forward)
    admitted = [r for r in rules[firewall.INPUT_CHAIN] if "ACCEPT" in r]
    assert {r[r.index("--dport") + 1] for r in admitted} == {"8790", "8792", "8793"}
    parent, matches = firewall.jumps(firewall.GATEWAY_CHAIN, 8790)
    assert parent == "INPUT" and len(matches) == 3  # every port: sandboxes and lo only
    # TCP to a public address past the proxy goes to its catch port; private ones do not.
    catch = [" ".join(r) for r in rules[firewall.CATCH_CHAIN]]
    assert catch[0] == "-m addrtype --dst-type LOCAL -j RETURN"
    assert {r.split()[1] for r in catch[1:-1]} == set(firewall.PRIVATE)
    assert catch[-1] == "-p tcp -j REDIRECT --to-ports 8793"
    assert firewall.jumps(firewall.CATCH_CHAIN) == ("PREROUTING", [["-i", "sbxr+"]])
    assert firewall.CATCH_CHAIN not in firewall.chain_rules(firewall.FAMILIES[1], 8790)


def test_what_a_caught_connection_names() -> None:
    assert proxy._host_header(b"GET / HTTP/1.1\r\nHost: chat.example.com:8080\r\n\r\n") == (
        "chat.example.com"
    )
    assert proxy._host_header(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n") == "a.example"
    assert proxy._host_header(b"\x16\x03\x01") is None


PIP_DEFAULT = "default https://pypi.org/\nfiles files.pythonhosted.org\n"


@pytest.mark.parametrize(
    ("answer", "hosts"),
    [
        (PIP_DEFAULT + "env \nenv-extra \n", ["files.pythonhosted.org", "pypi.org"]),
        (  # a mirror in pip's config: its host, not PyPI's
            PIP_DEFAULT + "global.index-url='https://mirror.example/simple'\n"
            "user.extra-index-url='https://a.example/s https://b.example:8443/s'\nenv \n",
            ["a.example", "b.example", "mirror.example"],
        ),
        (  # the environment over the config
            PIP_DEFAULT + "global.index-url='https://mirror.example/simple'\n"
            "env https://env.example/simple\nenv-extra \n",
            ["env.example"],
        ),
    ],
)
def test_python_packages_is_what_pip_says(answer: str, hosts: list[str]) -> None:
    assert pip_hosts(answer) == hosts


def test_node_and_go_presets_are_what_npm_and_go_say() -> None:
    assert npm_hosts("https://registry.npmjs.org/\n") == ["registry.npmjs.org"]
    assert npm_hosts("") == []
    assert go_hosts("https://proxy.golang.org,direct\nsum.golang.org\n") == [
        "proxy.golang.org",
        "sum.golang.org",
    ]
    assert go_hosts("off\noff\n") == []
    assert go_hosts(
        "https://a.example|https://b.example\nsum.x+033de0ae+Ac4 https://s.example/\n"
    ) == [
        "a.example",
        "b.example",
        "s.example",
    ]
