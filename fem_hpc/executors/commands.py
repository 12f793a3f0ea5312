"""Where commands run, as an interface: `Runner` (run, write_file, stream) and `LocalRunner`
(subprocess, argv, timeout). The SSH runner is in runners.py; both share the error and result
types defined here.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .. import metrics

Sink = Callable[[bytes], None]
STDERR_KEEP = 64 * 1024
STREAM_CHUNK = 256 * 1024


class RunnerError(Exception):
    """The command could not be run at all (connection lost, binary missing, timeout).

    `transport` is True when the link to the host is the problem (no connection, connection
    lost, authentication failing, no answer in time over SSH): then nothing is known about the
    command's effect, and the caller pauses and retries instead of failing anything."""

    def __init__(self, message: str, *, transport: bool = False):
        super().__init__(message)
        self.transport = transport


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


def observe(argv: list[str], seconds: float, ok: bool) -> None:
    metrics.observe_command(os.path.basename(argv[0]) if argv else "?", seconds, ok)


class Runner(ABC):
    @abstractmethod
    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None) -> CommandResult:
        """Run argv; `env` is the complete environment for it (None: the runner's default)."""

    @abstractmethod
    def write_file(self, path: Path, text: str, mode: int = 0o700) -> None:
        """Write a file where the commands run, atomically (temp file + rename)."""

    @abstractmethod
    def stream(self, argv: list[str], *, feed: Feed | None = None, sink: Sink | None = None,
               idle_timeout: float = 60.0) -> CommandResult:
        """Run argv with its stdin written by `feed(writer)` and its stdout handed to `sink(bytes)`
        piece by piece, in constant memory: a tar stream in or out over one channel. The result's
        stdout is empty when a sink is given; stderr is kept (its last STDERR_KEEP bytes).
        Raises RunnerError when nothing was heard for `idle_timeout` seconds."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    @abstractmethod
    def describe(self) -> str: ...


class Feed(Protocol):
    def __call__(self, out: BinaryIO, /) -> None: ...


def keep_tail(buf: bytearray) -> None:
    if len(buf) > STDERR_KEEP:
        del buf[:-STDERR_KEEP]


class LocalRunner(Runner):
    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None) -> CommandResult:
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            observe(argv, time.monotonic() - start, False)
            raise RunnerError(f"{argv[0]}: command not found on this host") from None
        except subprocess.TimeoutExpired:
            observe(argv, time.monotonic() - start, False)
            raise RunnerError(f"{argv[0]} did not answer within {timeout:.0f}s") from None
        seconds = time.monotonic() - start
        observe(argv, seconds, proc.returncode == 0)
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr, seconds)

    def write_file(self, path: Path, text: str, mode: int = 0o700) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)

    def stream(self, argv: list[str], *, feed: Feed | None = None, sink: Sink | None = None,
               idle_timeout: float = 60.0) -> CommandResult:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise RunnerError(f"{argv[0]}: command not found on this host") from None
        err = bytearray()
        out = bytearray()

        def drain_stderr() -> None:
            assert proc.stderr is not None
            while chunk := proc.stderr.read1(65536):
                err.extend(chunk)
                keep_tail(err)

        def drain_stdout() -> None:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(STREAM_CHUNK):
                if sink is not None:
                    sink(chunk)
                else:
                    out.extend(chunk)

        # The pipes are drained by threads while `feed` writes, so neither side can block the other.
        readers = [threading.Thread(target=drain_stderr, daemon=True),
                   threading.Thread(target=drain_stdout, daemon=True)]
        for t in readers:
            t.start()
        try:
            if feed is not None:
                assert proc.stdin is not None
                try:
                    feed(proc.stdin)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the command stopped reading: its exit status and stderr say why
            for t in readers:
                t.join()
            rc = proc.wait(timeout=idle_timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.monotonic() - start
        observe(argv, seconds, rc == 0)
        return CommandResult(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"), seconds)

    def describe(self) -> str:
        return "local"




# Environment variables a scheduler command may inherit from the service. sbatch and qsub copy
# the submitter's environment into the job, so the service's own secrets (FEM_HPC_BROKER_URL...)
# must not be in it.
SAFE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "SLURM_CONF", "MUNGE_SOCKET")


def scrubbed_env(extra: dict[str, str] | None = None, passthrough: Sequence[str] = ()) -> dict[str, str]:
    """The environment of every process fem-hpc starts for a task (a local job, sbatch/qsub, which
    copy it into the job): the few variables any program needs, the site's explicit pass-through
    list (`pass_env`), then `extra`. Nothing else of the service's own environment."""
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV or k.startswith("LC_") or k in passthrough}
    env.update(extra or {})
    return env
