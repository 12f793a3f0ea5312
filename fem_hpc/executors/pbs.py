"""The `pbs` executor: qsub / one qstat per cycle for all tracked jobs / qdel.

`dialect: pbspro` (OpenPBS, PBS Pro: `qstat -f -F json -x`, `-l select=`) or `dialect: torque`
(`qstat -f` text, `-l nodes=:ppn=`; also Debian's slurm-wlm-torque wrappers over Slurm).

Two things a real OpenPBS does that the poll adapts to, each learnt once per executor instance
(one per cluster) and logged once:
- job history off (`job_history_enable = False`, the OpenPBS default): `qstat -x IDS` then prints
  no job at all, so jobs are polled without -x. Finished jobs vanish from qstat at once and are
  settled by their exit-code markers, as a job that left squeue is. With no F/substate-91 record
  of a qdel, no_record_note() tells the tracker to judge by the evidence there is: a job gone
  before it started, or SIGTERM'd before its walltime, was deleted (lifecycle/outcome.py).
- a qstat that prints fewer of the asked ids than it was given, with no word about the others
  (openpbs/openpbs#2672 on the master branch): polls become one unfiltered `qstat -f -F json [-x]`
  filtered here. Still one call per cycle, never one per job.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import field_validator

from ..model import Check
from . import pbs_cmds as cmds
from . import pbs_parse
from .base import ExecutorError, Job, NativeStatus
from .batch import BatchExecutor, BatchSettings
from .runners import CommandResult

log = logging.getLogger("fem_hpc.executors.pbs")


class PBSSettings(BatchSettings):
    dialect: Literal["pbspro", "torque"] = "pbspro"
    queue: str | None = None
    account: str | None = None
    # The GPU resource of this PBS site, in the select chunk (pbspro): a resource name (`ngpus`,
    # `gpus`, ...) or a fragment with `{gpus}` in it (`ngpus={gpus}:gpu_model=a100`).
    gpu_resource: str = cmds.DEFAULT_GPU_RESOURCE

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        cmds.gpu_select(value, 1)  # raises ValueError naming the accepted forms
        return value


class PBSExecutor(BatchExecutor):
    kind = "pbs"
    runtimes = ("qsub",)
    template = "pbs.sh.j2"
    Settings = PBSSettings
    settings: PBSSettings

    def __init__(self, name, settings, site):
        super().__init__(name, settings, site)
        # What this server turned out to do (see the module doc); reset only by a restart.
        self.history = True  # qstat -x works: the server keeps job history
        self.unfiltered = False  # qstat with several ids may leave some out: list all instead

    def directives(self, job: Job) -> list[str]:
        return cmds.directives(job.task, job.workdir, self.settings.dialect, queue=self.settings.queue,
                               account=self.settings.account, extra_directives=self.settings.extra_directives,
                               gpu_resource=self.settings.gpu_resource)

    def submit(self, job: Job) -> str:
        self.submit_script(job)
        seen = self.where(job)  # off-cluster: the paths on the cluster
        argv = cmds.qsub_argv(str(seen.script_path), str(seen.fem_dir / "scheduler.out"),
                              str(seen.fem_dir / "scheduler.err"))
        res = self.command(argv, extra_env=job.secret_env)
        if not res.ok:
            text = (res.stderr or res.stdout).strip()
            hint = cmds.qsub_error_hint(text, gpus=int(job.task.resources.gpus or 0),
                                        gpu_resource=self.settings.gpu_resource, executor=self.name)
            raise ExecutorError(f"qsub refused the job: {text}" + (f" ({hint})" if hint else ""))
        try:
            return cmds.parse_qsub(res.stdout)
        except ValueError as exc:
            raise ExecutorError(str(exc)) from None

    # -- status ------------------------------------------------------------------------
    def _qstat(self, argv: list[str]) -> CommandResult:
        res = self.command(argv)
        # qstat exits non-zero when some ids are unknown (153) or finished without -x (35) but
        # still prints the others; only an empty answer with an error that explains no job is a
        # failed poll.
        if not res.ok and not res.stdout.strip() and not cmds.ids_named_on_stderr(res.stderr):
            raise ExecutorError(f"qstat failed: {(res.stderr or res.stdout).strip()}")
        return res

    def _parse(self, res: CommandResult) -> dict[str, NativeStatus]:
        try:
            return pbs_parse.parse_qstat(self.settings.dialect, res.stdout)
        except ValueError as exc:
            raise ExecutorError(f"cannot read qstat output: {exc}") from None

    def _history_off_seen(self, res: CommandResult) -> bool:
        if not (self.history and cmds.history_disabled(res.stderr)):
            return False
        self.history = False
        log.warning("PBS server of executor %s keeps no job history (job_history_enable = False): polling "
                    "without -x from now on; finished jobs are settled by their exit-code markers. To keep "
                    "PBS's own word on finished jobs: %s", self.name, cmds.HISTORY_FIX)
        return True

    def _poll_all(self, ids: list[str]) -> dict[str, NativeStatus]:
        res = self._qstat(cmds.qstat_all_argv(history=self.history))
        if self._history_off_seen(res):
            res = self._qstat(cmds.qstat_all_argv(history=False))
        return cmds.pick(self._parse(res), ids)

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        ids = [j.native_id for j in jobs if j.native_id]
        if not ids:
            return {}
        dialect = self.settings.dialect
        if dialect == "torque":
            return cmds.pick(self._parse(self._qstat(cmds.qstat_argv(dialect, ids))), ids)
        if self.unfiltered:
            return self._poll_all(ids)
        res = self._qstat(cmds.qstat_argv(dialect, ids, history=self.history))
        if self._history_off_seen(res):
            res = self._qstat(cmds.qstat_argv(dialect, ids, history=False))
        statuses = cmds.pick(self._parse(res), ids)
        unexplained = [i for i in ids if i not in statuses
                       and not any(cmds.same_job(i, named) for named in cmds.ids_named_on_stderr(res.stderr))]
        if unexplained and len(ids) > 1:
            self.unfiltered = True
            log.warning("qstat of executor %s printed %d of the %d jobs asked for and said nothing about the others "
                        "(a known bug of some OpenPBS qstat clients, openpbs/openpbs#2672): polling with one "
                        "unfiltered qstat from now on", self.name, len(statuses), len(ids))
            return self._poll_all(ids)
        return statuses

    def no_record_note(self) -> str | None:
        # Without job history PBS forgets a job the moment it ends (qdel included): no F, no
        # substate 91, no Exit_status. The outcome is then decided from the marker and what the
        # tracker saw, and its message says why PBS's word is missing.
        return None if self.history else cmds.NO_HISTORY_NOTE

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
        found = [s for s in pbs_parse.parse_qstat(self.settings.dialect, res.stdout).values()
                 if s.job_name == job.job_name]
        live = [s for s in found if not s.state.final] or found
        return live[-1].native_id if live else None

    def checks(self) -> list[Check]:
        server = self.check_command("pbs server", ["qstat", "-q"] if self.settings.dialect == "pbspro"
                                    else ["qstat"], f"start the PBS server, or fix executors.{self.name}.ssh")
        if self.settings.dialect != "pbspro" or server.status != "ok":
            return [server]
        return [server, self.history_check()]

    def history_check(self) -> Check:
        """Whether the server keeps job history: without it fem-hpc still follows every live job,
        but PBS's own word on a finished job (walltime, memory, qdel, a failed start) is gone."""
        name = "pbs job history"
        try:
            res = self.command(cmds.qstat_server_argv())
        except ExecutorError as exc:
            return Check(name=name, status="warning", detail=f"cannot read the server's settings: {exc}",
                         fix=cmds.HISTORY_FIX)
        if not res.ok:
            detail = (res.stderr or res.stdout).strip() or f"exit {res.returncode}"
            return Check(name=name, status="warning", detail=f"`qstat -B -f` failed: {detail}", fix=cmds.HISTORY_FIX)
        if cmds.parse_history_setting(res.stdout):
            return Check(name=name, status="ok", detail="job_history_enable = True: finished jobs keep their "
                         "Exit_status, comment and substate in `qstat -x`")
        return Check(name=name, status="warning",
                     detail="job_history_enable is False (the OpenPBS default): fem-hpc follows live jobs without "
                     "-x and settles finished ones by their exit-code markers and what it saw of them (a job gone "
                     "before it started, or SIGTERM'd before its walltime, is CANCELLED without who deleted it), "
                     "but a job PBS ends before its wrapper can write a marker (failed to start, node lost) is "
                     "reported LOST instead of with PBS's reason",
                     fix=f"as a PBS manager: {cmds.HISTORY_FIX}")
