"""The host firewall that keeps sandboxes away from the host and its neighbours.

Docker already keeps bridge networks apart (its isolation chains) and the edge network has
inter-container traffic off. What Docker allows is a container reaching *the host itself*:
a packet to the bridge's gateway address, or to any of the host's addresses, is delivered
locally and meets only the INPUT chain, so every service listening on 0.0.0.0 (an SSH daemon,
a database, the API's internal port) would be one connect away. It also forwards to
link-local addresses, where clouds serve instance metadata and credentials.

Every bridge the engine makes is named ``sbx`` + 12 hex digits (``engine.spec.bridge_name``),
so two chains matched by interface cover every sandbox whatever Docker's address pools are:

- ``SANDBOX-INPUT`` (from INPUT, ``-i sbx+``): replies to connections the host opened
  (Traefik to a published port) pass; anything new from a sandbox to the host is rejected.
- ``SANDBOX-FORWARD`` (from DOCKER-USER, the chain Docker leaves to operators and evaluates
  first): sandboxes cannot reach link-local addresses (169.254.0.0/16).

The rules hold across dockerd restarts (Docker does not touch INPUT or DOCKER-USER's rules)
but not across reboots: ``sandbox-engine firewall apply`` belongs in the host's boot (see
docs/security.md). It needs root and the ``iptables`` command; IPv6 rules are applied when
``ip6tables`` exists.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from engine.spec import BRIDGE_PREFIX

INPUT_CHAIN = "SANDBOX-INPUT"
FORWARD_CHAIN = "SANDBOX-FORWARD"
IFACE = BRIDGE_PREFIX + "+"


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


def chain_rules(family: Family) -> dict[str, list[list[str]]]:
    """Each chain's rules, in order, as iptables arguments after ``-A <chain>``."""
    reject = ["-j", "REJECT", "--reject-with", family.reject]
    rules = {
        INPUT_CHAIN: [
            ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
            reject,
        ]
    }
    if family.link_local:
        rules[FORWARD_CHAIN] = [["-d", family.link_local, *reject]]
    return rules


# Where each chain is entered from: (parent chain, match).
JUMPS = {INPUT_CHAIN: "INPUT", FORWARD_CHAIN: "DOCKER-USER"}


def _run(family: Family, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [family.command, "-w", "10", *args], capture_output=True, text=True, check=False
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


def apply() -> list[str]:
    """Install or refresh the chains and their jumps (idempotent); the lines changed."""
    done: list[str] = []
    for family in families():
        for chain, rules in chain_rules(family).items():
            if not _chain_is(family, chain, rules):
                # Rewritten only when different: a flushed chain lets traffic through until
                # it is filled again, so a periodic apply must not flush a correct one.
                _run(family, "-N", chain, check=False)  # exists already: fine
                _run(family, "-F", chain)
                for rule in rules:
                    _run(family, "-A", chain, *rule)
                done.append(f"{family.command}: chain {chain}")
            parent = JUMPS[chain]
            _run(family, "-N", parent, check=False)  # DOCKER-USER before dockerd made it
            jump = ["-i", IFACE, "-j", chain]
            if _run(family, "-C", parent, *jump, check=False).returncode != 0:
                _run(family, "-I", parent, "1", *jump)
                done.append(f"{family.command}: {parent} -i {IFACE} -j {chain}")
    return done


def problems() -> list[str]:
    """What is missing or different from the rules above; empty when the host is covered."""
    found: list[str] = []
    for family in families():
        for chain, rules in chain_rules(family).items():
            if _run(family, "-S", chain, check=False).returncode != 0:
                found.append(f"{family.command}: chain {chain} is missing")
                continue
            if not _chain_is(family, chain, rules):
                found.append(f"{family.command}: chain {chain} has other rules")
            parent = JUMPS[chain]
            jump = ["-i", IFACE, "-j", chain]
            if _run(family, "-C", parent, *jump, check=False).returncode != 0:
                found.append(f"{family.command}: {parent} does not send {IFACE} to {chain}")
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


def remove() -> None:
    for family in families():
        for chain in chain_rules(family):
            parent = JUMPS[chain]
            jump = ["-i", IFACE, "-j", chain]
            while _run(family, "-C", parent, *jump, check=False).returncode == 0:
                _run(family, "-D", parent, *jump)
            _run(family, "-F", chain, check=False)
            _run(family, "-X", chain, check=False)
