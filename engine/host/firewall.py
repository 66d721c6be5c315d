"""The host firewall that keeps sandboxes away from the host and its neighbours.

Docker already keeps bridge networks apart (its isolation chains) and the edge network has
inter-container traffic off. What Docker allows is a container reaching *the host itself*:
a packet to the bridge's gateway address, or to any of the host's addresses, is delivered
locally and meets only the INPUT chain, so every service listening on 0.0.0.0 (an SSH daemon,
a database, the API's internal port) would be one connect away. It also forwards to
link-local addresses, where clouds serve instance metadata and credentials.

Every bridge the engine makes is named ``sbx`` + 12 hex digits (``engine.model.spec.bridge_name``),
so two chains matched by interface cover every sandbox whatever Docker's address pools are:

- ``SANDBOX-INPUT`` (from INPUT, ``-i sbx+``): replies to connections the host opened
  (Traefik to a published port) pass, and new connections to the AI gateway's port
  (``SANDBOX_GATEWAY_PORT``: Claude Code's only way to the model, with its sandbox's token);
  anything else new from a sandbox to the host is rejected.
- ``SANDBOX-GATEWAY`` (from INPUT, ``-p tcp --dport <gateway port>``): the gateway's port
  answers sandboxes and the host itself (loopback) only, never another machine — but those of
  ``SANDBOX_GATEWAY_PEERS`` (a swarm's nodes, whose sandboxes reach it through their node).
- ``SANDBOX-FORWARD`` (from DOCKER-USER, the chain Docker leaves to operators and evaluates
  first): sandboxes cannot reach link-local addresses (169.254.0.0/16); and a sandbox with
  egress rules (its bridge ``sbxr`` + 11 hex digits, ``engine.model.spec.RESTRICTED_PREFIX``)
  reaches nothing outside its own network at all — whatever address, port or protocol — so
  its only way out is the egress proxy's port on the host (engine/egress/proxy.py), which
  ``SANDBOX-INPUT`` admits beside the gateway's and ``SANDBOX-GATEWAY`` keeps from other
  machines the same way.
- ``SANDBOX-EGRESS`` (nat, from PREROUTING, ``-i sbxr+``): such a sandbox's TCP to a public
  address is redirected to the proxy's catch port (``SANDBOX_EGRESS_CATCH_PORT``), which
  records it as a refused connection on the sandbox's timeline and closes it; its own and
  other private networks are left to ``SANDBOX-FORWARD``'s reject.

The rules hold across dockerd restarts (Docker does not touch INPUT or DOCKER-USER's rules)
but not across reboots: ``sandbox-engine firewall apply`` belongs in the host's boot (see
docs/security.md). It needs root and the ``iptables`` command; IPv6 rules are applied when
``ip6tables`` exists.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from engine.model.spec import BRIDGE_PREFIX, RESTRICTED_PREFIX

INPUT_CHAIN = "SANDBOX-INPUT"
FORWARD_CHAIN = "SANDBOX-FORWARD"
GATEWAY_CHAIN = "SANDBOX-GATEWAY"
CATCH_CHAIN = "SANDBOX-EGRESS"  # in the nat table
NAT_CHAINS = (CATCH_CHAIN, "PREROUTING")
# Destinations a restricted sandbox's TCP is not sent to the proxy's catch port for: its own
# network and every other private one (refused all the same, by SANDBOX-FORWARD).
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
IFACE = BRIDGE_PREFIX + "+"
RESTRICTED = RESTRICTED_PREFIX + "+"


@dataclass(frozen=True)
class Family:
    command: str  # iptables or ip6tables
    reject: str  # the ICMP answer a rejected packet gets
    link_local: str | None  # forwarded to, when the family is forwarded at all


FAMILIES = (
    Family("iptables", "icmp-admin-prohibited", "169.254.0.0/16"),
    # Link-local IPv6 is never routed, and Docker forwards no IPv6 for these networks.
    Family("ip6tables", "icmp6-adm-prohibited", None),
)


class FirewallError(RuntimeError):
    pass


def gateway_port(given: int | None = None) -> int:
    """The AI gateway's port the rules admit: ``given``, or the settings' (0: none)."""
    if given is not None:
        return given
    from engine.settings import Settings

    return Settings().gateway_port


def egress_port() -> int:
    """The egress proxy's port the rules admit (the settings')."""
    from engine.settings import Settings

    return Settings().egress_port


def catch_port() -> int:
    """The egress proxy's port for connections that went past it (the settings')."""
    from engine.settings import Settings

    return Settings().egress_catch_port


def peers() -> list[str]:
    """Networks whose machines the gateway's ports answer besides sandboxes (a swarm's
    nodes: SANDBOX_GATEWAY_PEERS)."""
    import ipaddress

    from engine.settings import Settings

    text = Settings().gateway_peers
    return [
        str(ipaddress.ip_network(p.strip(), strict=False)) for p in text.split(",") if p.strip()
    ]


def admitted(port: int | None = None) -> list[int]:
    """The host's ports sandboxes may open connections to: the AI gateway's and the egress
    proxy's two."""
    return [p for p in dict.fromkeys((gateway_port(port), egress_port(), catch_port())) if p]


def chain_rules(family: Family, port: int | None = None) -> dict[str, list[list[str]]]:
    """Each chain's rules, in order, as iptables arguments after ``-A <chain>``."""
    ports = admitted(port)
    reject = ["-j", "REJECT", "--reject-with", family.reject]
    rules = {
        INPUT_CHAIN: [
            ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
            *([["-p", "tcp", "-m", "tcp", "--dport", str(p), "-j", "ACCEPT"] for p in ports]),
            reject,
        ],
        GATEWAY_CHAIN: [
            ["-i", IFACE, "-j", "RETURN"],
            ["-i", "lo", "-j", "RETURN"],
            *(
                ["-s", net, "-j", "RETURN"]
                for net in peers()
                if (":" in net) == (family.command == "ip6tables")
            ),
            reject,
        ],
    }
    outside = ["-i", RESTRICTED, "!", "-o", RESTRICTED]
    rules[FORWARD_CHAIN] = [
        *([["-d", family.link_local, *reject]] if family.link_local else []),
        # A restricted sandbox's network forwards nothing out; TCP is reset, so that a
        # connection past the proxy fails at once rather than after a timeout.
        [*outside, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        [*outside, *reject],
    ]
    if family.command == "iptables":
        # A restricted sandbox's TCP to a public address, past the proxy (its variables unset,
        # a raw address, another port), goes to the proxy's catch port, which records it as
        # a refusal and closes it.
        rules[CATCH_CHAIN] = [
            ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"],
            *(["-d", net, "-j", "RETURN"] for net in PRIVATE),
            ["-p", "tcp", "-j", "REDIRECT", "--to-ports", str(catch_port())],
        ]
    return rules


def jumps(chain: str, port: int | None = None) -> tuple[str, list[list[str]]]:
    """Where a chain is entered from: (parent chain, the matches that send packets to it)."""
    if chain == GATEWAY_CHAIN:
        return "INPUT", [["-p", "tcp", "-m", "tcp", "--dport", str(p)] for p in admitted(port)]
    if chain == CATCH_CHAIN:
        return "PREROUTING", [["-i", RESTRICTED]]
    return {INPUT_CHAIN: "INPUT", FORWARD_CHAIN: "DOCKER-USER"}[chain], [["-i", IFACE]]


def _run(family: Family, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    table = ["-t", "nat"] if len(args) > 1 and args[1] in NAT_CHAINS else []
    done = subprocess.run(
        [family.command, "-w", "10", *table, *args], capture_output=True, text=True, check=False
    )
    if check and done.returncode != 0:
        raise FirewallError(
            f"{family.command} {' '.join(args)}: {done.stderr.strip() or done.returncode}"
        )
    return done


def families() -> list[Family]:
    """The families this host can filter; iptables is required, ip6tables optional."""
    if shutil.which("iptables") is None:
        raise FirewallError("the iptables command is missing (Debian: apt-get install iptables)")
    return [f for f in FAMILIES if shutil.which(f.command)]


def apply(port: int | None = None) -> list[str]:
    """Install or refresh the chains and their jumps (idempotent); the lines changed. A jump
    to the gateway's chain for another port (the setting changed) is removed."""
    done: list[str] = []
    port = gateway_port(port)
    ports = admitted(port)
    for family in families():
        for stale in _gateway_jumps(family):
            if stale not in ports:
                match = ["-p", "tcp", "-m", "tcp", "--dport", str(stale)]
                _run(family, "-D", "INPUT", *match, "-j", GATEWAY_CHAIN)
                done.append(
                    f"{family.command}: INPUT no longer sends port {stale} to {GATEWAY_CHAIN}"
                )
        for chain, rules in chain_rules(family, port).items():
            if not _chain_is(family, chain, rules):
                # Rewritten only when different: a flushed chain lets traffic through until
                # it is filled again, so a periodic apply must not flush a correct one.
                _run(family, "-N", chain, check=False)  # exists already: fine
                _run(family, "-F", chain)
                for rule in rules:
                    _run(family, "-A", chain, *rule)
                done.append(f"{family.command}: chain {chain}")
            parent, matches = jumps(chain, port)
            _run(family, "-N", parent, check=False)  # DOCKER-USER before dockerd made it
            for match in matches:
                sends = [*match, "-j", chain]
                if _run(family, "-C", parent, *sends, check=False).returncode != 0:
                    _run(family, "-I", parent, "1", *sends)
                    done.append(f"{family.command}: {parent} {' '.join(sends)}")
    return done


def _gateway_jumps(family: Family) -> list[int]:
    """Ports INPUT sends to the gateway's chain now."""
    listed = _run(family, "-S", "INPUT", check=False).stdout.splitlines()
    ports = []
    for line in listed:
        words = line.split()
        if f"{GATEWAY_CHAIN}" in words and "--dport" in words:
            ports.append(int(words[words.index("--dport") + 1]))
    return ports


def problems(port: int | None = None) -> list[str]:
    """What is missing or different from the rules above; empty when the host is covered."""
    found: list[str] = []
    port = gateway_port(port)
    for family in families():
        for chain, rules in chain_rules(family, port).items():
            if _run(family, "-S", chain, check=False).returncode != 0:
                found.append(f"{family.command}: chain {chain} is missing")
                continue
            if not _chain_is(family, chain, rules):
                found.append(f"{family.command}: chain {chain} has other rules")
            parent, matches = jumps(chain, port)
            for match in matches:
                if _run(family, "-C", parent, *match, "-j", chain, check=False).returncode != 0:
                    found.append(
                        f"{family.command}: {parent} does not send {' '.join(match)} to {chain}"
                    )
    return found


def _chain_is(family: Family, chain: str, rules: list[list[str]]) -> bool:
    listed = _run(family, "-S", chain, check=False)
    if listed.returncode != 0:
        return False
    want = [f"-A {chain} {' '.join(r)}" for r in rules]
    have = [line for line in listed.stdout.splitlines() if line.startswith("-A ")]
    return [normalise(line) for line in have] == [normalise(line) for line in want]


def normalise(rule: str) -> str:
    """iptables prints rules back in its own spelling (``-d 169.254.0.0/16`` stays, but the
    order of conntrack states and some words may not): compare as word sets."""
    return " ".join(sorted(rule.replace(",", " ").split()))


def remove(port: int | None = None) -> None:
    for family in families():
        for chain in chain_rules(family, port):
            parent, matches = jumps(chain, port)
            for match in matches:
                while _run(family, "-C", parent, *match, "-j", chain, check=False).returncode == 0:
                    _run(family, "-D", parent, *match, "-j", chain)
            _run(family, "-F", chain, check=False)
            _run(family, "-X", chain, check=False)
