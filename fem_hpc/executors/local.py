"""The `local` executor: the job script as a child process in its own process group.

Native id = pid. A restarted service re-adopts a job by its pid, checked against the job script
path in /proc/<pid>/cmdline so a recycled pid is never mistaken for the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from pydantic import Field

from ..model import State
from ..staging.volumes import VolumeError, volume_env
from .base import Executor, ExecutorError, ExecutorSettings, Job, NativeStatus
from .runners import scrubbed_env
from .timers import Stopper


class LocalSettings(ExecutorSettings):
    kill_grace_seconds: float = Field(default=10.0, ge=0)
    lost_grace_seconds: float = Field(default=5.0, ge=0)  # a local process leaves no NFS lag
    shell: str = "/bin/sh"


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


def _is_job_process(pid: int, script: Path) -> bool:
    cmd = _cmdline(pid)
    if cmd is None:
        return False
    try:  # a zombie (exited, not yet reaped) has an empty cmdline and counts as gone
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return False
    return str(script) in cmd


class LocalExecutor(Executor):
    kind = "local"
    template = "local.sh.j2"
    Settings = LocalSettings
    settings: LocalSettings

    def __init__(self, name, settings, site):
        super().__init__(name, settings, site)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._stopper = Stopper(self.settings.kill_grace_seconds)
        self._lock = threading.Lock()

    def template_context(self, job: Job) -> dict[str, Any]:
        if not job.task.volumes:
            return {}
        try:
            extra = volume_env(job.task, self.site, job.workdir, in_container=False)
        except VolumeError as exc:
            raise ExecutorError(str(exc)) from None
        return {"env_exports": sorted({**job.task.env, **extra}.items())}

    def submit(self, job: Job) -> str:
        log = open(job.fem_dir / "launcher.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [self.settings.shell, str(job.script_path)],
                cwd=str(job.workdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cancel reaches every descendant
                close_fds=True,
                env=scrubbed_env(job.secret_env, self.site.pass_env),  # never the service's secrets
            )
        except OSError as exc:
            raise ExecutorError(f"cannot start {self.settings.shell}: {exc.strerror}") from None
        finally:
            log.close()
        native = str(proc.pid)
        with self._lock:
            self._children[native] = proc
        return native

    def _alive(self, job: Job) -> bool:
        assert job.native_id is not None
        with self._lock:
            proc = self._children.get(job.native_id)
        if proc is not None:
            if proc.poll() is None:
                return True
            with self._lock:
                self._children.pop(job.native_id, None)
            return False
        return _is_job_process(int(job.native_id), job.script_path)

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        out: dict[str, NativeStatus] = {}
        for job in jobs:
            if job.native_id is None:
                continue
            if self._alive(job):
                if (timeout := self._stopper.walltime_verdict(job)) is not None:
                    self._stop(job, timeout)
                out[job.native_id] = NativeStatus(native_id=job.native_id, state=State.RUNNING,
                                                  job_name=job.job_name)
            elif (verdict := self._stopper.verdict(job.native_id)) is not None:
                out[job.native_id] = verdict
        return out

    def _stop(self, job: Job, verdict: NativeStatus) -> None:
        assert job.native_id is not None
        pgid = int(job.native_id)

        def terminate() -> bool:
            if not self._alive(job):
                return False
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                return False
            return True

        def kill() -> None:
            # The whole group, not only the wrapper: a descendant that ignores SIGTERM outlives a
            # wrapper that has already written its marker and exited.
            if self._alive(job) or _group_members(pgid):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        self._stopper.stop(job.native_id, verdict, terminate, kill)

    def close(self) -> None:
        self._stopper.close()

    def cancel(self, job: Job) -> None:
        if job.native_id is None:
            return
        self._stop(job, NativeStatus(native_id=job.native_id, state=State.CANCELLED, message="cancelled",
                                     job_name=job.job_name))

    def find_by_name(self, job: Job) -> str | None:
        for entry in Path("/proc").iterdir():
            # The wrapper leads its own process group; its forked subshells share the cmdline.
            if entry.name.isdigit() and _is_job_process(int(entry.name), job.script_path):
                try:
                    if os.getpgid(int(entry.name)) == int(entry.name):
                        return entry.name
                except ProcessLookupError:
                    continue
        return None

    def after_final(self, job: Job) -> None:
        if not job.native_id:
            return
        self._stopper.forget(job.native_id)  # a pending SIGKILL still reaches stragglers of the group
        with self._lock:
            proc = self._children.pop(job.native_id, None)
        if proc is not None:
            proc.poll()

    def poll_interval(self, youngest_age: float) -> float:
        return 0.5
