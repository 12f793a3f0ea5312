"""Runners: where scheduler commands run. `LocalRunner` (subprocess) or `SSHRunner` (paramiko).

Commands are argv lists everywhere. Over SSH the argv is joined with shlex.quote, so the remote
shell sees each argument as one word and never task data as shell syntax. One SSH connection
per host is shared by every executor using it (AiiDA users got banned for opening many), with a
bounded number of concurrent channels, keepalives, and reconnects with backoff.
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import paramiko
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("fem_hpc.shell")


class RunnerError(Exception):
    """The command could not be run at all (connection lost, binary missing, timeout)."""


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _observe(argv: list[str], seconds: float, ok: bool) -> None:
    try:
        from .metrics import observe_command
    except ImportError:  # metrics are optional
        return
    observe_command(os.path.basename(argv[0]) if argv else "?", seconds, ok)


class Runner(ABC):
    @abstractmethod
    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None) -> CommandResult:
        """Run argv; `env` is the complete environment for it (None: the runner's default)."""

    @abstractmethod
    def write_file(self, path: Path, text: str, mode: int = 0o700) -> None:
        """Write a file where the commands run, atomically (temp file + rename)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    @abstractmethod
    def describe(self) -> str: ...


class LocalRunner(Runner):
    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None) -> CommandResult:
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            _observe(argv, time.monotonic() - start, False)
            raise RunnerError(f"{argv[0]}: command not found on this host") from None
        except subprocess.TimeoutExpired:
            _observe(argv, time.monotonic() - start, False)
            raise RunnerError(f"{argv[0]} did not answer within {timeout:.0f}s") from None
        seconds = time.monotonic() - start
        _observe(argv, seconds, proc.returncode == 0)
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr, seconds)

    def write_file(self, path: Path, text: str, mode: int = 0o700) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)

    def describe(self) -> str:
        return "local"


class SSHSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str | None = None
    key_file: Path | None = None  # else the SSH agent
    known_hosts: Path | None = None  # else ~/.ssh/known_hosts
    auto_add_host_key: bool = False  # trust-on-first-use only when the site says so explicitly
    max_channels: int = Field(default=4, ge=1, le=64)
    keepalive_seconds: int = Field(default=30, ge=0)
    connect_timeout: float = Field(default=15, gt=0)


class SSHRunner(Runner):
    def __init__(self, settings: SSHSettings):
        self.settings = settings
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._channels = threading.BoundedSemaphore(settings.max_channels)
        self._next_attempt = 0.0
        self._backoff = 1.0
        self.connects = 0

    def describe(self) -> str:
        s = self.settings
        return f"ssh://{s.user + '@' if s.user else ''}{s.host}:{s.port}"

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                self._client.close()
                self._client = None
            now = time.monotonic()
            if now < self._next_attempt:
                raise RunnerError(f"{self.describe()} is unreachable; next attempt in {self._next_attempt - now:.0f}s")
            try:
                client = self._connect()
            except (OSError, paramiko.SSHException) as exc:
                self._next_attempt = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 60)
                raise RunnerError(f"cannot connect to {self.describe()}: {exc}") from None
            self._backoff = 1.0
            self._client = client
            self.connects += 1
            transport = client.get_transport()
            assert transport is not None
            return transport

    def _connect(self) -> paramiko.SSHClient:
        s = self.settings
        client = paramiko.SSHClient()
        known = s.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if known.exists():
            client.load_host_keys(str(known))
        if s.auto_add_host_key:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(s.host, port=s.port, username=s.user, key_filename=str(s.key_file) if s.key_file else None,
                       allow_agent=s.key_file is None, look_for_keys=False, timeout=s.connect_timeout,
                       banner_timeout=s.connect_timeout, auth_timeout=s.connect_timeout)
        if s.auto_add_host_key and s.known_hosts:
            client.save_host_keys(str(s.known_hosts))
        transport = client.get_transport()
        if transport is not None and s.keepalive_seconds:
            transport.set_keepalive(s.keepalive_seconds)
        log.info("connected to %s", self.describe())
        return client

    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None) -> CommandResult:
        # The remote side gets one command line of quoted words. Variables are set with `env`
        # as words too (sshd usually refuses SendEnv).
        words = list(argv)
        if env:
            words = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *words]
        command = shlex.join(words)
        start = time.monotonic()
        with self._channels:
            try:
                chan = self._transport().open_session(timeout=self.settings.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._drop()
                raise RunnerError(f"{self.describe()}: cannot open a channel: {exc}") from None
            try:
                chan.exec_command(command)
                out, err = bytearray(), bytearray()
                deadline = start + timeout
                while True:
                    if chan.recv_ready():
                        out += chan.recv(65536)
                        continue
                    if chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                        continue
                    if chan.exit_status_ready():
                        break
                    if time.monotonic() > deadline:
                        _observe(argv, time.monotonic() - start, False)
                        raise RunnerError(f"{argv[0]} on {self.describe()} did not answer within {timeout:.0f}s")
                    select.select([chan], [], [], 0.05)
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                rc = chan.recv_exit_status()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._drop()
                raise RunnerError(f"{self.describe()}: connection lost during {argv[0]}: {exc}") from None
            finally:
                chan.close()
        seconds = time.monotonic() - start
        _observe(argv, seconds, rc == 0)
        return CommandResult(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"), seconds)

    def write_file(self, path: Path, text: str, mode: int = 0o700) -> None:
        with self._channels:
            try:
                sftp = paramiko.SFTPClient.from_transport(self._transport())
                assert sftp is not None
                try:
                    tmp = f"{path}.tmp"
                    with sftp.open(tmp, "w") as f:
                        f.write(text)
                    sftp.chmod(tmp, mode)
                    sftp.posix_rename(tmp, str(path))
                finally:
                    sftp.close()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._drop()
                raise RunnerError(f"{self.describe()}: cannot write {path}: {exc}") from None

    def _drop(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def close(self) -> None:
        self._drop()


_ssh_runners: dict[tuple[str, int, str | None], SSHRunner] = {}
_ssh_lock = threading.Lock()


def runner_for(ssh: SSHSettings | None) -> Runner:
    """The local runner, or the one shared SSH runner of that host."""
    if ssh is None:
        return LocalRunner()
    key = (ssh.host, ssh.port, ssh.user)
    with _ssh_lock:
        runner = _ssh_runners.get(key)
        if runner is None:
            runner = _ssh_runners[key] = SSHRunner(ssh)
        return runner


# Environment variables a scheduler command may inherit from the service. sbatch and qsub copy
# the submitter's environment into the job, so the service's own secrets (FEM_HPC_BROKER_URL...)
# must not be in it.
SAFE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "SLURM_CONF", "MUNGE_SOCKET")


def scrubbed_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV or k.startswith("LC_")}
    env.update(extra or {})
    return env
