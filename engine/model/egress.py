"""A sandbox's egress rules, pure: the entries a template or the settings may list, the list
one sandbox is checked against, and the check.

An entry is a host name (``pypi.org``: that name only), a wildcard domain (``*.example.com``:
every name under it, not the domain itself), an IP network (``10.20.0.0/16``, ``2001:db8::/32``:
any port of its addresses), or the name of a preset (``python-packages``), which becomes host
names when the sandbox is made (engine/egress/presets.py). Names reach ports 80 and 443 only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

MODES = ("open", "none", "allow")
PRESETS = ("python-packages", "node-packages", "go-modules")
MAX_ENTRIES = 64
NAME_PORTS = (80, 443)
HOST = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def entry_problem(entry: Any) -> str | None:
    """Why an entry cannot be listed, or None when it can."""
    if not isinstance(entry, str) or not entry.strip():
        return "must be a host name, *.domain, an IP network or a preset name"
    value = entry.strip().lower()
    if value in PRESETS:
        return None
    if _is_address(value.split("/", 1)[0]):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{entry!r} is not an IP network (10.0.0.0/8, 2001:db8::/32)"
        return None
    name = value[2:] if value.startswith("*.") else value
    if not HOST.match(name) or "." not in name:
        known = ", ".join(PRESETS)
        return f"{entry!r} is not a host name, *.domain, IP network or preset ({known})"
    return None


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Rules:
    """What one sandbox may reach: ``mode`` none (nothing) or allow (the lists)."""

    mode: str
    hosts: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()  # "example.com" for "*.example.com"
    networks: tuple[Network, ...] = ()
    # Presets as listed, and the host names each became (shown in events and the API).
    presets: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, mode: str, entries: list[str], presets: dict[str, list[str]]) -> Rules:
        """The rules from entries (presets already read: ``presets`` maps each listed one
        to its host names)."""
        hosts: set[str] = set()
        domains: set[str] = set()
        networks: list[Network] = []
        for raw in entries:
            value = raw.strip().lower()
            if value in PRESETS:
                for name in presets.get(value, []):
                    (domains.add(name[2:]) if name.startswith("*.") else hosts.add(name))
            elif _is_address(value.split("/", 1)[0]):
                networks.append(ipaddress.ip_network(value, strict=False))
            elif value.startswith("*."):
                domains.add(value[2:])
            else:
                hosts.add(value)
        return cls(
            mode,
            frozenset(hosts),
            frozenset(domains),
            tuple(networks),
            {k: v for k, v in presets.items() if k in {e.strip().lower() for e in entries}},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "hosts": sorted(self.hosts),
            "domains": sorted(self.domains),
            "networks": [str(n) for n in self.networks],
            "presets": self.presets,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rules:
        return cls(
            str(data["mode"]),
            frozenset(data.get("hosts", [])),
            frozenset(data.get("domains", [])),
            tuple(ipaddress.ip_network(n) for n in data.get("networks", [])),
            dict(data.get("presets", {})),
        )

    def refuses_name(self, host: str, port: int) -> str | None:
        """Why a connection to a host name is refused, or None when it is allowed."""
        if self.mode != "allow":
            return "this sandbox may not reach outside its network"
        name = host.lower().rstrip(".")
        listed = name in self.hosts or any(name.endswith("." + d) for d in self.domains)
        if not listed:
            return "not in the sandbox's allow list"
        if port not in NAME_PORTS:
            return f"port {port}: names are allowed on ports 80 and 443 only"
        return None

    def refuses_address(self, address: Address) -> str | None:
        """Why a connection to an IP address (asked for by address) is refused, or None."""
        if self.mode != "allow":
            return "this sandbox may not reach outside its network"
        if any(address in n for n in self.networks if n.version == address.version):
            return None
        return "not in the sandbox's allow list"


def never_reached(address: Address) -> bool:
    """Addresses the proxy never connects to for a name, whatever it resolved to: the host's
    loopback, link-local (clouds' instance metadata), multicast and unspecified addresses."""
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)
    )
