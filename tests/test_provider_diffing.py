"""Diff of inputs: update vs replace, as the upstream schema has it (pure)."""

from __future__ import annotations

import pytest

from stacks.provider.container import Container
from stacks.provider.diffing import Kind, diff_inputs
from stacks.provider.wire import UNKNOWN

IN_PLACE = frozenset({"memory", "restart"})


@pytest.mark.parametrize(
    ("olds", "news", "expected"),
    [
        ({"memory": 64}, {"memory": 64}, {}),
        ({"memory": 64}, {"memory": 128}, {"memory": Kind.UPDATE}),
        ({}, {"restart": "always"}, {"restart": Kind.ADD}),
        ({"envs": ["A=1"]}, {"envs": ["A=2"]}, {"envs": Kind.UPDATE_REPLACE}),
        ({"envs": ["A=1"]}, {}, {"envs": Kind.DELETE_REPLACE}),
        ({}, {"image": "x"}, {"image": Kind.ADD_REPLACE}),
        ({"envs": []}, {}, {}),  # empty and unset are the same to Docker
        ({"image": "x"}, {"image": UNKNOWN}, {"image": Kind.UPDATE_REPLACE}),
        ({"memory": 64}, {"memory": UNKNOWN}, {"memory": Kind.UPDATE}),
    ],
)
def test_diff_inputs(olds: dict, news: dict, expected: dict) -> None:
    assert diff_inputs(olds, news, in_place=IN_PLACE).detailed == expected


def test_computed_property_left_out_keeps_its_value() -> None:
    diff = diff_inputs({"hostname": "abc"}, {}, in_place=IN_PLACE, computed=frozenset({"hostname"}))
    assert diff.detailed == {}


def test_container_declaring_a_filled_in_value_is_no_change() -> None:
    c = Container()
    state = {"hostname": "abc", "image": "i"}
    assert c.diff({"image": "i"}, {"image": "i", "hostname": "abc"}, state).detailed == {}
    assert c.diff({"image": "i"}, {"image": "i", "hostname": "x"}, state).replaces == ["hostname"]


def test_container_keeps_docker_assigned_host_ports() -> None:
    c = Container()
    old = {
        "image": "i",
        "ports": [{"internal": 80, "ip": "0.0.0.0", "protocol": "tcp", "external": 32768}],
    }
    new = {"image": "i", "ports": [{"internal": 80, "ip": "0.0.0.0", "protocol": "tcp"}]}
    assert c.diff(old, new, old).detailed == {}


def test_container_stopped_while_it_must_run_is_replaced() -> None:
    c = Container()
    inputs = {"image": "i"}
    assert c.diff(inputs, inputs, {**inputs, "exitCode": 137}).replaces == ["mustRun"]
    relaxed = {"image": "i", "mustRun": False}
    assert c.diff(relaxed, relaxed, {**relaxed, "exitCode": 0}).detailed == {}
