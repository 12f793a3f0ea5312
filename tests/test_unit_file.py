"""etc/fem-hpc.service passes `systemd-analyze verify` and says what docs/operations.md promises."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import fem_hpc_command
from services import in_ci

UNIT = Path(__file__).resolve().parent.parent / "etc" / "fem-hpc.service"
# What systemd prints for a line it does not understand or cannot use (it then ignores the line).
BAD = ("unknown", "invalid", "failed to parse", "ignoring", "not executable", "deprecated", "no such file")


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)
        found = shutil.which("systemd-analyze")
        if found:
            return found
    message = "systemd-analyze is missing (Debian package systemd)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart on this machine's real fem-hpc (the only change)."""
    cmd = fem_hpc_command()
    real = " ".join([os.path.realpath(cmd[0]), *cmd[1:]])
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/fem-hpc/venv/bin/fem-hpc serve ") == 1
    unit = tmp_path / "fem-hpc.service"
    unit.write_text(text.replace("ExecStart=/opt/fem-hpc/venv/bin/fem-hpc serve ", f"ExecStart={real} serve "))
    return unit


def _verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})


def _ensure_user(output: str) -> bool:
    """Create the `fem-hpc` system user only if verify asks for it (and it does not exist)."""
    if "fem-hpc" not in output or "user" not in output.lower():
        return False
    if subprocess.run(["getent", "passwd", "fem-hpc"], capture_output=True, timeout=30).returncode == 0:
        return False
    if os.geteuid() != 0:
        pytest.skip("systemd-analyze wants the fem-hpc user, and only root may create it")
    res = subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/fem-hpc", "--no-create-home",
                          "--shell", "/usr/sbin/nologin", "fem-hpc"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return True


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _installed_unit(tmp_path)
    res = _verify(analyze, unit)
    if res.returncode != 0 and _ensure_user(res.stdout + res.stderr):
        res = _verify(analyze, unit)
    output = (res.stdout + res.stderr).strip()
    assert res.returncode == 0, output
    bad = [ln for ln in output.splitlines() if any(word in ln.lower() for word in BAD)]
    assert not bad, output


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: systemd-analyze reports what it ignores, in this environment."""
    analyze = _systemd_analyze()
    unit = _installed_unit(tmp_path)
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=procss\nRestartSecs=5"))
    res = _verify(analyze, unit)
    output = (res.stdout + res.stderr).lower()
    assert "restartsecs" in output and "kill mode" in output, output
    missing = tmp_path / "missing" / "fem-hpc.service"
    missing.parent.mkdir()
    missing.write_text(UNIT.read_text())  # ExecStart=/opt/fem-hpc/venv/bin/fem-hpc is not installed here
    if not Path("/opt/fem-hpc/venv/bin/fem-hpc").exists():
        assert _verify(analyze, missing).returncode != 0


def test_unit_settings() -> None:
    s = _settings(UNIT.read_text())
    expect = {
        "User": "fem-hpc", "Group": "fem-hpc", "Restart": "on-failure", "RestartSec": "5", "KillSignal": "SIGTERM",
        "KillMode": "process", "TimeoutStopSec": "30", "StateDirectory": "fem-hpc", "NoNewPrivileges": "yes",
        "ProtectSystem": "full", "ProtectHome": "read-only", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "EnvironmentFile": "-/etc/fem-hpc/env",
        "ExecStart": "/opt/fem-hpc/venv/bin/fem-hpc serve --config /etc/fem-hpc/fem-hpc.yaml",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert s.get("ReadWritePaths"), "work_root needs a ReadWritePaths= line"
    # Options that would break munge (sbatch), the Docker socket, SSH or Apptainer are absent.
    for key in ("PrivateUsers", "PrivateNetwork", "RestrictAddressFamilies", "RestrictNamespaces", "SystemCallFilter",
                "PrivateDevices", "ProtectProc", "DynamicUser", "IPAddressDeny", "InaccessiblePaths"):
        assert key not in s, key
    assert "logrotate" not in " ".join(p.name for p in UNIT.parent.iterdir())  # journald only


def test_the_service_exits_77_and_78_as_restart_prevention_says(cli, write_config, site) -> None:
    """RestartPreventExitStatus=77 78 matches the exit codes of serve for refused credentials and a bad config."""
    assert _settings(UNIT.read_text())["RestartPreventExitStatus"] == ["77 78"]
    site["workers"] = 0
    assert cli("serve", "--config", write_config(site), timeout=60).returncode == 78
