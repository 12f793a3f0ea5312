"""The health of a node: the cheap checks (directories, free space, git, TLS files), the executor
checks, and the one health report built from them for the v1 `health` op, the legacy
health-check and `fem-hpc doctor`. No broker connection is made here."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import SiteConfig
from ..diskguard import DiskGuard, guard_check
from ..executors import registry
from ..logs import redact
from ..model import Check

GiB = 1024**3


MiB = 1024**2


FREE_WARNING_BYTES = 5 * GiB


FREE_ERROR_BYTES = 500 * MiB


STATUSES = ("ok", "warning", "error", "skip")


def whoami() -> str:
    try:
        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (KeyError, ImportError):
        return f"uid {os.geteuid()}"


def make_check(name: str, status: str, detail: str, fix: str | None = None) -> Check:
    return Check(name=name, status=status, detail=detail, fix=fix if status not in ("ok", "skip") else None)


def human_size(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# -- directories --------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def _try_write(directory: Path) -> str | None:
    """None when a file can be created in directory (truthful for root and on NFS), else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fem-doctor-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def check_directory(label: str, path: Path) -> list[Check]:
    """`path` exists as a writable directory or can be created; and its file system has room."""
    fix_perm = f"create it and give it to the service account: install -d -o fem-hpc -g fem-hpc {path}"
    out: list[Check] = []
    where = path
    if path.exists():
        if not path.is_dir():
            return [make_check(label, "error", f"{path} exists and is not a directory",
                               f"point {label} at a directory")]
        why = _try_write(path)
        if why:
            out.append(make_check(label, "error", f"{path} is not writable by {whoami()}: {why}", fix_perm))
        else:
            out.append(make_check(label, "ok", f"{path} is writable by {whoami()}"))
    else:
        parent = _existing_ancestor(path)
        where = parent
        if not parent.is_dir():
            return [make_check(label, "error", f"{path} cannot be created: {parent} is not a directory",
                       f"point {label} at a path under a directory, or remove the file {parent}")]
        why = _try_write(parent)
        if why:
            out.append(make_check(label, "error", f"{path} does not exist and cannot be created in {parent} "
                          f"by {whoami()}: {why}", fix_perm))
        else:
            out.append(make_check(label, "ok", f"{path} does not exist yet; it will be created (in {parent})"))
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        out.append(make_check(f"{label} free space", "error", f"cannot stat {where}: {exc.strerror}",
                      f"check the file system of {label}"))
        return out
    detail = f"{human_size(usage.free)} free of {human_size(usage.total)} on the file system of {where}"
    if usage.free < FREE_ERROR_BYTES:
        out.append(make_check(f"{label} free space", "error", detail,
                      f"free space there (under {human_size(FREE_ERROR_BYTES)} tasks fail), or move {label}"))
    elif usage.free < FREE_WARNING_BYTES:
        out.append(make_check(f"{label} free space", "warning", detail,
                      f"free space there (under {human_size(FREE_WARNING_BYTES)} large outputs may not fit)"))
    else:
        out.append(make_check(f"{label} free space", "ok", detail))
    return out


# -- tools and TLS material --------------------------------------------------------------------------
def check_git(site: SiteConfig) -> Check:
    needed = bool(site.policy.git)
    missing = "error" if needed else "warning"
    fix = "install git (Debian: apt-get install git)"
    try:
        proc = subprocess.run(["git", "--version"], capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError:
        return make_check("git", missing,
                          "git is not on PATH" + ("" if needed else " (no git source is allowed by policy)"),
                  fix)
    except subprocess.TimeoutExpired:
        return make_check("git", missing, "git --version did not answer within 10s", fix)
    if proc.returncode != 0:
        return make_check("git", missing, f"git --version exited {proc.returncode}: {proc.stderr.strip()[:200]}", fix)
    return make_check("git", "ok", f"{proc.stdout.strip()} ({shutil.which('git')})")


def check_tls_files(site: SiteConfig) -> list[Check]:
    tls = site.broker.tls
    if tls is None:
        if site.broker.url.startswith("amqps://"):
            return [make_check("broker TLS files", "ok", "amqps with the system CA store, no client certificate")]
        return []
    out = []
    if tls.key_file is not None:
        try:
            mode = stat.S_IMODE(tls.key_file.stat().st_mode)
        except OSError as exc:
            return [make_check("broker TLS files", "error", f"{tls.key_file}: {exc.strerror}",
                       "make the key readable by the service account only (chmod 0600)")]
        if mode & 0o077:
            out.append(make_check("broker TLS files", "warning",
                                  f"client key {tls.key_file} has mode {mode:04o}: other "
                          "users may read it", f"chown fem-hpc:fem-hpc {tls.key_file}; chmod 0600 {tls.key_file}"))
        elif not os.access(tls.key_file, os.R_OK):
            out.append(make_check("broker TLS files", "error",
                                  f"client key {tls.key_file} is not readable by {whoami()}",
                          f"chown fem-hpc:fem-hpc {tls.key_file}; chmod 0600 {tls.key_file}"))
    if not out:
        kind = "mutual TLS (client certificate)" if tls.cert_file else "TLS (server verified, no client certificate)"
        out.append(make_check("broker TLS files", "ok", f"{kind}; CA {tls.ca_file}"))
    return out


def broker_state_check(*, consumer_connected: bool, publisher_connected: bool, outbox_depth: int,
                       reconnects: int) -> Check:
    """The running service's own view of its broker links (no new connection)."""
    detail = (f"consumer {'connected' if consumer_connected else 'disconnected'}, publisher "
              f"{'connected' if publisher_connected else 'disconnected'}, outbox {outbox_depth}, "
              f"reconnects {reconnects}")
    if consumer_connected and publisher_connected:
        return make_check("broker", "ok", detail)
    return make_check("broker", "warning", detail, "the service reconnects by itself; check the broker and the network "
              "(events wait in the outbox, nothing is lost)")


# -- executors ----------------------------------------------------------------------------------------
def runtime_check(site: SiteConfig, name: str) -> Check:
    info = registry.plugins().get(site.executor_type(name))
    if info is None:
        return make_check(f"{name}: runtime", "error", f"no executor plugin {site.executor_type(name)!r}",
                  "install the package that provides it")
    settings = site.executors.get(name) or {}
    ssh = settings.get("ssh")
    if isinstance(ssh, dict) and ssh.get("host"):
        # sbatch/qsub run on the cluster: none is needed here (the executor's own checks go there)
        return make_check(f"{name}: runtime", "ok", f"{' or '.join(info.runtime)} on {ssh['host']}, over SSH")
    binary = settings.get("binary")
    found, where = info.runtime_found(binary if isinstance(binary, str) else None)
    if found:
        return make_check(f"{name}: runtime", "ok", "needs no runtime binary" if where == "-" else f"found {where}")
    return make_check(f"{name}: runtime", "error", where, f"install {' or '.join(info.runtime)} or add it to PATH")


def named(name: str, check: Check) -> Check:
    if check.name == name or check.name.startswith(f"{name}:") or check.name.startswith(f"{name} "):
        return check
    return check.model_copy(update={"name": f"{name}: {check.name}"})


def executor_health_checks(site: SiteConfig, executors: dict[str, dict[str, Any]]) -> list[Check]:
    """Checks from the agent's executors_health() (already run by the service)."""
    out: list[Check] = []
    for name, h in executors.items():
        if h.get("error"):
            out.append(make_check(f"{name}: executor", "error", str(h["error"]),
                                  f"fix executors.{name} or its runtime"))
            continue
        down = h.get("unreachable")
        if down:
            # Paused, not failed: its tasks keep their state and carry on when the link is back.
            out.append(make_check(f"{name}: cluster", "warning",
                                  f"{down['message']}; {h.get('tracked', 0)} tracked job(s) keep their state "
                                  f"and submits wait ({down['error']})",
                                  f"check the network and sshd of {down['host']} (executors.{name}.ssh); "
                                  "fem-hpc reconnects by itself"))
            continue
        checks = [Check.model_validate(c) for c in h.get("checks", [])]
        out += [named(name, c) for c in checks] if checks else [runtime_check(site, name)]
        if h.get("stale"):
            out.append(make_check(f"{name}: tracker", "warning",
                                  "its last poll failed: its jobs keep their state until "
                          "a poll works again", f"check the scheduler behind executors.{name}"))
    return out


# -- the whole set -------------------------------------------------------------------------------------
def cheap_checks(site: SiteConfig) -> list[Check]:
    """What the running service reports in its health reply too: no broker connect, no executor."""
    out = check_directory("state_dir", site.state_dir) + check_directory("work_root", site.work_root)
    out += check_tls_files(site)
    out.append(check_git(site))
    out.append(guard_check(DiskGuard(site)))  # why intake is paused, when it is
    return out


@dataclass
class ServiceState:
    """What the running service knows of itself when it is asked for its health."""

    consumer_connected: bool
    publisher_connected: bool
    outbox_depth: int
    reconnects: int
    tasks: dict[str, int]
    disk_guard: dict[str, Any] = field(default_factory=dict)  # DiskGuard.state(): why intake is paused
    retention: dict[str, Any] = field(default_factory=dict)  # the periodic GC's summary (last pass, freed)


def health_reply(site: SiteConfig, state: ServiceState, executors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The health report of a running node, built once for the v1 `health` op and the legacy
    `health-check` action (which reshapes it): the cheap checks `doctor` shares, the broker links as
    the service sees them (no new connection), the executor checks `executors`
    (ExecutorPool.health()) already ran, the disk guard and the last retention pass."""
    disk = {}
    for name, path in (("state_dir", site.state_dir), ("work_root", site.work_root)):
        try:
            usage = shutil.disk_usage(path)
            disk[name] = {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}
        except OSError as exc:
            disk[name] = {"path": str(path), "error": exc.strerror}
    checks = cheap_checks(site)
    checks.append(broker_state_check(consumer_connected=state.consumer_connected,
                                     publisher_connected=state.publisher_connected,
                                     outbox_depth=state.outbox_depth, reconnects=state.reconnects))
    checks += executor_health_checks(site, executors)
    return {
        "fem": 1, "type": "health", "node": site.node, "version": __version__, "time": time.time(),
        "executors": executors,
        "broker": {"consumer_connected": state.consumer_connected, "publisher_connected": state.publisher_connected,
                   "outbox_depth": state.outbox_depth, "reconnects": state.reconnects},
        "disk": disk, "load": list(os.getloadavg()), "tasks": state.tasks,
        "disk_guard": state.disk_guard, "retention": state.retention,
        "checks": [clean(c).model_dump() for c in checks],
    }


def clean(c: Check) -> Check:
    """One line each, and nothing secret (a password in an error message, a URL)."""
    return c.model_copy(update={"detail": redact(" ".join(c.detail.split())),
                                "fix": redact(" ".join(c.fix.split())) if c.fix else None})
