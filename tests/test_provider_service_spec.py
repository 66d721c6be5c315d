"""The provider's ``Service`` without a swarm (pure): wire properties to Docker's ServiceSpec and
back, what Docker fills in is no drift, which changes replace, bad input named, the sticky
hold left out of what is read. Its life against a real swarm is in tests/test_swarm.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from stacks.provider.diffing import Kind
from stacks.provider.errors import CheckFailures
from stacks.provider.service import (
    HELD_LABEL,
    Service,
    _hold,
    _like,
    _unheld,
    from_spec,
    to_spec,
)

NET_ID = "k3x9net"
WIRE: dict[str, Any] = {
    "name": "sbx-abc123-workspace",
    "labels": [
        {"label": "io.sandbox-engine.sandbox", "value": "abc123"},
        {"label": "io.sandbox-engine.sticky", "value": "true"},
    ],
    "mode": {"replicated": {"replicas": 1}},
    "taskSpec": {
        "containerSpec": {
            "image": "workspace-base:latest",
            "hostname": "workspace",
            "env": {"A": "1", "SHELL": "/bin/bash"},
            "user": "coder",
            "dir": "/home/coder/workspace",
            "labels": [{"label": "io.sandbox-engine.pids-limit", "value": "256"}],
            "capDrops": ["ALL"],
            "hosts": [{"host": "egress-proxy", "ip": "10.0.0.1"}],
            "healthcheck": {"tests": ["CMD", "true"], "interval": "1m", "retries": 3},
            "mounts": [
                {
                    "type": "volume",
                    "source": "sbx-abc123-home",
                    "target": "/home/coder",
                    "volumeOptions": {
                        "labels": [{"label": "io.sandbox-engine.sandbox", "value": "abc123"}]
                    },
                },
                {"type": "tmpfs", "target": "/run/lock", "tmpfsOptions": {"sizeBytes": 1048576}},
            ],
        },
        "resources": {
            "limits": {"nanoCpus": 500000000, "memoryBytes": 268435456},
            "reservation": {"nanoCpus": 500000000, "memoryBytes": 268435456},
        },
        "restartPolicy": {"condition": "none"},
        "networksAdvanceds": [{"id": NET_ID, "aliases": ["workspace"]}],
        "forceUpdate": 2,
    },
    "endpointSpec": {"mode": "dnsrr"},
    "convergeConfig": {"delay": "1s", "timeout": "60s"},
}


def _as_docker_returns(spec: dict[str, Any]) -> dict[str, Any]:
    """What a manager answers for the spec it was given: its defaults filled in."""
    back = copy.deepcopy(spec)
    template = back["TaskTemplate"]
    template["ContainerSpec"]["Isolation"] = "default"
    template["ContainerSpec"]["Healthcheck"]["Timeout"] = 0  # absent → zero: not declared
    template["RestartPolicy"].update({"Delay": 5_000_000_000, "MaxAttempts": 0})
    template["Placement"] = {"Platforms": [{"Architecture": "amd64", "OS": "linux"}]}
    back["UpdateConfig"] = {"Parallelism": 1, "FailureAction": "pause", "Order": "stop-first"}
    back["EndpointSpec"]["Ports"] = None
    return back


def test_the_spec_docker_gets_has_the_limits_the_pids_label_and_the_network() -> None:
    spec = to_spec(WIRE)
    template = spec["TaskTemplate"]
    assert spec["Name"] == "sbx-abc123-workspace"
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
    assert template["Resources"]["Limits"] == {
        "NanoCPUs": 500000000,
        "MemoryBytes": 268435456,
        "Pids": 256,
    }
    assert template["Resources"]["Reservations"] == {
        "NanoCPUs": 500000000,
        "MemoryBytes": 268435456,
    }
    assert template["ContainerSpec"]["Env"] == ["A=1", "SHELL=/bin/bash"]
    assert template["ContainerSpec"]["Hosts"] == ["10.0.0.1 egress-proxy"]
    assert template["ContainerSpec"]["Healthcheck"]["Interval"] == 60 * 10**9
    assert template["Networks"] == [{"Target": NET_ID, "Aliases": ["workspace"]}]
    assert template["ForceUpdate"] == 2
    assert spec["EndpointSpec"] == {"Mode": "dnsrr"}


def test_what_docker_fills_in_is_no_drift_and_a_changed_limit_is() -> None:
    declared = {k: v for k, v in WIRE.items() if k != "convergeConfig"}
    back = _as_docker_returns(to_spec(WIRE))
    assert _like(from_spec(back, {NET_ID: "sbx-abc123-net"}), declared) == declared
    back["TaskTemplate"]["Resources"]["Limits"]["MemoryBytes"] = 2 * 268435456
    read = _like(from_spec(back, {}), declared)
    assert read["taskSpec"]["resources"]["limits"]["memoryBytes"] == 2 * 268435456


def test_a_duration_spelled_another_way_is_the_same() -> None:
    assert _like("60s", "1m") == "1m"
    assert _like("61s", "1m") == "61s"


def test_only_name_mode_and_auth_replace() -> None:
    service = Service()
    state = copy.deepcopy(WIRE)

    def diff(change: dict[str, Any]) -> dict[str, Kind]:
        news = {**copy.deepcopy(WIRE), **change}
        return service.diff(state, news, state).detailed

    memory = copy.deepcopy(WIRE["taskSpec"])
    memory["resources"]["limits"]["memoryBytes"] = 335544320
    assert diff({"taskSpec": memory}) == {"taskSpec": Kind.UPDATE}
    assert diff({"labels": []}) == {"labels": Kind.DELETE}
    assert diff({"name": "sbx-other-workspace"}) == {"name": Kind.UPDATE_REPLACE}
    assert diff({"mode": {"global": True}}) == {"mode": Kind.UPDATE_REPLACE}
    assert diff({"auth": {"serverAddress": "r.example"}}) == {"auth": Kind.ADD_REPLACE}
    assert diff({}) == {}
    assert service.delete_before_replace


NFS = {"target": "/a", "type": "nfs"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"taskSpec": {"containerSpec": {}}}, "taskSpec.containerSpec.image"),
        ({"taskSpec": {"containerSpec": {"image": "x"}, "restartPolicy": {"condition": "always"}}},
         "taskSpec.restartPolicy.condition"),
        ({"convergeConfig": {"timeout": "soon"}}, "convergeConfig.timeout"),
        ({"endpointSpec": {"mode": "ingress"}}, "endpointSpec.mode"),
        ({"updateConfig": {}}, "updateConfig"),
        ({"taskSpec": {"containerSpec": {"image": "x", "mounts": [NFS]}}},
         "taskSpec.containerSpec.mounts[0].type"),
    ],
)  # fmt: skip
def test_bad_input_names_the_property(change: dict[str, Any], field: str) -> None:
    with pytest.raises(CheckFailures) as info:
        Service().check({**WIRE, **change}, {}, autoname="svc-1234567")
    assert field in [p for p, _ in info.value.failures], info.value.failures


def test_an_unset_name_is_the_autoname() -> None:
    checked = Service().check({"taskSpec": WIRE["taskSpec"]}, {}, autoname="workspace-1a2b3c4")
    assert checked["name"] == "workspace-1a2b3c4"


def test_the_hold_on_a_node_is_not_read_back() -> None:
    spec = to_spec(WIRE)
    _hold(spec, "node7")
    assert spec["TaskTemplate"]["Placement"]["Constraints"] == ["node.id==node7"]
    assert spec["Labels"][HELD_LABEL] == "node7"
    assert _unheld(spec) == to_spec(WIRE)
    # A constraint the program declared stays.
    wire = copy.deepcopy(WIRE)
    wire["taskSpec"]["placement"] = {"constraints": ["node.role==worker"]}
    spec = to_spec(wire)
    _hold(spec, "node7")
    assert _unheld(spec)["TaskTemplate"]["Placement"]["Constraints"] == ["node.role==worker"]
