"""``port_mappings`` of legacy task documents -> the host ports a task may publish, under site policy.

Shapes read (../shared/FEM-REAL.md shows the first; the others are accepted because the 2024 client fed
the document to the docker SDK, whose ``ports=`` argument is ``{"<container_port>[/proto]": host_port}``;
that shape is an inference, not a recorded document):

* a list of ``{'host_port': 4433, 'container_port': 4433}`` (optional ``'protocol': 'tcp' | 'udp'``);
* one such dict on its own;
* ``{'4433': 4433}`` / ``{'4433/tcp': 4433}``: container port (and protocol) -> host port.

Ports are ints or digit strings in 1..65535. A host port must be inside ``policy.ports`` (ports and
``"a-b"`` ranges; empty, the default, means the site publishes none), and no host port may be asked for
twice. Docker publishes them on a bridge or named network; with ``host`` networking, apptainer, the local
executor and batch jobs nothing can be published, and :func:`plan_ports` says so for the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fem_hpc.config import parse_port_ranges

from .errors import DocumentError

__all__ = ["PortPlan", "PublishedPort", "docker_ports", "parse_port_mappings", "plan_ports", "published_ports"]

FIELD = "task_info.port_mappings"


class PublishedPort(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host_port: int
    container_port: int
    protocol: Literal["tcp", "udp"] = "tcp"


class PortPlan(BaseModel):
    """What the executor publishes (``publish``) and what the reply must say about the rest (``note``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    publish: list[PublishedPort]
    note: str | None = None


def _port(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DocumentError(field, f"{value!r} is not a port number")
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise DocumentError(field, f"{value!r} is not a port number in 1..65535")
    return int(text)


def _protocol(value: Any, field: str) -> Literal["tcp", "udp"]:
    if value is None or value == "":
        return "tcp"
    text = str(value).strip().lower()
    if text == "tcp":
        return "tcp"
    if text == "udp":
        return "udp"
    raise DocumentError(field, f"protocol {value!r} is not tcp or udp")


def _pair(entry: dict[str, Any], field: str) -> PublishedPort:
    for key in ("host_port", "container_port"):
        if key not in entry:
            raise DocumentError(field, f"needs {key} (a mapping is {{'host_port': N, 'container_port': M}})")
    return PublishedPort(host_port=_port(entry["host_port"], f"{field}.host_port"),
                         container_port=_port(entry["container_port"], f"{field}.container_port"),
                         protocol=_protocol(entry.get("protocol"), f"{field}.protocol"))


def parse_port_mappings(raw: Any, field: str = FIELD) -> list[PublishedPort]:
    """The document's ``port_mappings`` as a list; None, ``''``, ``[]`` and ``{}`` mean none. Raises
    DocumentError on a shape or value it cannot read, or a host port asked for twice."""
    if raw is None or raw == "" or raw == [] or raw == {}:
        return []
    ports: list[PublishedPort] = []
    if isinstance(raw, list):
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict):
                raise DocumentError(f"{field}[{i}]", "must be {'host_port': N, 'container_port': M}")
            ports.append(_pair(entry, f"{field}[{i}]"))
    elif isinstance(raw, dict) and ("host_port" in raw or "container_port" in raw):
        ports.append(_pair(raw, field))
    elif isinstance(raw, dict):
        for key, host in raw.items():
            where = f"{field}.{key}"
            container, _, proto = str(key).partition("/")
            if host is None or isinstance(host, list | tuple | dict):
                raise DocumentError(where, f"host port {host!r} must be one port number (a random or a list of "
                                           "host ports cannot be checked against policy.ports)")
            ports.append(PublishedPort(host_port=_port(host, where), container_port=_port(container, where),
                                       protocol=_protocol(proto, where)))
    else:
        raise DocumentError(field, "must be a list of {'host_port': N, 'container_port': M}")
    seen: set[tuple[int, str]] = set()
    for port in ports:
        if (port.host_port, port.protocol) in seen:
            raise DocumentError(field, f"host port {port.host_port}/{port.protocol} is asked for twice")
        seen.add((port.host_port, port.protocol))
    return ports


def published_ports(raw: Any, allowed: Sequence[int | str], field: str = FIELD) -> list[PublishedPort]:
    """:func:`parse_port_mappings`, then every host port checked against ``allowed`` (``policy.ports``).
    Raises DocumentError naming the first port outside it."""
    ports = parse_port_mappings(raw, field)
    ranges = parse_port_ranges(list(allowed))
    for port in ports:
        if not any(low <= port.host_port <= high for low, high in ranges):
            policy = ", ".join(str(a) for a in allowed) if allowed else "empty: this site publishes no ports"
            raise DocumentError(field, f"host port {port.host_port} is not allowed by site policy (policy.ports: "
                                       f"{policy})")
    return ports


def docker_ports(ports: Sequence[PublishedPort]) -> dict[str, int]:
    """The docker SDK's ``containers.run(ports=...)`` form: ``{"4433/tcp": 4433}``."""
    return {f"{p.container_port}/{p.protocol}": p.host_port for p in ports}


def _listed(ports: Sequence[PublishedPort]) -> str:
    return ", ".join(f"{p.container_port}/{p.protocol}" for p in ports)


def plan_ports(ports: Sequence[PublishedPort], executor_type: str, network: str | None = None) -> PortPlan:
    """What an executor of type ``executor_type`` (docker, apptainer, local, slurm, pbs) with docker network
    ``network`` can do with ``ports``: docker on a bridge or named network publishes them; everything else
    publishes nothing and gets a ``note`` for the reply (no note when nothing was asked, or when docker's
    host network already gives the command the host port asked for)."""
    if not ports:
        return PortPlan(publish=[])
    remapped = [p for p in ports if p.host_port != p.container_port]
    if executor_type == "docker":
        if network == "none":
            return PortPlan(publish=[], note=f"ports {_listed(ports)} were not published: the docker executor runs "
                                             "containers without a network (executors.<name>.network: none)")
        if network != "host":
            return PortPlan(publish=list(ports))
        how = "with network host the container listens on the host's own ports"
    elif executor_type in ("apptainer", "local"):
        how = f"the {executor_type} executor cannot publish ports; the command shares the host's network and " \
              "listens on the host's own ports"
        if not remapped:
            # The port is reachable, but not because anything was published: the reply says so, so an
            # orchestrator does not count on an isolation (a private port space) it did not get.
            return PortPlan(publish=[], note=f"ports {_listed(ports)} were not published: {how}, "
                                             f"{', '.join(str(p.host_port) for p in ports)}")
    elif executor_type in ("slurm", "pbs"):
        return PortPlan(publish=[], note=f"ports {_listed(ports)} were not published: the {executor_type} executor "
                                         "cannot publish ports; the command listens on its own ports on the compute "
                                         "node the scheduler picked")
    else:
        return PortPlan(publish=[], note=f"ports {_listed(ports)} were not published: executor type "
                                         f"{executor_type!r} cannot publish ports")
    if not remapped:
        return PortPlan(publish=[])
    pairs = ", ".join(f"{p.host_port}->{p.container_port}" for p in remapped)
    return PortPlan(publish=[], note=f"port mappings {pairs} were not applied: {how}, so a host port cannot be "
                                     "mapped to a different container port")
