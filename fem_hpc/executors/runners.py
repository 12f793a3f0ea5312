"""Runners: where scheduler commands run. `LocalRunner` (subprocess, in commands.py) or
`SSHRunner` (paramiko, here).

Commands are argv lists everywhere. Over SSH the argv is joined with shlex.quote, so the remote
shell sees each argument as one word and never task data as shell syntax. One SSH connection
per host is shared by every executor using it (AiiDA users got banned for opening many), with a
bounded number of concurrent channels, keepalives, and reconnects with backoff.
"""

from __future__ import annotations

import logging
import re
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import paramiko
from pydantic import BaseModel, ConfigDict, Field

from .. import metrics
from ..backoff import Backoff
from .commands import (
    SAFE_ENV,
    STREAM_CHUNK,
    CommandResult,
    Feed,
    LocalRunner,
    Runner,
    RunnerError,
    Sink,
    keep_tail,
    observe,
    scrubbed_env,
)

__all__ = ["SAFE_ENV", "CommandResult", "LocalRunner", "Runner", "RunnerError", "SSHRunner", "SSHSettings",
           "release", "runner_for", "scrubbed_env"]

log = logging.getLogger("fem_hpc.executors.runners")
_T = TypeVar("_T")


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
    # Longest wait between two connection attempts while the host is unreachable (the delay
    # doubles from 1 s up to this).
    reconnect_max_seconds: float = Field(default=30.0, ge=1)


# How long a command that has exited may still send output: sshd reports the exit status as
# soon as the process ends, possibly before it has forwarded everything the process wrote (and a
# background child may hold the pipes open). Output is read until EOF, for at most this long.
EOF_GRACE_SECONDS = 2.0
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _server_answered(exc: BaseException) -> bool:
    """True when the error is the server's answer (a refused channel, an SFTP status such as
    'no such file'), so the connection itself may be fine. Socket-level errors are not answers."""
    if isinstance(exc, paramiko.ChannelException):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError))


# Reads records from stdin (a name, a line count, then the value's lines), exports each, then
# runs "$@". A constant: no task data is ever part of it.
_EXPORT_FROM_STDIN = (
    'while IFS= read -r fem_n; do IFS= read -r fem_c; fem_v=; fem_i=0; '
    'while [ "$fem_i" -lt "$fem_c" ]; do IFS= read -r fem_l; '
    'if [ "$fem_i" -gt 0 ]; then fem_v="$fem_v\n$fem_l"; else fem_v=$fem_l; fi; fem_i=$((fem_i+1)); done; '
    'export "$fem_n=$fem_v"; done; unset fem_n fem_c fem_v fem_i fem_l; exec "$@"'
)


def _env_record(name: str, value: str) -> str:
    lines = value.split("\n")
    return f"{name}\n{len(lines)}\n" + "".join(line + "\n" for line in lines)


class _RemoteStopped(Exception):
    pass


class _ChannelWriter:
    """The stdin of a remote command as a binary file for tarfile & co. Between writes it reads
    what the command sent back, so a chatty command never blocks on a full window."""

    def __init__(self, chan: paramiko.Channel, out: bytearray | None, sink: Sink | None, err: bytearray):
        self.chan, self.out, self.sink, self.err = chan, out, sink, err

    def write(self, data: bytes) -> int:
        while self.chan.recv_stderr_ready():
            self.err.extend(self.chan.recv_stderr(65536))
            keep_tail(self.err)
        while self.chan.recv_ready():
            piece = self.chan.recv(STREAM_CHUNK)
            if self.sink is not None:
                self.sink(piece)
            elif self.out is not None:
                self.out.extend(piece)
        if self.chan.exit_status_ready() or self.chan.closed:
            raise _RemoteStopped()
        try:
            self.chan.sendall(data)
        except OSError:
            if self.chan.exit_status_ready() or self.chan.closed:
                raise _RemoteStopped() from None
            raise
        return len(data)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


class SSHRunner(Runner):
    def __init__(self, settings: SSHSettings):
        self.settings = settings
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._channels = threading.BoundedSemaphore(settings.max_channels)
        self._next_attempt = 0.0
        self._backoff = Backoff(cap=settings.reconnect_max_seconds, base=1.0, jitter=False)
        self.connects = 0
        self.channels = 0  # channels opened: SSH round trips (commands, streams, SFTP sessions)

    def describe(self) -> str:
        s = self.settings
        return f"ssh://{s.user + '@' if s.user else ''}{s.host}:{s.port}"

    def _transport(self) -> tuple[paramiko.SSHClient, paramiko.Transport]:
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return self._client, transport
                self._client.close()
                self._client = None
            now = time.monotonic()
            if now < self._next_attempt:
                raise RunnerError(f"{self.describe()} is unreachable; next attempt in {self._next_attempt - now:.0f}s",
                                  transport=True)
            try:
                client = self._connect()
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self._next_attempt = time.monotonic() + self._backoff.next()
                raise RunnerError(f"cannot connect to {self.describe()}: {exc}", transport=True) from None
            self._backoff.reset()
            self._client = client
            self.connects += 1
            metrics.ssh_connect(self.settings.host)
            transport = client.get_transport()
            assert transport is not None
            return client, transport

    def _connect(self) -> paramiko.SSHClient:
        s = self.settings
        client = paramiko.SSHClient()
        try:
            known = s.known_hosts or Path.home() / ".ssh" / "known_hosts"
            if known.exists():
                client.load_host_keys(str(known))
            if s.auto_add_host_key:
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            else:
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect(s.host, port=s.port, username=s.user,
                           key_filename=str(s.key_file) if s.key_file else None,
                           allow_agent=s.key_file is None, look_for_keys=False, timeout=s.connect_timeout,
                           banner_timeout=s.connect_timeout, auth_timeout=s.connect_timeout)
            if s.auto_add_host_key and s.known_hosts:
                client.save_host_keys(str(s.known_hosts))
        except BaseException:
            # paramiko leaves the transport (and its thread) running when the host key is
            # refused or authentication fails.
            client.close()
            raise
        transport = client.get_transport()
        if transport is not None:
            if s.keepalive_seconds:
                transport.set_keepalive(s.keepalive_seconds)
            try:  # small request/answer packets: without this each channel open waits ~40 ms (Nagle)
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (AttributeError, OSError):
                pass
        log.info("connected to %s", self.describe())
        return client

    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None) -> CommandResult:
        # The remote side gets one command line of quoted words. Variables (sshd usually refuses
        # SendEnv) travel on the channel's stdin, read by a fixed snippet that exports them before
        # exec'ing the argv: values never appear on a command line, where `ps` would show them.
        if not argv:
            raise RunnerError("empty command")
        words = list(argv)
        stdin = b""
        if env:
            bad = [k for k in env if not _ENV_NAME_RE.fullmatch(k)]
            if bad:
                raise RunnerError(f"invalid environment variable name(s): {', '.join(map(repr, bad))}")
            if any("\0" in v for v in env.values()):
                raise RunnerError("environment values must not contain NUL")
            words = ["sh", "-c", _EXPORT_FROM_STDIN, "sh", *words]
            stdin = "".join(_env_record(k, v) for k, v in sorted(env.items())).encode()
        command = shlex.join(words)
        start = time.monotonic()
        deadline = start + timeout
        with self._channels:
            client, chan = self._open(lambda t: t.open_session(timeout=self.settings.connect_timeout),
                                      "cannot open a channel")
            with self._on_channel(client, chan, argv, start):
                chan.exec_command(command)
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
                out, err = self._collect(chan, argv, deadline, timeout)
                rc = self._exit_status(client, chan, argv)
        seconds = time.monotonic() - start
        observe(argv, seconds, rc == 0)
        return CommandResult(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"), seconds)

    def _open(self, opener: Callable[[paramiko.Transport], _T | None], what: str) -> tuple[paramiko.SSHClient, _T]:
        """A new channel (session or SFTP) on the shared connection. A connection found dead here
        (e.g. sshd restarted since the last command) is replaced once at once: nothing has run
        yet, so retrying cannot run a command twice."""
        for attempt in (1, 2):
            client, transport = self._transport()
            try:
                opened = opener(transport)
                if opened is None:
                    raise paramiko.SSHException("the server closed the channel")
                self.channels += 1
                metrics.ssh_channel(self.settings.host)
                return client, opened
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._drop(client, exc)
                if attempt == 2 or _server_answered(exc):
                    raise RunnerError(f"{self.describe()}: {what}: {exc}", transport=True) from None
                log.info("connection to %s lost (%s); reconnecting", self.describe(), exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _collect(self, chan: paramiko.Channel, argv: list[str], deadline: float,
                 timeout: float) -> tuple[bytearray, bytearray]:
        """stdout and stderr of the command, read until EOF after its exit status has come."""
        out, err = bytearray(), bytearray()
        fd = chan.fileno()  # readable while stdout or stderr has data (or at EOF)
        exited_at: float | None = None
        while True:
            progressed = False
            while chan.recv_ready():
                out += chan.recv(65536)
                progressed = True
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                progressed = True
            done = chan.exit_status_ready()
            if done and (chan.eof_received or chan.closed):
                # Data arrives before EOF, so nothing is left behind; read what raced in.
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                return out, err
            now = time.monotonic()
            if done:
                exited_at = exited_at or now
                if now - exited_at >= EOF_GRACE_SECONDS or now > deadline:
                    log.warning("%s on %s exited but kept its output open (a background child?); "
                                "using the output read so far", argv[0], self.describe())
                    return out, err
            elif now > deadline:
                # Over SSH a cut network looks exactly like this (TCP keeps quiet): a link problem.
                raise RunnerError(f"{argv[0]} on {self.describe()} did not answer within {timeout:g}s",
                                  transport=True)
            if progressed:
                continue
            if chan.eof_received:
                chan.status_event.wait(0.05)  # the pipe stays readable after EOF: wait on the status
            else:
                select.select([fd], [], [], 0.05)

    def write_file(self, path: Path, text: str, mode: int = 0o700) -> None:
        with self._channels:
            client, sftp = self._open(paramiko.SFTPClient.from_transport, f"cannot start SFTP to write {path}")
            tmp = f"{path}.tmp"
            try:
                channel = sftp.get_channel()
                if channel is not None:
                    channel.settimeout(max(30.0, self.settings.connect_timeout))
                with sftp.open(tmp, "w") as f:
                    f.write(text)
                sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, str(path))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if _server_answered(exc):
                    try:
                        sftp.remove(tmp)
                    except (paramiko.SSHException, OSError, EOFError):
                        pass
                self._drop(client, exc)
                raise RunnerError(f"{self.describe()}: cannot write {path}: {exc}",
                                  transport=not _server_answered(exc)) from None
            finally:
                sftp.close()

    def stream(self, argv: list[str], *, feed: Feed | None = None, sink: Sink | None = None,
               idle_timeout: float = 60.0) -> CommandResult:
        # One exec channel carries the whole transfer: no file-per-round-trip SFTP walk.
        if not argv:
            raise RunnerError("empty command")
        start = time.monotonic()
        out, err = bytearray(), bytearray()
        with self._channels:
            client, chan = self._open(lambda t: t.open_session(timeout=self.settings.connect_timeout),
                                      "cannot open a channel")
            with self._on_channel(client, chan, argv, start):
                chan.settimeout(idle_timeout)  # a send into a window that never opens raises
                chan.exec_command(shlex.join(argv))
                if feed is not None:
                    writer = _ChannelWriter(chan, out if sink is None else None, sink, err)
                    try:
                        feed(writer)  # type: ignore[arg-type]
                    except _RemoteStopped:
                        pass  # the command exited while being fed: its status and stderr say why
                if not chan.closed:
                    chan.shutdown_write()
                self._drain(chan, out, err, sink, argv, idle_timeout)
                rc = self._exit_status(client, chan, argv)
        seconds = time.monotonic() - start
        observe(argv, seconds, rc == 0)
        return CommandResult(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"), seconds)

    @contextmanager
    def _on_channel(self, client: paramiko.SSHClient, chan: paramiko.Channel, argv: list[str],
                    start: float) -> Iterator[None]:
        """Around one command on its channel: a failure is counted, a lost connection is dropped and
        raised as a transport error (the caller pauses, never fails), and the channel is closed."""
        try:
            yield
        except RunnerError:
            observe(argv, time.monotonic() - start, False)
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._drop(client, exc)
            raise RunnerError(f"{self.describe()}: connection lost during {argv[0]}: {exc}",
                              transport=True) from None
        finally:
            chan.close()

    def _exit_status(self, client: paramiko.SSHClient, chan: paramiko.Channel, argv: list[str]) -> int:
        """The command's exit status. A channel closed without one (-1) on a connection that died
        is a lost link, not the command's answer (with the connection alive, -1 is a command killed
        by a signal: sshd sends exit-signal instead)."""
        rc = chan.recv_exit_status()
        if rc == -1:
            transport = client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException(f"the connection closed before {argv[0]} reported its exit status")
        return rc

    def _drain(self, chan: paramiko.Channel, out: bytearray, err: bytearray, sink: Sink | None,
               argv: list[str], idle_timeout: float) -> None:
        """Read stdout (to the sink) and stderr until EOF and the exit status."""
        fd = chan.fileno()
        heard = time.monotonic()
        while True:
            progressed = False
            while chan.recv_ready():
                data = chan.recv(STREAM_CHUNK)
                if sink is not None:
                    sink(data)
                else:
                    out.extend(data)
                progressed = True
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
                keep_tail(err)
                progressed = True
            if chan.exit_status_ready() and (chan.eof_received or chan.closed) and not chan.recv_ready() \
                    and not chan.recv_stderr_ready():
                return
            now = time.monotonic()
            if progressed:
                heard = now
                continue
            if now - heard > idle_timeout:
                raise RunnerError(f"{argv[0]} on {self.describe()} sent nothing for {idle_timeout:g}s",
                                  transport=True)
            if chan.eof_received:
                chan.status_event.wait(0.05)
            else:
                select.select([fd], [], [], 0.05)

    def _drop(self, client: paramiko.SSHClient | None = None, exc: BaseException | None = None) -> None:
        """Close the connection after an error, unless the server answered the request (then the
        connection is fine and other commands may be using it), and only if it is still the
        current one (another thread may have reconnected meanwhile)."""
        with self._lock:
            if self._client is None or (client is not None and self._client is not client):
                return
            if exc is not None and _server_answered(exc):
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return
            self._client.close()
            self._client = None

    def close(self) -> None:
        self._drop()


# One SSH connection per set of SSH settings, shared by every executor that names exactly those
# settings (e.g. two partitions of one cluster), counted so the last release closes it. Keyed by
# *all* the settings: an executor with another key file or channel limit gets its own runner.
_ssh_runners: dict[str, tuple[SSHRunner, int]] = {}
_ssh_lock = threading.Lock()


def runner_for(ssh: SSHSettings | None) -> Runner:
    """The local runner, or the shared SSH runner of these settings; give it back with release()."""
    if ssh is None:
        return LocalRunner()
    key = ssh.model_dump_json()
    with _ssh_lock:
        runner, users = _ssh_runners.get(key, (None, 0))
        if runner is None:
            runner = SSHRunner(ssh)
        _ssh_runners[key] = (runner, users + 1)
        return runner


def release(runner: Runner) -> None:
    """One user of `runner` is done; the last one closes its connection."""
    if not isinstance(runner, SSHRunner):
        runner.close()
        return
    key = runner.settings.model_dump_json()
    with _ssh_lock:
        shared, users = _ssh_runners.get(key, (None, 0))
        if shared is not runner:
            runner.close()
            return
        if users > 1:
            _ssh_runners[key] = (runner, users - 1)
            return
        del _ssh_runners[key]
    runner.close()
