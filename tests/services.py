"""Reachability checks for the real services of the test bed (``scripts/testbed up``).

A test that needs a service calls ``require("slurm")`` (or docker, rabbitmq, registry, ...) first.
When the service is not reachable the test is skipped with the reason, except under CI
(``CI=true``), where a missing service is a failure: CI starts the test bed itself, so a skip there
would hide a broken set-up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from functools import cache

import pytest

RABBITMQ_HOST = "127.0.0.1"
RABBITMQ_PORT = 5672
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

REGISTRY = "127.0.0.1:5000"
TEST_IMAGE = "127.0.0.1:5000/fem/busybox:1"
AUTH_REGISTRY = "127.0.0.1:5001"
AUTH_USER = "femuser"
AUTH_PASSWORD = "fempass"
AUTH_TEST_IMAGE = "127.0.0.1:5001/fem/busybox:1"
FLCORE_IMAGE = "127.0.0.1:5000/fl/flcore:demo"  # busybox + python3, stand-in for the FL tool's image

SLURM_PARTITION = "debug"

FL_IMAGE = "127.0.0.1:5000/fem/python-fl:1"  # scripts/testbed: debootstrap + python3 + flwr

SERVICES = ("rabbitmq", "slurm", "slurm-accounting", "pbs", "docker", "registry", "registry-auth", "ssh",
            "flcore-image", "fl-image")


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _run_ok(argv: list[str], timeout: float = 15) -> tuple[bool, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return False, f"{argv[0]} not found on PATH"
    except subprocess.TimeoutExpired:
        return False, f"{' '.join(argv)} timed out after {timeout:g}s"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"{' '.join(argv)} exited {proc.returncode}: {detail[-1] if detail else ''}"
    return True, ""


def _http_status(url: str, timeout: float = 5) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback URLs only
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def _tcp_ok(host: str, port: int, timeout: float = 3) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"no TCP connection to {host}:{port}: {exc}"


def _check_slurm() -> tuple[bool, str]:
    return _run_ok(["sinfo", "-h"])


def _check_accounting() -> tuple[bool, str]:
    """slurmdbd behind the Slurm (scripts/testbed up starts it): sacct answers."""
    ok, why = _check_slurm()
    if not ok:
        return ok, why
    return _run_ok(["sacct", "-n", "-X", "-S", "now", "-o", "JobID"])


def _check_pbs() -> tuple[bool, str]:
    if shutil.which("qstat") is None or shutil.which("qsub") is None:
        return False, "qsub/qstat not on PATH (Debian package slurm-wlm-torque)"
    return _check_slurm()


def _check_docker() -> tuple[bool, str]:
    return _run_ok(["docker", "info"], timeout=20)


def _check_registry() -> tuple[bool, str]:
    status = _http_status(f"http://{REGISTRY}/v2/")
    if status != 200:
        return False, f"GET http://{REGISTRY}/v2/ gave {status}, want 200"
    return True, ""


def _check_registry_auth() -> tuple[bool, str]:
    status = _http_status(f"http://{AUTH_REGISTRY}/v2/")
    if status != 401:
        return False, f"GET http://{AUTH_REGISTRY}/v2/ without credentials gave {status}, want 401"
    return True, ""


def _check_flcore_image() -> tuple[bool, str]:
    status = _http_status(f"http://{REGISTRY}/v2/fl/flcore/manifests/demo")
    if status != 200:
        return False, f"{FLCORE_IMAGE} is not in the registry (GET its manifest gave {status})"
    return True, ""


def _check_fl_image() -> tuple[bool, str]:
    repo, tag = FL_IMAGE.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(f"http://{REGISTRY}/v2/{repo}/manifests/{tag}", method="HEAD", headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    try:
        with urllib.request.urlopen(req, timeout=5):  # loopback only
            return True, ""
    except (OSError, urllib.error.URLError) as exc:
        return False, f"{FL_IMAGE} is not in the registry ({exc})"


def _check_ssh() -> tuple[bool, str]:
    for path in ("/usr/sbin/sshd", shutil.which("sshd")):
        if path and os.access(path, os.X_OK):
            return True, ""
    return False, "sshd binary not found (Debian package openssh-server)"


_CHECKS = {
    "rabbitmq": lambda: _tcp_ok(RABBITMQ_HOST, RABBITMQ_PORT),
    "slurm": _check_slurm,
    "slurm-accounting": _check_accounting,
    "pbs": _check_pbs,
    "docker": _check_docker,
    "registry": _check_registry,
    "registry-auth": _check_registry_auth,
    "ssh": _check_ssh,
    "flcore-image": _check_flcore_image,


    "fl-image": _check_fl_image,
}


def check(service: str) -> tuple[bool, str]:
    """Return (reachable, reason-if-not) for one service, without side effects."""
    try:
        probe = _CHECKS[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}") from None
    return probe()


@cache
def _cached_check(service: str) -> tuple[bool, str]:
    return check(service)


def available(service: str) -> bool:
    """True when the service is reachable (cached for the test session)."""
    return _cached_check(service)[0]


def require(service: str) -> None:
    """Skip the calling test (fail it under CI=true) unless ``service`` is reachable.

    Only successful checks are cached, so a service that comes up later in the session is seen.
    """
    ok, reason = _cached_check(service)
    if not ok:
        _cached_check.cache_clear()
        ok, reason = check(service)
    if ok:
        return
    message = f"{service} is not available: {reason} (start it with: scripts/testbed up)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
