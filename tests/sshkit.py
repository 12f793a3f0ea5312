"""A real OpenSSH server on 127.0.0.1 for the SSH tests, with everything in a temp dir.

    sshd = SSHD(tmp_path).start()
    runner = SSHRunner(sshd.settings())
    ...
    sshd.stop()

The server gets its own config, a host key generated with ssh-keygen, and an authorized_keys
holding one generated ed25519 client key. It runs in the foreground (`-D -e`) as a child of the
test, logging to `sshd.log`, where every accepted connection leaves an "Accepted publickey" line.
`known_hosts` holds the host key as `[127.0.0.1]:PORT ssh-ed25519 ...`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fem_hpc.executors.runners import SSHSettings

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/libexec/sftp-server")


def sshd_binary() -> str | None:
    for path in (*SSHD_CANDIDATES, shutil.which("sshd")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at path (+ .pub); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path.with_name(path.name + ".pub").read_text().strip()


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc (sshd's per-connection processes call setsid(), so
    they are not in the listener's process group)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses: split after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


class SSHD:
    """One sshd on 127.0.0.1:port; start/stop/restart keep the port and the keys."""

    def __init__(self, tmp: Path, port: int | None = None):
        binary = sshd_binary()
        if binary is None:
            raise RuntimeError("sshd not found (Debian package openssh-server)")
        self.binary = binary
        self.dir = tmp / "sshd"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.port = port or free_port()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "client_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config_path = self.dir / "sshd_config"
        self.pid_file = self.dir / "sshd.pid"
        self.log_path = self.dir / "sshd.log"
        host_pub = keygen(self.host_key, "fem-hpc-test-host")
        self.client_pub = keygen(self.client_key, "fem-hpc-test-client")
        self.authorized_keys.write_text(self.client_pub + "\n")
        key_type, key_b64 = host_pub.split()[:2]
        self.host_key_entry = f"{key_type} {key_b64}"
        self.known_hosts.write_text(f"{self.host_pattern} {self.host_key_entry}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def host_pattern(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def _write_config(self) -> None:
        sftp = next((p for p in SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), None)
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"PidFile {self.pid_file}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AuthenticationMethods publickey",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PermitUserEnvironment no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "MaxSessions 16",
            "MaxStartups 50:30:100",
            "LogLevel INFO",
            f"Subsystem sftp {sftp}" if sftp else "Subsystem sftp internal-sftp",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 15) -> SSHD:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        check = subprocess.run([self.binary, "-t", "-f", str(self.config_path)], capture_output=True, text=True,
                               timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t refused {self.config_path}: {check.stderr.strip()}")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([self.binary, "-D", "-e", "-f", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port} within {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10) -> None:
        """Stop the listener and every connection it serves (as a restart of the host's sshd
        with its sessions killed would)."""
        if self.proc is None:
            return
        pids = _descendants(self.proc.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc = None

    def restart(self) -> SSHD:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- what it saw -----------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def accepted(self) -> int:
        """How many connections authenticated so far (sshd logs one line per connection)."""
        return sum(1 for line in self.log().splitlines() if "Accepted publickey for" in line)

    # -- client side -----------------------------------------------------------------------
    def settings(self, **overrides: Any) -> SSHSettings:
        values: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "user": "root",
                                  "key_file": self.client_key, "known_hosts": self.known_hosts,
                                  "connect_timeout": 10}
        values.update(overrides)
        return SSHSettings(**values)

    def settings_dict(self, **overrides: Any) -> dict[str, Any]:
        """The `ssh:` block of an executor's site config."""
        values: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "user": "root",
                                  "key_file": str(self.client_key), "known_hosts": str(self.known_hosts)}
        values.update(overrides)
        return values

    def other_host_key_entry(self) -> str:
        """A valid ed25519 public key that is NOT this server's (for mismatch tests)."""
        other = self.dir / f"other_host_key_{time.monotonic_ns()}"
        pub = keygen(other, "not-the-server")
        key_type, key_b64 = pub.split()[:2]
        return f"{key_type} {key_b64}"
