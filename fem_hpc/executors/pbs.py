"""The `pbs` executor: qsub / one qstat per cycle for all tracked jobs / qdel.

`dialect: pbspro` (OpenPBS, PBS Pro: `qstat -f -F json -x`, `-l select=`) or `dialect: torque`
(`qstat -f` text, `-l nodes=:ppn=`; also Debian's slurm-wlm-torque wrappers over Slurm).
"""

from __future__ import annotations

from typing import Literal

from ..model import Check
from . import pbs_cmds as cmds
from .base import ExecutorError, Job, NativeStatus
from .batch import BatchExecutor, BatchSettings


class PBSSettings(BatchSettings):
    dialect: Literal["pbspro", "torque"] = "pbspro"
    queue: str | None = None
    account: str | None = None


class PBSExecutor(BatchExecutor):
    kind = "pbs"
    runtimes = ("qsub",)
    template = "pbs.sh.j2"
    Settings = PBSSettings
    settings: PBSSettings

    def directives(self, job: Job) -> list[str]:
        return cmds.directives(job.task, job.workdir, self.settings.dialect, queue=self.settings.queue,
                               account=self.settings.account, extra_directives=self.settings.extra_directives)

    def submit(self, job: Job) -> str:
        self.submit_script(job)
        seen = self.where(job)  # off-cluster: the paths on the cluster
        argv = cmds.qsub_argv(str(seen.script_path), str(seen.fem_dir / "scheduler.out"),
                              str(seen.fem_dir / "scheduler.err"))
        res = self.command(argv, extra_env=job.secret_env)
        if not res.ok:
            raise ExecutorError(f"qsub refused the job: {(res.stderr or res.stdout).strip()}")
        try:
            return cmds.parse_qsub(res.stdout)
        except ValueError as exc:
            raise ExecutorError(str(exc)) from None

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        ids = [j.native_id for j in jobs if j.native_id]
        if not ids:
            return {}
        res = self.command(cmds.qstat_argv(self.settings.dialect, ids))
        # qstat exits non-zero when some ids are unknown but still prints the others; only an
        # empty answer with an error that is not about unknown ids is a failed poll.
        if not res.ok and not res.stdout.strip() and "unknown job" not in res.stderr.lower():
            raise ExecutorError(f"qstat failed: {(res.stderr or res.stdout).strip()}")
        try:
            return cmds.parse_qstat(self.settings.dialect, res.stdout)
        except ValueError as exc:
            raise ExecutorError(f"cannot read qstat output: {exc}") from None

    def cancel(self, job: Job) -> None:
        if job.native_id:
            res = self.command(cmds.qdel_argv(job.native_id))
            if not res.ok:
                raise ExecutorError(f"qdel failed: {res.stderr.strip()}")

    def find_by_name(self, job: Job) -> str | None:
        # PBS has no cheap query by name; the journal's intent + marker decide. A full `qstat -f`
        # of the user's jobs would be the lookup, done once at restart only.
        res = self.command(["qstat", "-f"] + (["-F", "json"] if self.settings.dialect == "pbspro" else []))
        if not res.ok and not res.stdout.strip():
            raise ExecutorError(f"qstat failed: {res.stderr.strip()}")
        found = [s for s in cmds.parse_qstat(self.settings.dialect, res.stdout).values()
                 if s.job_name == job.job_name]
        live = [s for s in found if not s.state.final] or found
        return live[-1].native_id if live else None

    def checks(self) -> list[Check]:
        return [self.check_command("pbs server", ["qstat", "-q"] if self.settings.dialect == "pbspro"
                                   else ["qstat"], f"start the PBS server, or fix executors.{self.name}.ssh")]
