"""The `slurm` executor: sbatch / one squeue per cycle / scancel, sacct as a second opinion."""

from __future__ import annotations

import logging

from pydantic import Field

from ..model import Check
from . import slurm_cmds as cmds
from .base import ExecutorError, Job, NativeStatus
from .batch import BatchExecutor, BatchSettings

log = logging.getLogger("fem_hpc.executors.slurm")


class SlurmSettings(BatchSettings):
    partition: str | None = None
    account: str | None = None
    user: str | None = None  # squeue -u USER; default --me
    sacct: bool = Field(default=True, description="ask sacct about jobs that left squeue without a marker")


class SlurmExecutor(BatchExecutor):
    kind = "slurm"
    runtimes = ("sbatch",)
    template = "slurm.sh.j2"
    Settings = SlurmSettings
    settings: SlurmSettings

    def __init__(self, name, settings, site):
        super().__init__(name, settings, site)
        self._sacct_works = settings.sacct

    def directives(self, job: Job) -> list[str]:
        return cmds.directives(job.task, job.workdir, partition=self.settings.partition,
                               account=self.settings.account, extra_directives=self.settings.extra_directives)

    def submit(self, job: Job) -> str:
        self.submit_script(job)
        res = self.command(cmds.sbatch_argv(str(self.where(job).script_path)), extra_env=job.secret_env)
        if not res.ok:
            raise ExecutorError(f"sbatch refused the job: {(res.stderr or res.stdout).strip()}")
        try:
            return cmds.parse_sbatch(res.stdout)
        except ValueError as exc:
            raise ExecutorError(str(exc)) from None

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        res = self.command(cmds.squeue_argv(self.settings.user))
        if not res.ok:
            raise ExecutorError(f"squeue failed: {(res.stderr or res.stdout).strip()}")
        return cmds.parse_squeue(res.stdout)

    def cancel(self, job: Job) -> None:
        if job.native_id:
            res = self.command(cmds.scancel_argv(job.native_id))
            if not res.ok:
                raise ExecutorError(f"scancel failed: {res.stderr.strip()}")

    def find_by_name(self, job: Job) -> str | None:
        res = self.command(cmds.find_by_name_argv(job.job_name), kind="find")
        if not res.ok:
            raise ExecutorError(f"squeue failed: {res.stderr.strip()}")
        found = [s for s in cmds.parse_squeue(res.stdout).values() if s.job_name == job.job_name]
        if not found:
            return None
        live = [s for s in found if not s.state.final] or found
        return max(live, key=lambda s: int(s.native_id.split("_")[0].split("+")[0])).native_id

    def lookup_finished(self, job: Job) -> NativeStatus | None:
        if not self._sacct_works or not job.native_id:
            return None
        res = self.command(cmds.sacct_argv([job.native_id]))
        if not res.ok:
            # Accounting disabled (or slurmdbd down): stop asking, the grace period decides.
            log.info("sacct does not work here (%s); relying on markers and the grace period",
                     (res.stderr or res.stdout).strip()[:200])
            self._sacct_works = False
            return None
        status = cmds.parse_sacct(res.stdout).get(job.native_id)
        if status is not None and status.job_name and status.job_name != job.job_name:
            return None
        return status

    def checks(self) -> list[Check]:
        return [
            self.check_command("slurm controller", ["sinfo", "-h", "-o", "%P %a %D %T"],
                               f"start slurmctld/munged, or fix executors.{self.name}.ssh"),
            self.check_command("slurm queue", ["squeue", "--me", "-h", "-o", "%i"],
                               "check that this user may query squeue"),
        ]
