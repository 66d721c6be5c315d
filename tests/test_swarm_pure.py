"""The swarm backend's pure parts: its settings, a stack's config on a swarm, the node
firewall's rules, the kernel check for encrypted overlays, what a swarm refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.host import node_firewall
from engine.host.doctor import kernel_lacks
from engine.settings import Settings


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
