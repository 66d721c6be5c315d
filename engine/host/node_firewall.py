"""The firewall of a Swarm node (``SANDBOX_BACKEND=swarm``, docs/cluster.md): what the host
firewall (engine/host/firewall.py) does for one host, for the sandboxes a node runs.

On a node, a task's container is on its sandbox's overlay and on the node's
``docker_gwbridge``, its way out. Overlays are kept apart by Swarm; what Docker allows is a
container reaching the node itself (its Docker API, the swarm's ports) and, through the node's
routing, every private address: other nodes, the engine's host and its services, the
network the cluster sits in. Two chains, matched by the interface:

- ``SANDBOX-NODE-INPUT`` (from INPUT, ``-i docker_gwbridge``): replies pass; anything new from
  a container to the node itself is rejected.
- ``SANDBOX-NODE-FORWARD`` (from DOCKER-USER, ``-i docker_gwbridge``): replies pass; new
  connections to the engine's AI gateway (its address and port) and DNS to the node's own
  resolvers pass; link-local, private
  and shared address ranges and the addresses given to ``--block`` (the engine host's public
  ones, say) are rejected; the rest (the internet: templates with egress open) passes.

``sandbox-engine firewall node --engine-address A [--gateway-port P] [--block ADDRESS ...]``
applies them (idempotent) on the node it runs on; ``deploy/swarm/lab.sh`` runs it in every
lab node's namespace.
"""

from __future__ import annotations

import ipaddress
import subprocess

INPUT_CHAIN = "SANDBOX-NODE-INPUT"
FORWARD_CHAIN = "SANDBOX-NODE-FORWARD"
BRIDGE = "docker_gwbridge"
CLOSED = ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
RESET = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]


class NodeFirewallError(RuntimeError):
    pass


def resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    """The node's DNS servers (IPv4): Docker's DNS forwards a container's outside lookups to
    them from the container's namespace, through the node's bridge."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    address = ipaddress.ip_address(words[1])
                    if address.version == 4 and not address.is_loopback:
                        found.append(str(address))
    except (OSError, ValueError):
        return found
    return found


def chain_rules(
    engine_address: str,
    gateway_port: int,
    block: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> dict[str, list[list[str]]]:
    """Each chain's rules, in order, as iptables arguments after ``-A <chain>``."""
    ipaddress.ip_address(engine_address)  # ValueError for anything else
    closed = [*CLOSED, *(str(ipaddress.ip_network(b, strict=False)) for b in block)]
    established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"]
    gateway = ["-d", f"{engine_address}/32", "-p", "tcp", "-m", "tcp", "--dport"]
    return {
        INPUT_CHAIN: [established, REJECT],
        FORWARD_CHAIN: [
            established,
            [*gateway, str(gateway_port), "-j", "RETURN"],
            *(
                [
                    "-d",
                    f"{ipaddress.ip_address(r)}/32",
                    "-p",
                    proto,
                    "-m",
                    proto,
                    "--dport",
                    "53",
                    "-j",
                    "RETURN",
                ]
                for r in dns
                for proto in ("udp", "tcp")
            ),
            *([["-d", net, *RESET] for net in closed]),
            *([["-d", net, *REJECT] for net in closed]),
        ],
    }


JUMPS = {INPUT_CHAIN: "INPUT", FORWARD_CHAIN: "DOCKER-USER"}


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NodeFirewallError(f"iptables {' '.join(args)}: {done.stderr.strip()}")
    return done


def apply(engine_address: str, gateway_port: int, block: tuple[str, ...] = ()) -> list[str]:
    """Install or refresh the chains and their jumps; the lines changed."""
    done: list[str] = []
    dns = tuple(resolvers())
    for chain, rules in chain_rules(engine_address, gateway_port, block, dns).items():
        want = [" ".join(sorted(f"-A {chain} {' '.join(r)}".replace(",", " ").split()))
                for r in rules]  # fmt: skip
        listed = _run("-S", chain, check=False)
        have = [
            " ".join(sorted(line.replace(",", " ").split()))
            for line in listed.stdout.splitlines()
            if line.startswith("-A ")
        ]
        if listed.returncode != 0 or have != want:
            _run("-N", chain, check=False)
            _run("-F", chain)
            for rule in rules:
                _run("-A", chain, *rule)
            done.append(f"chain {chain}")
        parent = JUMPS[chain]
        _run("-N", parent, check=False)  # DOCKER-USER before dockerd made it
        if _run("-C", parent, "-i", BRIDGE, "-j", chain, check=False).returncode != 0:
            _run("-I", parent, "1", "-i", BRIDGE, "-j", chain)
            done.append(f"{parent} -i {BRIDGE} -j {chain}")
    return done
