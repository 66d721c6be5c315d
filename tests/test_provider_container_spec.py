"""Container inputs ⇄ Docker Engine API (pure): normalization, units, and a round trip."""

from __future__ import annotations

import pytest

from stacks.provider import container_spec as spec
from stacks.provider.container import Container
from stacks.provider.errors import CheckFailures


@pytest.mark.parametrize(
    ("text", "ns"),
    [("30s", 30 * 10**9), ("1m30s", 90 * 10**9), ("500ms", 5 * 10**8), ("1h", 3600 * 10**9)],
)
def test_durations(text: str, ns: int) -> None:
    assert spec.duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "30", "abc", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        spec.duration_ns(text)


def test_normalize_drops_defaults_and_canonicalizes() -> None:
    got = spec.normalize(
        {
            "image": "i",
            "start": True,
            "mustRun": True,
            "restart": "no",
            "memory": 0,
            "cpus": "2.0",
            "ports": [{"internal": 81}, {"internal": 80, "protocol": "udp"}],
            "healthcheck": {"tests": ["CMD", "true"], "interval": "1m", "retries": 0},
            "capabilities": {"adds": [], "drops": ["NET_RAW", "ALL"]},
            "envs": [],
        }
    )
    assert got == {
        "image": "i",
        "cpus": "2",
        "ports": [
            {"internal": 80, "ip": "0.0.0.0", "protocol": "udp"},
            {"internal": 81, "ip": "0.0.0.0", "protocol": "tcp"},
        ],
        "healthcheck": {"tests": ["CMD", "true"], "interval": "60s"},
        "capabilities": {"drops": ["ALL", "NET_RAW"]},
    }


def test_pids_limit_label_sets_the_process_limit() -> None:
    config, _ = spec.to_engine_config(
        {"image": "i", "labels": [{"label": spec.PIDS_LIMIT_LABEL, "value": "300"}]}
    )
    assert config["HostConfig"]["PidsLimit"] == 300
    assert config["Labels"] == {spec.PIDS_LIMIT_LABEL: "300"}


def test_engine_config_uses_docker_units() -> None:
    config, extra = spec.to_engine_config(
        {
            "image": "i",
            "name": "n",
            "memory": 512,
            "memorySwap": -1,
            "shmSize": 64,
            "cpus": "1.5",
            "restart": "on-failure",
            "maxRetryCount": 3,
            "networksAdvanced": [{"name": "a", "aliases": ["x"]}, {"name": "b"}],
            "ports": [{"internal": 8080, "ip": "127.0.0.1", "protocol": "tcp", "external": 9000}],
            "volumes": [{"volumeName": "v", "containerPath": "/d", "readOnly": True}],
        }
    )
    host = config["HostConfig"]
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["MemorySwap"] == -1
    assert host["ShmSize"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 1_500_000_000
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert host["NetworkMode"] == "a"
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "9000"}]}
    assert host["Binds"] == ["v:/d:ro"]
    assert config["NetworkingConfig"] == {"EndpointsConfig": {"a": {"Aliases": ["x"]}}}
    assert extra == [{"name": "b"}]


def test_round_trip_through_an_inspect_shaped_document() -> None:
    inputs = spec.normalize(
        {
            "image": "img",
            "name": "n",
            "command": ["sleep", "1"],
            "envs": ["A=1"],
            "memory": 64,
            "cpus": "0.5",
            "restart": "always",
            "labels": [{"label": "k", "value": "v"}],
            "capabilities": {"drops": ["ALL"]},
            "securityOpts": ["no-new-privileges"],
            "ports": [{"internal": 80, "external": 8080}],
            "tmpfs": {"/run": "size=1m"},
            "volumes": [{"volumeName": "home", "containerPath": "/home"}],
            "mounts": [{"target": "/m", "type": "volume", "source": "v2", "readOnly": True}],
            "ulimits": [{"name": "nofile", "soft": 1, "hard": 2}],
        }
    )
    config, _ = spec.to_engine_config(inputs)
    host = config.pop("HostConfig")
    inspect = {
        "Id": "abc",
        "Name": "/n",
        "Config": {**config, "Env": ["PATH=/bin", "A=1"]},
        "HostConfig": host,
        "NetworkSettings": {"Networks": {"bridge": {}}},
    }
    back = spec.from_inspect(inspect, {"Env": ["PATH=/bin"]})
    assert {k: v for k, v in back.items() if k != "networkMode"} == inputs


@pytest.mark.parametrize(
    ("news", "prop"),
    [
        ({"image": "i", "memory": -1}, "memory"),
        ({"image": "i", "memory": 2}, "memory"),
        ({"image": "i", "cpus": "lots"}, "cpus"),
        ({"image": "i", "restart": "sometimes"}, "restart"),
        ({"image": "i", "ports": [{"internal": 70000}]}, "ports[0].internal"),
        ({"image": "i", "envs": ["NOEQUALS"]}, "envs[0]"),
        ({"image": "i", "memory": "lots"}, "memory"),
        ({"image": "i", "colour": "blue"}, "colour"),
        ({"image": "i", "gpus": "all"}, "gpus"),
        ({}, "image"),
        (
            {"image": "i", "labels": [{"label": "io.sandbox-engine.pids-limit", "value": "lots"}]},
            "labels[0].value",
        ),
        ({"image": "i", "healthcheck": {"interval": "often"}}, "healthcheck.interval"),
    ],
)
def test_check_names_the_bad_property(news: dict, prop: str) -> None:
    with pytest.raises(CheckFailures) as info:
        Container().check(news, {}, autoname="x-1234567")
    assert prop in [p for p, _ in info.value.failures]


def test_check_autonames_and_keeps_the_name() -> None:
    assert Container().check({"image": "i"}, {}, autoname="web-abc1234")["name"] == "web-abc1234"
    assert Container().check({"image": "i"}, {"name": "web-old"}, autoname="web-new")["name"] == (
        "web-old"
    )
