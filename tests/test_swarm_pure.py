"""The swarm backend's pure parts: its settings, a stack's config on a swarm, the node
firewall's rules, the kernel check for encrypted overlays, what a swarm refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.host import node_firewall
from engine.host.doctor import kernel_lacks
from engine.host.edge import Edge
from engine.settings import Settings
from stacks.swarm import service_labels


def _tls(tmp_path: Path) -> Path:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    return tmp_path


def test_a_swarm_needs_its_manager_and_certificates(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SANDBOX_SWARM_MANAGER"):
        Settings(backend="swarm")
    with pytest.raises(ValidationError, match="never reached without TLS"):
        Settings(backend="swarm", swarm_manager="tcp://10.0.0.1:2376")
    (tmp_path / "key.pem").unlink(missing_ok=True)
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ValidationError, match=r"lacks cert\.pem, key\.pem"):
        Settings(backend="swarm", swarm_manager="tcp://10.0.0.1:2376", swarm_tls=tmp_path)
    with pytest.raises(ValidationError, match="swarm_manager"):
        Settings(backend="swarm", swarm_manager="http://10.0.0.1", swarm_tls=_tls(tmp_path))
    with pytest.raises(ValidationError, match="backend"):
        Settings(backend="kubernetes")
    ok = Settings(backend="swarm", swarm_manager="tcp://10.0.0.1:2376", swarm_tls=_tls(tmp_path))
    assert ok.disks is False  # a disk is the engine host's loop device: not on the nodes
    assert Settings().backend == "docker" and Settings().disks is True


def test_the_node_firewall_admits_the_gateway_and_dns_and_closes_the_rest() -> None:
    rules = node_firewall.chain_rules("10.214.0.1", 8790, ("192.0.2.2",), ("10.255.255.53",))
    forward = [" ".join(r) for r in rules[node_firewall.FORWARD_CHAIN]]
    assert forward[0].startswith("-m conntrack --ctstate ESTABLISHED,RELATED")
    assert forward[1] == "-d 10.214.0.1/32 -p tcp -m tcp --dport 8790 -j RETURN"
    assert "-d 10.255.255.53/32 -p udp -m udp --dport 53 -j RETURN" in forward
    returns = [r for r in forward if r.endswith("RETURN")]
    assert len(returns) == 4  # replies, the gateway, DNS over UDP and TCP: nothing else
    for net in ("10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16", "192.0.2.2/32"):
        assert f"-d {net} -p tcp -j REJECT --reject-with tcp-reset" in forward
        assert f"-d {net} -j REJECT --reject-with icmp-admin-prohibited" in forward
    assert rules[node_firewall.INPUT_CHAIN][-1][-1] == "icmp-admin-prohibited"
    with pytest.raises(ValueError):
        node_firewall.chain_rules("not-an-address", 8790)


def test_the_node_s_resolvers_are_read_from_its_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.255.255.53\nnameserver 127.0.0.53\nnameserver ::1\nsearch x\n")
    assert node_firewall.resolvers(str(conf)) == ["10.255.255.53"]
    assert node_firewall.resolvers(str(tmp_path / "none")) == []


def test_encrypted_overlays_need_esp_and_gcm() -> None:
    assert kernel_lacks("CONFIG_INET_ESP=y\nCONFIG_CRYPTO_GCM=m\n") == []
    assert kernel_lacks("# CONFIG_INET_ESP is not set\nCONFIG_CRYPTO_GCM=y\n") == [
        "CONFIG_INET_ESP"
    ]
    assert kernel_lacks("") == ["CONFIG_INET_ESP", "CONFIG_CRYPTO_GCM"]


def test_the_swarm_edge_is_both_settings_and_gets_the_sandbox_hosts(tmp_path: Path) -> None:
    swarm = {
        "backend": "swarm",
        "swarm_manager": "tcp://10.0.0.1:2376",
        "swarm_tls": _tls(tmp_path),
    }
    with pytest.raises(ValidationError, match="go together"):
        Settings(**swarm, swarm_edge="sandbox-swarm-edge")
    with pytest.raises(ValidationError, match="swarm_edge_url"):
        Settings(**swarm, swarm_edge="e", swarm_edge_url="ftp://10.0.0.1")
    settings = Settings(
        **swarm,
        domain="sandbox.example.com",
        swarm_edge="sandbox-swarm-edge",
        swarm_edge_url="http://10.0.0.1:8089",
    )
    http = Edge(settings).dynamic()["http"]
    assert isinstance(http, dict)
    router = http["routers"]["swarm-sandboxes"]
    assert router["service"] == "swarm-edge" and router["priority"] == 1
    pattern = router["rule"].removeprefix("HostRegexp(`").removesuffix("`)")
    assert re.fullmatch(pattern, "0a1b2c3d4e-8000.sandbox.example.com")
    for other in ("sandbox.example.com", "api.sandbox.example.com.evil", "x-1.sandboxXexample.com"):
        assert not re.fullmatch(pattern, other), other
    assert http["services"]["swarm-edge"]["loadBalancer"]["servers"] == [
        {"url": "http://10.0.0.1:8089"}
    ]
    # The engine's own hosts keep their routes (longer rules: a higher priority than 1).
    assert {"engine-api", "engine-ui"} <= set(http["routers"])
    # One host: no such route.
    assert "swarm-sandboxes" not in Edge(Settings()).dynamic()["http"]["routers"]  # type: ignore[index]


def test_a_published_service_is_reached_on_its_own_overlay() -> None:
    labels = {"traefik.enable": "true", "traefik.docker.network": "sandbox-edge", "a": "b"}
    out = service_labels(labels, "sbx-0a1b2c3d4e-net")
    assert out["traefik.swarm.network"] == "sbx-0a1b2c3d4e-net"
    assert "traefik.docker.network" not in out and out["a"] == "b"
    assert "traefik.swarm.network" not in service_labels({"a": "b"}, "n")


def test_the_local_edge_balances_the_api_across_the_engines() -> None:
    settings = Settings(
        listen_port=8000, edge_engines="http://127.0.0.1:8001,http://10.0.0.5:8000/"
    )
    assert settings.engine_urls == [
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8001",
        "http://10.0.0.5:8000",
    ]
    http = Edge(settings).dynamic()["http"]
    assert isinstance(http, dict)
    servers = http["services"]["engine"]["loadBalancer"]["servers"]
    assert [s["url"] for s in servers] == settings.engine_urls
    assert Settings().engine_urls == [f"http://127.0.0.1:{Settings().listen_port}"]
    with pytest.raises(ValidationError, match="edge_engines"):
        Settings(edge_engines="127.0.0.1:8001")
