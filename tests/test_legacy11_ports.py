"""port_mappings of the real FEM documents against policy.ports, and what each executor can publish."""

from __future__ import annotations

from pathlib import Path

import pytest
from femkit import flcore_document

from fem_hpc.config import ConfigError, config_from_dict, parse_port_ranges
from fem_hpc.protocols.legacy.errors import DocumentError
from fem_hpc.protocols.legacy.ports import (
    PublishedPort,
    docker_ports,
    parse_port_mappings,
    plan_ports,
    published_ports,
)

FL = PublishedPort(host_port=4433, container_port=4433)


def test_the_real_document_publishes_its_server_port() -> None:
    raw = flcore_document()["port_mappings"]
    assert published_ports(raw, [4433]) == [FL]
    assert published_ports(raw, ["4000-5000"]) == [FL]
    assert docker_ports([FL]) == {"4433/tcp": 4433}


def test_by_default_no_port_is_allowed() -> None:
    with pytest.raises(DocumentError) as exc:
        published_ports(flcore_document()["port_mappings"], [])
    assert exc.value.field == "task_info.port_mappings"
    assert exc.value.reason == ("host port 4433 is not allowed by site policy (policy.ports: empty: this site "
                                "publishes no ports)")
    with pytest.raises(DocumentError, match="host port 4433 is not allowed by site policy \\(policy.ports: 22, "):
        published_ports([{"host_port": 4433, "container_port": 4433}], [22, "8000-8010"])


@pytest.mark.parametrize(("raw", "expected"), [
    (None, []), ("", []), ([], []), ({}, []),
    ([{"host_port": "4433", "container_port": 4433}], [FL]),
    ({"host_port": 4433, "container_port": 4433}, [FL]),  # one mapping on its own
    ({"4433": 4433}, [FL]),  # docker SDK shape: container port -> host port
    ({"4433/udp": "4434"}, [PublishedPort(host_port=4434, container_port=4433, protocol="udp")]),
    ([{"host_port": 8080, "container_port": 80, "protocol": "TCP"}], [PublishedPort(host_port=8080,
                                                                                    container_port=80)]),
    # the same host port once per protocol is two ports
    ([{"host_port": 53, "container_port": 53}, {"host_port": 53, "container_port": 53, "protocol": "udp"}],
     [PublishedPort(host_port=53, container_port=53), PublishedPort(host_port=53, container_port=53,
                                                                    protocol="udp")]),
])
def test_shapes(raw: object, expected: list[PublishedPort]) -> None:
    assert parse_port_mappings(raw) == expected


@pytest.mark.parametrize(("raw", "field", "reason"), [
    ("4433:4433", "task_info.port_mappings", "must be a list"),
    ([4433], "task_info.port_mappings[0]", "must be {'host_port'"),
    ([{"host_port": 4433}], "task_info.port_mappings[0]", "needs container_port"),
    ([{"host_port": 0, "container_port": 1}], "task_info.port_mappings[0].host_port", "in 1..65535"),
    ([{"host_port": 65536, "container_port": 1}], "task_info.port_mappings[0].host_port", "in 1..65535"),
    ([{"host_port": True, "container_port": 1}], "task_info.port_mappings[0].host_port", "not a port"),
    ([{"host_port": 1.5, "container_port": 1}], "task_info.port_mappings[0].host_port", "not a port"),
    ([{"host_port": "-1", "container_port": 1}], "task_info.port_mappings[0].host_port", "in 1..65535"),
    ([{"host_port": 1, "container_port": 1, "protocol": "sctp"}], "task_info.port_mappings[0].protocol",
     "not tcp or udp"),
    ({"4433": None}, "task_info.port_mappings.4433", "must be one port number"),
    ({"4433": [1, 2]}, "task_info.port_mappings.4433", "must be one port number"),
    ({"http": 80}, "task_info.port_mappings.http", "not a port number"),
    ([{"host_port": 1, "container_port": 1}, {"host_port": 1, "container_port": 2}], "task_info.port_mappings",
     "host port 1/tcp is asked for twice"),
])
def test_refused_shapes(raw: object, field: str, reason: str) -> None:
    with pytest.raises(DocumentError) as exc:
        parse_port_mappings(raw)
    assert exc.value.field == field
    assert reason in exc.value.reason


def test_what_each_executor_can_publish() -> None:
    assert plan_ports([], "slurm").model_dump() == {"publish": [], "note": None}
    assert plan_ports([FL], "docker", "bridge").publish == [FL]
    assert plan_ports([FL], "docker", "fem-net").publish == [FL]
    none = plan_ports([FL], "docker", "none")
    assert none.publish == [] and "4433/tcp were not published" in (none.note or "")
    assert plan_ports([FL], "docker", "host").model_dump() == {"publish": [], "note": None}  # 4433 is 4433 already
    remap = plan_ports([PublishedPort(host_port=8080, container_port=80)], "docker", "host")
    assert remap.publish == [] and "8080->80 were not applied" in (remap.note or "")
    for kind in ("apptainer", "local"):
        same = plan_ports([FL], kind)
        assert same.publish == [] and same.note == (
            f"ports 4433/tcp were not published: the {kind} executor cannot publish ports; the command shares "
            "the host's network and listens on the host's own ports, 4433")
        note = plan_ports([PublishedPort(host_port=8080, container_port=80)], kind).note or ""
        assert f"the {kind} executor cannot publish ports" in note
    for kind in ("slurm", "pbs"):
        plan = plan_ports([FL], kind)
        assert plan.publish == [] and f"the {kind} executor cannot publish ports" in (plan.note or "")
    assert "executor type 'k8s' cannot publish ports" in (plan_ports([FL], "k8s").note or "")


def test_policy_ports_in_the_config(tmp_path: Path) -> None:
    base = {"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")}
    assert config_from_dict(base).policy.ports == []
    cfg = config_from_dict({**base, "policy": {"ports": [4433, "8000-8010", "9000"]}})
    assert parse_port_ranges(cfg.policy.ports) == [(4433, 4433), (8000, 8010), (9000, 9000)]
    for bad in ([0], ["10-5"], ["a-b"], [True], ["1-70000"]):
        with pytest.raises(ConfigError, match="policy.ports"):
            config_from_dict({**base, "policy": {"ports": bad}})
