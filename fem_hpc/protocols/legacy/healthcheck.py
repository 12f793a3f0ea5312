"""The ``health-check`` tool: the node's built-in checks, in the key set the orchestrator stores.

The real answer (../shared/fixtures/fem/health-check.orchestrator-record.json) has ``installation_check``
(``docker_version``, ``ip_info``), ``gpu_check`` (``gpu_detected``, ``message``), ``paths_check``
(``sandbox_path_exists``, ``data_path_exists``, ``sandbox_contents``, ``data_path_contents``),
``resources_check`` (``CPU Count``, ``CPU Percent``, ``Memory Available``/``Memory Total`` as
``'25.20 GB'``, ``GPU Count``, ``Has Internet``), ``docker_images_installed`` (``docker_images``: repository,
tag, image_id, sha256_digest) and ``pem_certificates`` (per file ``expiry_date`` + ``status``, or
``error``). fem-hpc gives the same keys and adds what an HPC site has: ``scheduler_check`` (Slurm/PBS
reachable, partitions or queues, running jobs), the apptainer and fem-hpc versions.

Differences on purpose: no outbound lookup is made (the original asked ipinfo.io; ``ip_info`` here holds
the node's own interface addresses, and ``Has Internet`` is None with a note); every probe that cannot
run (no docker, no nvidia-smi, a dead scheduler) becomes an error field of its section, never a failure
of the whole check. Every input is injected (:class:`HealthInputs`, :class:`Probes`), so the report is a
pure function of what the probes return; commands run through a :class:`~fem_hpc.executors.runners.Runner`
(argv lists, never a shell). Certificates are read with ``cryptography`` (already required by paramiko;
declared as fem-hpc's own dependency for this).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import platform
import re
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fem_hpc import __version__
from fem_hpc.config import SiteConfig
from fem_hpc.executors.runners import CommandResult, LocalRunner, RunnerError

__all__ = [
    "HealthInputs",
    "Probes",
    "docker_api_images",
    "docker_image_rows",
    "docker_probe",
    "health_report",
    "inputs_from_site",
    "interface_addresses",
    "is_health_check",
    "pem_expiry",
]

HEALTH_CHECK = "health-check"  # the tool (and task) the orchestrator runs as the node's built-in checks
NO_GPU_MESSAGE = "No Nvidia GPU in the system"  # the original's wording
PEM_ERROR = "Unable to retrieve expiration date"  # the original's wording
NO_LOOKUP = "not checked: fem-hpc makes no outbound connections"
_SIOCGIFADDR = 0x8915  # linux/sockios.h


def is_health_check(tool_id: str, task_info: dict[str, Any]) -> bool:
    """The orchestrator's health-check: tool or task `health-check` that has nothing of its own to run
    (no image, or no command) or asks for the checks (`pre_checks`): the node's built-in checks answer
    it. A `health-check` with an image, a command and no `pre_checks` is a site's own check tool and
    runs as any task."""
    named = tool_id == HEALTH_CHECK or task_info.get("_id") == HEALTH_CHECK
    return named and (not task_info.get("image") or not task_info.get("command") or bool(task_info.get("pre_checks")))


class HealthInputs(BaseModel):
    """What the site configures for the check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sandbox: Path
    data_path: Path | None = None  # the DATA_PATH variable, when the site declares one
    pem_files: list[Path] = []
    schedulers: list[Literal["slurm", "pbs"]] = []  # the batch executor types configured
    listing_limit: int = 100  # at most this many names per directory listing
    command_timeout: float = 15.0


def _default_runner() -> Callable[[list[str], float], CommandResult]:
    runner = LocalRunner()
    return lambda argv, timeout: runner.run(argv, timeout=timeout)


def docker_api_images(base_url: str | None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The daemon's image list (``GET /images/json``) through the docker SDK; raises on any failure."""
    import docker  # a runtime dependency; imported here so the check runs (and reports) without a daemon

    where = base_url or "the default socket (DOCKER_HOST)"
    try:
        client = docker.DockerClient(base_url=base_url, timeout=int(timeout)) if base_url else \
            docker.from_env(timeout=int(timeout))
    except Exception as exc:  # DockerException, or requests' connection errors
        raise ConnectionError(f"docker daemon at {where}: {exc}") from None
    try:
        return list(client.api.images())
    except Exception as exc:
        raise ConnectionError(f"docker daemon at {where}: {exc}") from None
    finally:
        client.close()


def interface_addresses() -> list[dict[str, str]]:
    """The node's own addresses, read locally: IPv4 per interface (SIOCGIFADDR), IPv6 from /proc."""
    out: list[dict[str, str]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # never connected: nothing is sent
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            out.append({"interface": name, "address": socket.inet_ntoa(packed[20:24])})
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6:
            out.append({"interface": parts[5], "address": str(ipaddress.IPv6Address(int(parts[0], 16)))})
    return out


def _read(path: str) -> str:
    return Path(path).read_text()


@dataclass
class Probes:
    """The ways the check looks at the node; replace any of them in a test."""

    run: Callable[[list[str], float], CommandResult] = field(default_factory=_default_runner)
    docker_images: Callable[[], list[dict[str, Any]]] = field(default=lambda: docker_api_images(None))
    addresses: Callable[[], list[dict[str, str]]] = interface_addresses
    read: Callable[[str], str] = _read  # /proc/meminfo, /proc/stat
    read_bytes: Callable[[Path], bytes] = Path.read_bytes
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    hostname: Callable[[], str] = socket.gethostname
    cpu_count: Callable[[], int | None] = os.cpu_count
    cpu_sample_seconds: float = 0.2


def inputs_from_site(site: SiteConfig, *, data_path: Path | None = None) -> HealthInputs:
    """Inputs from the site config: the legacy sandbox, ``data_path`` (pass the DATA_PATH variable's value),
    the broker's TLS files and the configured batch executors."""
    tls = site.broker.tls
    pem = [p for p in ((tls.ca_file, tls.cert_file, tls.key_file) if tls else ()) if p is not None]
    kinds = {site.executor_type(name) for name in site.executors}
    schedulers: list[Literal["slurm", "pbs"]] = [k for k in ("slurm", "pbs") if k in kinds]
    return HealthInputs(sandbox=site.legacy.sandbox_path or site.work_root, data_path=data_path, pem_files=pem,
                        schedulers=schedulers)


def docker_probe(site: SiteConfig) -> Callable[[], list[dict[str, Any]]]:
    """``Probes.docker_images`` for the site's docker executor (its base_url), else the default daemon."""
    base_url = next((settings.get("base_url") for name, settings in site.executors.items()
                     if site.executor_type(name) == "docker"), None)
    return lambda: docker_api_images(base_url)


# -- pieces -----------------------------------------------------------------------------------------
def _command(probes: Probes, argv: list[str], timeout: float) -> tuple[str | None, str | None]:
    """(stdout, None) when argv ran and exited 0, else (None, why)."""
    try:
        res = probes.run(argv, timeout)
    except RunnerError as exc:
        return None, str(exc)
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        return None, f"{' '.join(argv)} exited {res.returncode}" + (f": {detail[-1][:200]}" if detail else "")
    return res.stdout, None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def _ip_info(probes: Probes) -> dict[str, Any]:
    try:
        addresses = probes.addresses()
    except OSError as exc:
        return {"ip": None, "error": f"cannot read the interface addresses: {exc}", "source": "local"}

    def usable(a: dict[str, str]) -> bool:
        ip = ipaddress.ip_address(a["address"])
        return not (ip.is_loopback or ip.is_link_local)
    preferred = [a for a in addresses if usable(a) and ":" not in a["address"]] or \
        [a for a in addresses if usable(a)]
    return {"ip": preferred[0]["address"] if preferred else None, "hostname": probes.hostname(),
            "addresses": addresses, "source": "the node's own interfaces (no outbound lookup)"}


def _installation(inputs: HealthInputs, probes: Probes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    version, error = _command(probes, ["docker", "--version"], inputs.command_timeout)
    out["docker_version"] = _first_line(version) if version is not None else None
    if error:
        out["docker_error"] = error
    out["ip_info"] = _ip_info(probes)
    errors = []
    for tool in ("apptainer", "singularity"):
        version, error = _command(probes, [tool, "--version"], inputs.command_timeout)
        if version is not None:
            out["apptainer_version"] = _first_line(version)
            break
        errors.append(error)
    else:
        out["apptainer_version"] = None
        out["apptainer_error"] = "; ".join(e for e in errors if e)
    out["fem_hpc_version"] = __version__
    out["python_version"] = platform.python_version()
    out["platform"] = f"{platform.system()} {platform.release()} {platform.machine()}"
    return out


def _gpus(inputs: HealthInputs, probes: Probes) -> dict[str, Any]:
    text, error = _command(probes, ["nvidia-smi", "-L"], inputs.command_timeout)
    if text is None:
        if error and "not found" in error:
            return {"gpu_detected": False, "message": NO_GPU_MESSAGE}
        return {"gpu_detected": False, "message": f"nvidia-smi failed: {error}"}
    gpus = [line.strip() for line in text.splitlines() if line.strip().startswith("GPU ")]
    if not gpus:
        return {"gpu_detected": False, "message": NO_GPU_MESSAGE}
    return {"gpu_detected": True, "message": f"{len(gpus)} Nvidia GPU(s) detected", "gpus": gpus}


def _listing(path: Path | None, limit: int) -> tuple[bool, list[str], bool, str | None]:
    """(exists, first `limit` names sorted, truncated, error)."""
    if path is None or not path.is_dir():
        return False, [], False, None
    try:
        names = sorted(entry.name for entry in os.scandir(path))
    except OSError as exc:
        return True, [], False, f"cannot list {path}: {exc.strerror}"
    return True, names[:limit], len(names) > limit, None


def _paths(inputs: HealthInputs) -> dict[str, Any]:
    out: dict[str, Any] = {"sandbox_path": str(inputs.sandbox),
                           "data_path": str(inputs.data_path) if inputs.data_path else None}
    for path, exists_key, contents_key in ((inputs.sandbox, "sandbox_path_exists", "sandbox_contents"),
                                           (inputs.data_path, "data_path_exists", "data_path_contents")):
        exists, names, truncated, error = _listing(path, inputs.listing_limit)
        out[exists_key], out[contents_key] = exists, names
        if truncated:
            out[f"{contents_key}_truncated"] = True
        if error:
            out[f"{contents_key}_error"] = error
    if inputs.data_path is None:
        out["data_path_note"] = "this site declares no DATA_PATH variable (legacy.variables)"
    out["sandbox_writable"] = inputs.sandbox.is_dir() and os.access(inputs.sandbox, os.W_OK | os.X_OK)
    return out


def _gb(kib: int) -> str:
    return f"{kib / 1024**2:.2f} GB"  # the original's unit: GiB, written "GB"


def _cpu_busy(probes: Probes) -> float | None:
    """Percent of CPU time not idle over a short sample of /proc/stat."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in probes.read("/proc/stat").splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # guest time is already in user/nice
    try:
        total0, idle0 = sample()
        probes.sleep(probes.cpu_sample_seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return 0.0
    return round(100.0 * (1 - (idle1 - idle0) / (total1 - total0)), 1)


def _resources(probes: Probes, gpu: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"CPU Count": probes.cpu_count(), "CPU Percent": _cpu_busy(probes)}
    try:
        info = {}
        for line in probes.read("/proc/meminfo").splitlines():
            key, _, rest = line.partition(":")
            info[key.strip()] = int(rest.split()[0])
        out["Memory Available"] = _gb(info["MemAvailable"])
        out["Memory Total"] = _gb(info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError) as exc:
        out["Memory Available"] = out["Memory Total"] = None
        out["memory_error"] = f"cannot read /proc/meminfo: {exc}"
    out["GPU Count"] = len(gpu.get("gpus", []))
    out["Has Internet"] = None
    out["Has Internet note"] = NO_LOOKUP
    try:
        out["CPU Usable"] = len(os.sched_getaffinity(0))  # what this process may use (cgroups, taskset)
    except (AttributeError, OSError):
        pass
    return out


def _split_repo_tag(text: str) -> tuple[str, str]:
    repo, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, "<none>"
    return repo, tag


def docker_image_rows(images: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The daemon's image list (``GET /images/json``) as the original's rows: one per tag, dangling images
    as ``<none>``; ``image_id`` is 12 hex digits, ``sha256_digest`` the registry digest of that repository
    or ``<none>`` (a local build or import that was never pushed or pulled)."""
    rows = []
    for image in images:
        image_id = str(image.get("Id", "")).removeprefix("sha256:")[:12]
        digests: dict[str, str] = {}
        for item in image.get("RepoDigests") or []:
            repo, _, digest = str(item).partition("@")
            digests.setdefault(repo, digest)
        tags = [t for t in (image.get("RepoTags") or []) if t != "<none>:<none>"]
        if not tags:
            repo = next(iter(digests), "<none>")
            rows.append({"repository": repo, "tag": "<none>", "image_id": image_id,
                         "sha256_digest": digests.get(repo, "<none>")})
        for tag_text in tags:
            repo, tag = _split_repo_tag(str(tag_text))
            rows.append({"repository": repo, "tag": tag, "image_id": image_id,
                         "sha256_digest": digests.get(repo, "<none>")})
    return rows


def _docker_images(probes: Probes) -> dict[str, Any]:
    try:
        images = probes.docker_images()
    except Exception as exc:  # the SDK raises DockerException, requests' errors, or plain OSError
        return {"docker_images": [], "error": f"cannot list docker images: {exc}"[:500]}
    return {"docker_images": docker_image_rows(images)}


def pem_expiry(data: bytes, now: datetime) -> dict[str, Any]:
    """One file's entry of ``pem_certificates``: the earliest ``notAfter`` of the certificates in it
    (a bundle counts as its first expiry), or the original's error for a key, a CSR or garbage."""
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        return {"error": PEM_ERROR, "detail": "no PEM certificate in the file (a key or a CSR has no expiry)"}
    expiry = min(cert.not_valid_after_utc for cert in certificates)
    starts = max(cert.not_valid_before_utc for cert in certificates)
    status = "Expired" if expiry <= now else ("Not yet valid" if starts > now else "Valid")
    return {"expiry_date": expiry.strftime("%Y-%m-%d %H:%M:%S UTC"), "status": status,
            "days_left": (expiry - now).days}


def _pem(inputs: HealthInputs, probes: Probes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = [p.name for p in inputs.pem_files]
    now = probes.now()
    for path in inputs.pem_files:
        key = path.name if names.count(path.name) == 1 else str(path)  # the original keys by file name
        try:
            data = probes.read_bytes(path)
        except OSError as exc:
            out[key] = {"error": PEM_ERROR, "detail": f"cannot read {path}: {exc.strerror or exc}"}
            continue
        out[key] = pem_expiry(data, now)
    return out


def _partitions(text: str) -> list[dict[str, Any]]:
    """``sinfo -h -o '%P|%a|%D|%T'`` (one line per partition and node state) -> one entry per partition."""
    parts: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, avail, nodes, state = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = parts.setdefault(name, {"name": name, "default": default, "availability": avail, "nodes": 0,
                                        "states": {}})
        count = int(nodes) if nodes.isdigit() else 0
        entry["nodes"] += count
        entry["states"][state] = entry["states"].get(state, 0) + count
    return list(parts.values())


def _table(text: str) -> list[dict[str, str]]:
    """A qstat table (a header line, a line of dashes per column, rows) as dicts by header name. Columns
    are cut at the dashes' spans, so a header of two words ("Time Use") or a name with a space stays one
    cell."""
    lines = [line for line in text.splitlines() if line.strip()]
    dashes = next((i for i, line in enumerate(lines) if set(line.strip()) <= {"-", " "} and "-" in line), None)
    if dashes is None or dashes == 0:
        return []
    spans = [[m.start(), m.end()] for m in re.finditer(r"-+", lines[dashes])]
    spans[-1][1] = max(len(line) for line in lines)  # the last column runs to the end of the line
    header = [lines[dashes - 1][a:b].strip().lower() for a, b in spans]
    return [{name: line[a:b].strip() for name, (a, b) in zip(header, spans, strict=True)}
            for line in lines[dashes + 1 :]]


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _queues(text: str) -> list[dict[str, Any]]:
    """``qstat -Q`` (Torque, OpenPBS, slurm-wlm-torque) -> one entry per queue; counts are None where the
    implementation prints '?'."""
    return [{"name": row.get("queue", ""), "enabled": row.get("ena") in ("yes", "True"),
             "started": row.get("str") in ("yes", "True"), "queued": _number(row.get("que", "")),
             "running": _number(row.get("run", ""))} for row in _table(text)]


def _running_in_qstat(text: str) -> int:
    """Rows of a plain ``qstat`` whose state column (``S``) is R."""
    return sum(1 for row in _table(text) if row.get("s") == "R")


def _slurm(inputs: HealthInputs, probes: Probes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    version, error = _command(probes, ["sinfo", "--version"], inputs.command_timeout)
    out["version"] = _first_line(version) if version is not None else None
    text, error = _command(probes, ["sinfo", "-h", "-o", "%P|%a|%D|%T"], inputs.command_timeout)
    out["reachable"] = text is not None
    if text is None:
        out["error"] = error
        return out
    out["partitions"] = _partitions(text)
    jobs, error = _command(probes, ["squeue", "-h", "-t", "RUNNING", "-o", "%i"], inputs.command_timeout)
    out["running_jobs"] = len([j for j in jobs.splitlines() if j.strip()]) if jobs is not None else None
    if error:
        out["running_jobs_error"] = error
    return out


def _pbs(inputs: HealthInputs, probes: Probes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    text, error = _command(probes, ["qstat", "-Q"], inputs.command_timeout)
    out["reachable"] = text is not None
    if text is None:
        out["error"] = error
        return out
    out["queues"] = _queues(text)
    counts = [q["running"] for q in out["queues"] if q["running"] is not None]
    if counts:
        out["running_jobs"] = sum(counts)
        return out
    # slurm-wlm-torque prints '?' for the counts: count the R rows of a plain qstat instead. That qstat
    # prints nothing and exits non-zero when there are no jobs at all, which is 0 running jobs.
    try:
        res = probes.run(["qstat"], inputs.command_timeout)
    except RunnerError as exc:
        out["running_jobs"], out["running_jobs_error"] = None, str(exc)
        return out
    out["running_jobs"] = _running_in_qstat(res.stdout)
    if res.returncode != 0 and res.stderr.strip():
        out["running_jobs_error"] = f"qstat exited {res.returncode}: {res.stderr.strip().splitlines()[-1][:200]}"
    return out


def _schedulers(inputs: HealthInputs, probes: Probes) -> dict[str, Any]:
    out: dict[str, Any] = {"configured": list(inputs.schedulers)}
    if "slurm" in inputs.schedulers:
        out["slurm"] = _slurm(inputs, probes)
    if "pbs" in inputs.schedulers:
        out["pbs"] = _pbs(inputs, probes)
    return out


def health_report(inputs: HealthInputs, probes: Probes | None = None) -> dict[str, Any]:
    """The ``result`` of a ``health-check`` reply. Never raises for a missing tool or daemon: each
    section carries its own error field instead."""
    probes = probes or Probes()
    gpu = _gpus(inputs, probes)
    return {
        "installation_check": _installation(inputs, probes),
        "gpu_check": gpu,
        "paths_check": _paths(inputs),
        "resources_check": _resources(probes, gpu),
        "docker_images_installed": _docker_images(probes),
        "pem_certificates": _pem(inputs, probes),
        "scheduler_check": _schedulers(inputs, probes),
    }

