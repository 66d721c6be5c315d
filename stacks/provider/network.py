"""``docker:index/network:Network``: every input forces a replacement, as upstream."""

from __future__ import annotations

import time
from typing import Any

import docker.errors
from docker.types import IPAMConfig, IPAMPool

from stacks.provider.errors import PropertyError
from stacks.provider.resource import Context, Resource, labels_to_dict, labels_to_wire
from stacks.provider.schema import BOOL, LABELS, STR, list_of, map_of, obj
from stacks.provider.wire import Props

IPAM = obj(subnet=STR, ipRange=STR, gateway=STR, auxAddress=map_of(STR))


class Network(Resource):
    token = "docker:index/network:Network"
    inputs = obj(
        name=STR,
        driver=STR,
        internal=BOOL,
        attachable=BOOL,
        ingress=BOOL,
        ipv6=BOOL,
        labels=LABELS,
        options=map_of(STR),
        ipamDriver=STR,
        ipamOptions=map_of(STR),
        ipamConfigs=list_of(IPAM),
    )
    computed = frozenset({"driver", "ipamDriver", "ipamConfigs", "options"})
    outputs = ("scope",)

    def create(self, ctx: Context, inputs: Props) -> tuple[str, Props]:
        pools = [
            IPAMPool(
                subnet=c.get("subnet"),
                iprange=c.get("ipRange"),
                gateway=c.get("gateway"),
                aux_addresses=c.get("auxAddress"),
            )
            for c in inputs.get("ipamConfigs", [])
        ]
        ipam = None
        if pools or inputs.get("ipamDriver") or inputs.get("ipamOptions"):
            ipam = IPAMConfig(
                driver=inputs.get("ipamDriver", "default"),
                pool_configs=pools,
                options=inputs.get("ipamOptions"),
            )
        name = inputs["name"]
        try:
            if ctx.docker.networks.list(names=[name]):
                # Docker allows two networks of one name; upstream refuses, and so do we.
                raise PropertyError("name", f"a network named {name!r} already exists")
            created = ctx.docker.api.create_network(
                name,
                driver=inputs.get("driver", "bridge"),
                options=inputs.get("options"),
                ipam=ipam,
                internal=inputs.get("internal", False),
                labels=labels_to_dict(inputs.get("labels")),
                enable_ipv6=inputs.get("ipv6", False),
                attachable=inputs.get("attachable", False),
                ingress=inputs.get("ingress", False),
            )
        except docker.errors.APIError as exc:
            raise PropertyError(_blame(exc), exc.explanation or str(exc)) from exc
        id_ = created["Id"]
        return id_, self.read_back(ctx, id_, inputs, after="create")

    def read(
        self, ctx: Context, id_: str, state: Props, inputs: Props
    ) -> tuple[Props, Props] | None:
        try:
            attrs: dict[str, Any] = ctx.docker.api.inspect_network(id_)
        except docker.errors.NotFound:
            return None
        ipam = attrs.get("IPAM") or {}
        actual: Props = {
            "name": attrs["Name"],
            "driver": attrs.get("Driver"),
            "ipamDriver": ipam.get("Driver") or "default",
            "ipamConfigs": [
                {
                    k: v
                    for k, v in {
                        "subnet": c.get("Subnet"),
                        "ipRange": c.get("IPRange"),
                        "gateway": c.get("Gateway"),
                        "auxAddress": c.get("AuxiliaryAddresses"),
                    }.items()
                    if v
                }
                for c in ipam.get("Config") or []
            ],
        }
        for key, wire in (
            ("Internal", "internal"),
            ("Attachable", "attachable"),
            ("Ingress", "ingress"),
            ("EnableIPv6", "ipv6"),
        ):
            if attrs.get(key):
                actual[wire] = True
        if attrs.get("Labels"):
            actual["labels"] = labels_to_wire(attrs["Labels"])
        if attrs.get("Options"):
            actual["options"] = attrs["Options"]
        if ipam.get("Options"):
            actual["ipamOptions"] = ipam["Options"]
        # Inputs keep what the program declared; Docker's fill-ins show in the outputs.
        new_inputs = self.declared(actual, inputs)
        return {
            **actual,
            **{k: v for k, v in inputs.items() if k not in actual},
            "scope": attrs.get("Scope", "local"),
        }, new_inputs

    def delete(self, ctx: Context, id_: str, state: Props) -> None:
        # An overlay's endpoints go a moment after its services' tasks (a swarm): retried.
        deadline = time.monotonic() + (30 if state.get("driver") == "overlay" else 0)
        while True:
            try:
                ctx.docker.api.remove_network(id_)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if time.monotonic() >= deadline or "active endpoints" not in str(exc.explanation):
                    raise
                time.sleep(0.5)


def _blame(exc: docker.errors.APIError) -> str:
    text = (exc.explanation or "").lower()
    if "subnet" in text or "pool" in text or "ipam" in text:
        return "ipamConfigs"
    if "driver" in text:
        return "driver"
    return "name"
