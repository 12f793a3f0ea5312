"""PBS (OpenPBS / PBS Pro and Torque) as a handful of pure functions: argv and output parsers.

Two dialects:

- ``pbspro``: OpenPBS / PBS Pro. Status is `qstat -f -F json -x IDS` (-x keeps finished jobs while
  the server keeps job history), with `Exit_status` in the JSON. Checked against a real OpenPBS
  23.06 (tests/fixtures/openpbs-23.06/):

  * A job PBS itself ends has a negative `Exit_status`, one of the `JOB_EXEC_*` codes of OpenPBS's
    src/include/job.h: -29 walltime, -27 mem, -28 cput kill, -1/-2 could not start, -3 retry and
    -11 rerun (the server requeues the job: it is back in Q, not finished). exec_code() is that table.
  * `qdel` (by anyone) ends a job `F` with substate 91 (JOB_SUBSTATE_TERMINATED) and a comment
    ending "... and terminated [by user@host]"; a qdel of a running job also has Exit_status 271.
  * With `job_history_enable = False` (the OpenPBS default) `qstat -x IDS` prints no job at all,
    not even running ones, exits 0 and says "PBS is not configured to maintain job history" on
    stderr; without -x a finished job is gone at once ("Unknown Job Id", or rc 35 "Job has
    finished" while history is on).
  * qstat exits 153 for an unknown id ("qstat: Unknown Job Id ID") and still prints the others.
  * The master branch's qstat prints only the FIRST of several ids (openpbs/openpbs#2672; the
    v23.06.06 release client prints all): the executor falls back to one unfiltered qstat.
- ``torque``: Torque's `qstat -f IDS` text. This is also what Debian's ``slurm-wlm-torque`` prints:
  its qsub/qstat/qdel are Perl wrappers over Slurm. What they do, read from /usr/bin/qsub,
  /usr/bin/qstat and /usr/bin/qdel (slurm-wlm 22.05) and checked on the real Slurm here:

  * `#PBS` lines are not read by the qsub wrapper but by sbatch itself, which understands
    -N, -q, -A, -o, -e, -l (walltime, mem (`512mb` ok), nodes=N:ppn=C[:gpus=G] (ppn becomes the
    task count, gpus --gpus-per-node), select=N:ncpus=C:mem=M (ncpus becomes --mincpus), ncpus,
    naccelerators), -a, -h, -v, -W depend/umask, and ignores -S, -r, -k, -j, -C.
    There is no working-directory directive: `#PBS -d` and `#PBS -w` make sbatch refuse the
    script ("invalid option"). The job starts in qsub's current directory, and the fem-hpc wrapper
    cds to the run dir itself.
  * The wrapper always passes its own `-o`/`-e` to sbatch (`<script>.o<id>` in qsub's current
    directory) unless they are on ITS command line, and the command line beats `#PBS -o/-e`:
    so qsub_argv() puts -o/-e on the command line too.
  * It builds the sbatch command as one string run by a shell: the script path and option values
    must be shell-safe (they are: paths are restricted below).
  * `qstat -f` prints `job_state = C` for every ended job (completed, failed, cancelled, timeout)
    and no `exit_status`: the exit-code marker decides. `-x` and `-F json` are not supported.
    It exits 153 when none of the asked ids is known.
  * `qdel` asks Slurm to kill the job (slurm_kill_job with SIGKILL); slurmctld still ends a batch
    job with SIGTERM first, then SIGKILL after KillWait, so the wrapper writes its marker
    (checked: exit_code 143, signal TERM), as with scancel and a walltime kill.
  * The job id is the bare Slurm id (`17`), and job arrays ids (`10_1`) are not found by qstat.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from ..layout import FEM_DIR, job_name
from ..model import Reason, State, Task, format_walltime
from .base import NativeStatus
from .directive_checks import SAFE_WORD_RE, check_path, check_plain, directive_lines, reject_control

Dialect = Literal["pbspro", "torque"]
DIALECTS: tuple[str, ...] = ("pbspro", "torque")

# --- submit ------------------------------------------------------------------------------------

# `40.pbs`, `123.host.domain`, `123` (Debian's wrapper), arrays `123[].host`, `123[4].host`.
_PBS_ID_RE = re.compile(r"^[0-9]+(?:\[[0-9]*\])?(?:\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)?$")


def qsub_argv(script_path: str, stdout_path: str | None = None, stderr_path: str | None = None) -> list[str]:
    """`qsub [-o OUT] [-e ERR] SCRIPT`. Pass the same -o/-e paths as the directives: on Debian's
    qsub wrapper only command-line -o/-e take effect (see the module doc); elsewhere it is harmless."""
    argv = ["qsub"]
    if stdout_path is not None:
        argv += ["-o", _path("stdout path", stdout_path)]
    if stderr_path is not None:
        argv += ["-e", _path("stderr path", stderr_path)]
    argv.append(_path("script path", script_path))
    return argv


def parse_qsub(stdout: str) -> str:
    """The job id qsub printed (`40.pbs`, `123.hostname`, or `123` from Debian's wrapper)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if lines and _PBS_ID_RE.fullmatch(lines[-1]):
        return lines[-1]
    shown = stdout.strip()[:300] or "(nothing)"
    raise ValueError(f"qsub did not print a job id (expected e.g. '123.server'), got: {shown!r}")


def _check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _PBS_ID_RE.fullmatch(job_id):
        raise ValueError(f"{job_id!r} is not a PBS job id")
    return job_id


def qdel_argv(job_id: str) -> list[str]:
    return ["qdel", _check_job_id(job_id)]


# --- status ------------------------------------------------------------------------------------


def qstat_argv(dialect: Dialect, job_ids: list[str], *, history: bool = True) -> list[str]:
    """ONE qstat for all tracked jobs: pbspro `qstat -f -F json -x IDS`, torque `qstat -f IDS`.
    Ids the server no longer knows are reported on stderr (and make qstat exit non-zero) while the
    others are still printed: the caller parses stdout whatever the exit status. `history=False`
    drops -x (a server without job history prints nothing at all with it)."""
    if not job_ids:
        raise ValueError("qstat_argv needs at least one job id")
    ids = [_check_job_id(j) for j in job_ids]
    if dialect == "pbspro":
        return ["qstat", "-f", "-F", "json", *(["-x"] if history else []), *ids]
    if dialect == "torque":
        return ["qstat", "-f", *ids]
    raise ValueError(f"unknown PBS dialect {dialect!r} (expected one of {DIALECTS})")


def qstat_all_argv(*, history: bool = True) -> list[str]:
    """OpenPBS `qstat -f -F json [-x]` without ids: every job the server shows this user, one call
    (the fallback for a qstat that prints fewer of the asked ids than it should)."""
    return ["qstat", "-f", "-F", "json", *(["-x"] if history else [])]


def qstat_server_argv() -> list[str]:
    """`qstat -B -f`: the server's attributes, readable by any user (job_history_enable among them)."""
    return ["qstat", "-B", "-f"]


_HISTORY_OFF_RE = re.compile(r"not configured to maintain job history", re.IGNORECASE)
# Ids qstat names on stderr: "qstat: Unknown Job Id 9999.pbs-vm", "qstat: 3.pbs-vm Job has finished,
# use -x ...", "qstat: PBS is not configured to maintain job history 88.pbs-vm".
_STDERR_ID_RES = (
    re.compile(r"Unknown Job Id:?\s+(\S+)", re.IGNORECASE),
    re.compile(r"^qstat:\s+(\S+)\s+Job has finished", re.IGNORECASE | re.MULTILINE),
    re.compile(r"maintain job history\s+(\S+)", re.IGNORECASE),
)


def history_disabled(stderr: str) -> bool:
    """Whether qstat said the server keeps no job history (then -x shows no job at all)."""
    return bool(_HISTORY_OFF_RE.search(stderr or ""))


def ids_named_on_stderr(stderr: str) -> set[str]:
    """Job ids qstat explained on stderr (unknown, finished without -x, no history): a job that is
    absent from stdout for a reason qstat gave, as opposed to one it silently left out."""
    found: set[str] = set()
    for pattern in _STDERR_ID_RES:
        found.update(m.group(1).rstrip(".,;") for m in pattern.finditer(stderr or ""))
    return found


def same_job(asked: str, printed: str) -> bool:
    """`123.pbs` and `123.pbs.example.org` are one job: qsub and qstat may name the server with or
    without its domain. The sequence number must match exactly."""
    if asked == printed:
        return True
    a_seq, _, a_server = asked.partition(".")
    p_seq, _, p_server = printed.partition(".")
    if a_seq != p_seq or not a_server or not p_server:
        return False
    return a_server.startswith(p_server + ".") or p_server.startswith(a_server + ".")


def pick(statuses: Mapping[str, NativeStatus], job_ids: Sequence[str]) -> dict[str, NativeStatus]:
    """The statuses of the asked ids only, keyed by the id as asked (an unfiltered qstat lists
    every job the user may see)."""
    out: dict[str, NativeStatus] = {}
    for job_id in job_ids:
        if job_id in statuses:
            out[job_id] = statuses[job_id]
            continue
        for printed, status in statuses.items():
            if same_job(job_id, printed):
                out[job_id] = status.model_copy(update={"native_id": job_id})
                break
    return out


_HISTORY_SETTING_RE = re.compile(r"^\s*(?:set server\s+)?job_history_enable\s*=\s*(\S+)", re.IGNORECASE | re.MULTILINE)


def parse_history_setting(text: str) -> bool:
    """`job_history_enable` from `qstat -B -f` (or `qmgr -c 'print server'`). An attribute that is
    not set is not printed, and its default is False."""
    m = _HISTORY_SETTING_RE.search(text or "")
    return bool(m) and m.group(1).strip().lower() in ("true", "t", "1", "y", "yes")


HISTORY_FIX = "qmgr -c 'set server job_history_enable=True'"


# --- negative Exit_status: the JOB_EXEC_* codes -------------------------------------------------


class ExecCode(NamedTuple):
    """What a negative Exit_status means. `requeued`: the server puts the job back in the queue
    (or on hold) instead of ending it, so the job is not over while PBS still lists it queued."""

    name: str
    meaning: str
    reason: Reason
    requeued: bool


def _code(name: str, meaning: str, reason: Reason = Reason.NODE_FAIL, requeued: bool = False) -> ExecCode:
    return ExecCode(name, meaning, reason, requeued)


# OpenPBS src/include/job.h (master, 2024) and what src/server/req_jobobit.c does with each: the
# RetryJob / setrerun / requeue branches are `requeued`; FAIL1, FAIL2, the hook deletes and the
# resource kills (which fall into its `default:` abort) end the job.
_OPENPBS_EXEC: dict[int, ExecCode] = {
    -1: _code("JOB_EXEC_FAIL1", "the job could not be started, before its files were set up"),
    -2: _code("JOB_EXEC_FAIL2", "the job could not be started, after its files were set up"),
    -3: _code("JOB_EXEC_RETRY", "the job could not be started; PBS retries it", requeued=True),
    -4: _code("JOB_EXEC_INITABT", "the job was aborted when its MoM restarted; PBS reruns it if rerunnable",
              requeued=True),
    -5: _code("JOB_EXEC_INITRST", "the job was aborted when its MoM restarted; requeued to restart from its "
              "checkpoint", requeued=True),
    -6: _code("JOB_EXEC_INITRMG", "the job was aborted when its MoM restarted; requeued with its migratable "
              "checkpoint", requeued=True),
    -7: _code("JOB_EXEC_BADRESRT", "the restart from a checkpoint failed; PBS reruns the job", requeued=True),
    -10: _code("JOB_EXEC_FAILUID", "invalid user or group id for the job on the execution host; PBS retries it",
               requeued=True),
    -11: _code("JOB_EXEC_RERUN", "the job is rerun (qrerun, or its node failed)", requeued=True),
    -12: _code("JOB_EXEC_CHKP", "the job was checkpointed and stopped", requeued=True),
    -13: _code("JOB_EXEC_FAIL_PASSWORD", "bad password; PBS holds the job", requeued=True),
    -14: _code("JOB_EXEC_RERUN_SIS_FAIL", "a sister MoM failed; the job is rerun", requeued=True),
    -15: _code("JOB_EXEC_QUERST", "requeued to restart from its checkpoint", requeued=True),
    -16: _code("JOB_EXEC_FAILHOOK_RERUN", "a hook rejected the start; PBS retries the job later", requeued=True),
    -17: _code("JOB_EXEC_FAILHOOK_DELETE", "a hook rejected the start and deleted the job"),
    -18: _code("JOB_EXEC_HOOK_RERUN", "a hook requeued the job", requeued=True),
    -19: _code("JOB_EXEC_HOOK_DELETE", "a hook deleted the job"),
    -20: _code("JOB_EXEC_RERUN_MS_FAIL", "the connection to the job's primary MoM failed; the job is rerun",
               requeued=True),
    -21: _code("JOB_EXEC_FAIL_SECURITY", "possible security breach of the job's tmpdir; PBS holds the job",
               requeued=True),
    -22: _code("JOB_EXEC_HOOKERROR", "a hook failed or timed out; PBS retries the job", requeued=True),
    -23: _code("JOB_EXEC_FAIL_KRB5", "no Kerberos credentials were supplied"),
    # Resource kills. There is no reason for "too many CPUs": EXIT_CODE, with PBS's words.
    -24: _code("JOB_EXEC_KILL_NCPUS_BURST", "PBS killed the job: it used more CPUs than it asked for (burst)",
               Reason.EXIT_CODE),
    -25: _code("JOB_EXEC_KILL_NCPUS_SUM", "PBS killed the job: it used more CPUs than it asked for (sum)",
               Reason.EXIT_CODE),
    -26: _code("JOB_EXEC_KILL_VMEM", "PBS killed the job: it exceeded its vmem limit", Reason.OUT_OF_MEMORY),
    -27: _code("JOB_EXEC_KILL_MEM", "PBS killed the job: it exceeded its mem limit", Reason.OUT_OF_MEMORY),
    -28: _code("JOB_EXEC_KILL_CPUT", "PBS killed the job: it exceeded its CPU time limit (cput)", Reason.TIMEOUT),
    -29: _code("JOB_EXEC_KILL_WALLTIME", "PBS killed the job: it exceeded its walltime", Reason.TIMEOUT),
    -30: _code("JOB_EXEC_JOINJOB", "a sister MoM could not join the job"),
}

# Torque's own table (its job.h / "Job exit status" in the Torque 6 admin guide): the same first
# seven, then its own meanings, e.g. -11 is a walltime kill there, not a rerun.
_TORQUE_EXEC: dict[int, ExecCode] = {
    **{k: v for k, v in _OPENPBS_EXEC.items() if -7 <= k <= -1},
    -8: _code("JOB_EXEC_CMDFAIL", "the job's command could not be executed"),
    -9: _code("JOB_EXEC_STDOUTFAIL", "the job's output files could not be created"),
    -10: _code("JOB_EXEC_OVERLIMIT_MEM", "Torque killed the job: it exceeded its memory limit",
               Reason.OUT_OF_MEMORY),
    -11: _code("JOB_EXEC_OVERLIMIT_WT", "Torque killed the job: it exceeded its walltime", Reason.TIMEOUT),
    -12: _code("JOB_EXEC_OVERLIMIT_CPUT", "Torque killed the job: it exceeded its CPU time limit", Reason.TIMEOUT),
    -13: _code("JOB_EXEC_RETRY_CGROUP", "the job's cgroup could not be set up; Torque retries it", requeued=True),
    -14: _code("JOB_EXEC_RETRY_PROLOGUE", "the prologue failed; Torque retries the job", requeued=True),
}


def exec_code(dialect: Dialect, status: int) -> ExecCode:
    """The meaning of a negative Exit_status in this dialect (a pure table; unknown codes are a
    failure to run the job, never a success)."""
    if status >= 0:
        raise ValueError(f"exec_code is for negative exit statuses, not {status}")
    table = _TORQUE_EXEC if dialect == "torque" else _OPENPBS_EXEC
    return table.get(status) or _code("JOB_EXEC_?", "PBS could not run the job (a code this version of fem-hpc "
                                      "does not know)")


def describe_exec_code(dialect: Dialect, status: int) -> str:
    code = exec_code(dialect, status)
    return f"Exit_status {status} ({code.name}): {code.meaning}"


_SECONDS_RE = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+)$")


def _seconds(value: Any) -> int | None:
    """PBS durations: `HH:MM:SS`, `MM:SS` or seconds."""
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    m = _SECONDS_RE.fullmatch(value.strip())
    if not m:
        return None
    parts = [int(p) for p in m.groups() if p is not None]
    total = 0
    for p in parts:
        total = total * 60 + p
    return total


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value.strip())
    return None


def _get(job: Mapping[str, Any], group: str, key: str) -> Any:
    """`Resource_List.walltime` from JSON (nested) or Torque text (flat, dotted)."""
    nested = job.get(group)
    if isinstance(nested, Mapping) and key in nested:
        return nested[key]
    return job.get(f"{group}.{key}")


JOB_SUBSTATE_TERMINATED = 91  # OpenPBS: a history job that was deleted (qdel), queued or running
_DELETED_BY_RE = re.compile(r"terminated by (\S+)", re.IGNORECASE)


def deleted_message(comment: str | None, exit_status: int | None) -> str:
    """The message of a job deleted in PBS outside fem-hpc: who did it, as far as PBS says."""
    who = _DELETED_BY_RE.search(comment or "")
    text = f"deleted in PBS by {who.group(1)}" if who else "deleted in PBS (qdel; PBS does not say by whom)"
    if exit_status is not None:
        text += f", Exit_status {exit_status}"
    return text + (f"; comment: {comment}" if comment else "")


def _final_status(job_id: str, job: Mapping[str, Any], name: str | None, dialect: Dialect) -> NativeStatus:
    """A finished job (OpenPBS F/X, Torque C), decided by its substate and exit status.

    Substate 91 is a deleted job, whatever its exit status (a qdel of a running job also has 271).
    0..127 is the job script's own exit; 128..255 usually the shell's report of a child killed by
    signal (status - 128); >= 256 a job killed by PBS with signal (status - 256), e.g. 271 =
    SIGTERM; < 0 a JOB_EXEC_* code (exec_code()). No exit status at all (Debian's Torque wrapper,
    or a job deleted before it ran): the exit-code marker decides.
    """
    comment = job.get("comment")
    comment = comment if isinstance(comment, str) and comment else None
    raw = job.get("Exit_status", job.get("exit_status"))
    status = _int(raw)

    def out(
        state: State, reason: Reason | None = None, code: int | None = None, message: str | None = None
    ) -> NativeStatus:
        return NativeStatus(
            native_id=job_id, state=state, reason=reason, exit_code=code, message=message, job_name=name
        )

    if dialect == "pbspro" and _int(job.get("substate")) == JOB_SUBSTATE_TERMINATED:
        return out(State.CANCELLED, message=deleted_message(comment, status))
    if status is None:
        if comment and "delet" in comment.lower():
            return out(State.CANCELLED, message=comment)
        return out(State.COMPLETED, message=comment)
    if status == 0:
        return out(State.COMPLETED, code=0)
    if status < 0:
        code = exec_code(dialect, status)
        text = describe_exec_code(dialect, status)
        if code.requeued:
            text += "; PBS lists the job as finished, so it was not requeued"
        return out(State.FAILED, code.reason, message=text + (f"; {comment}" if comment else ""))
    if status < 128:
        return out(State.FAILED, Reason.EXIT_CODE, code=status, message=comment)
    signal = status - 256 if status >= 256 else status - 128
    code_ = 128 + signal
    text = f"Exit_status {status} (signal {signal})" + (f"; {comment}" if comment else "")
    lowered = (comment or "").lower()
    used = _seconds(_get(job, "resources_used", "walltime"))
    limit = _seconds(_get(job, "Resource_List", "walltime"))
    if "walltime" in lowered or (used is not None and limit and used >= limit):
        return out(State.FAILED, Reason.TIMEOUT, code=code_, message=text)
    if "mem" in lowered and "exceed" in lowered:
        return out(State.FAILED, Reason.OUT_OF_MEMORY, code=code_, message=text)
    return out(State.FAILED, Reason.EXIT_CODE, code=code_, message=text)


_PBSPRO_FINAL = frozenset({"F", "X"})
_TORQUE_FINAL = frozenset({"C"})


def _requeue_note(job: Mapping[str, Any], dialect: Dialect) -> str | None:
    """A job back in the queue after PBS requeued it carries the Exit_status of the run that failed."""
    status = _int(job.get("Exit_status", job.get("exit_status")))
    if status is None or status >= 0:
        return None
    if exec_code(dialect, status).requeued:
        return f"requeued by PBS after {describe_exec_code(dialect, status)}"
    return None


def _job_status(job_id: str, job: Mapping[str, Any], dialect: Dialect) -> NativeStatus:
    final_states = _TORQUE_FINAL if dialect == "torque" else _PBSPRO_FINAL
    state = str(job.get("job_state", "")).strip().upper()
    name = job.get("Job_Name")
    name = name if isinstance(name, str) and name else None
    comment = job.get("comment")
    comment = comment if isinstance(comment, str) and comment else None
    if state in final_states:
        return _final_status(job_id, job, name, dialect)
    requeued = _requeue_note(job, dialect)
    if state in ("Q", "H", "W", "T", "M"):
        label = {"Q": None, "H": "held", "W": "waiting", "T": "in transit", "M": "moved"}[state]
        message = "; ".join(p for p in (label, requeued, comment) if p) or None
        return NativeStatus(native_id=job_id, state=State.SUBMITTED, message=message, job_name=name)
    if state in ("R", "E", "B"):
        return NativeStatus(native_id=job_id, state=State.RUNNING, message=requeued, job_name=name)
    if state in ("S", "U"):
        return NativeStatus(native_id=job_id, state=State.RUNNING, message="suspended", job_name=name)
    return NativeStatus(
        native_id=job_id,
        state=State.RUNNING,
        message=f"unknown PBS job_state {state or '(none)'}",
        job_name=name,
    )


def parse_qstat_json(text: str) -> dict[str, NativeStatus]:
    """OpenPBS `qstat -f -F json -x` -> {job id: status}. Raises ValueError only when the whole
    text is not JSON (a failed poll); one malformed job entry is skipped."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # some OpenPBS versions print raw control characters inside strings
            data = json.loads(text, strict=False)
        except json.JSONDecodeError as exc:
            raise ValueError(f"qstat -F json printed invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("qstat -F json did not print a JSON object")
    jobs = data.get("Jobs") or {}
    if not isinstance(jobs, dict):
        raise ValueError("qstat -F json: 'Jobs' is not an object")
    out: dict[str, NativeStatus] = {}
    for job_id, job in jobs.items():
        if not isinstance(job, dict) or not isinstance(job_id, str):
            continue
        out[job_id] = _job_status(job_id, job, "pbspro")
    return out


_JOB_ID_LINE_RE = re.compile(r"^Job Id:\s*(\S+)\s*$")
_ATTR_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*) = ?(.*)$")


def parse_torque_blocks(text: str) -> dict[str, dict[str, str]]:
    """Torque `qstat -f` text -> {job id: {attribute: value}}, with dotted keys
    (`Resource_List.walltime`). Attribute lines are indented (4 spaces in Torque, a tab in Debian's
    wrapper); in Torque and OpenPBS a long value continues on lines indented by a tab, which are
    joined after the tab as they are (OpenPBS breaks a comment before a space: "terminated\n\t by")."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key: str | None = None
    tab_attrs = False  # this block's attribute lines are tab-indented (Debian's wrapper)
    first_attr = True
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _JOB_ID_LINE_RE.match(line)
        if m:
            current = blocks.setdefault(m.group(1), {})
            last_key, first_attr, tab_attrs = None, True, False
            continue
        if current is None or not line[0].isspace():
            continue  # outside a job block (a header, an error line): ignored
        body = line.strip()
        attr = _ATTR_RE.match(line.lstrip())  # the value keeps a trailing space (see below)
        starts_with_tab = line.startswith("\t")
        if attr and first_attr:
            tab_attrs = starts_with_tab
            first_attr = False
        if attr and (not starts_with_tab or tab_attrs):
            last_key = attr.group(1)
            current[last_key] = attr.group(2).lstrip()
        elif last_key is not None:  # a continuation line: after its tab, the text goes on verbatim
            current[last_key] += line[1:] if starts_with_tab else body
    # Only now: a line may end in the space before which the value was wrapped ("A: 2 \n\tT: 2)").
    return {job_id: {k: v.strip() for k, v in attrs.items()} for job_id, attrs in blocks.items()}


def parse_qstat_torque(text: str) -> dict[str, NativeStatus]:
    """Torque `qstat -f` text -> {job id: status}. `C` with no exit_status (Debian's wrapper)
    is COMPLETED with exit_code None: the marker decides."""
    return {
        job_id: _job_status(job_id, attrs, "torque")
        for job_id, attrs in parse_torque_blocks(text).items()
    }


def parse_qstat(dialect: Dialect, text: str) -> dict[str, NativeStatus]:
    if dialect == "pbspro":
        return parse_qstat_json(text)
    if dialect == "torque":
        return parse_qstat_torque(text)
    raise ValueError(f"unknown PBS dialect {dialect!r} (expected one of {DIALECTS})")


# --- job script directives ---------------------------------------------------------------------
#
# On Debian's wrapper, sbatch tokenizes `#PBS` lines like `#SBATCH` ones (whitespace, quotes,
# backslash, '#' comments, %-patterns in -o/-e); real PBS reads them with its own option parser.
# Values are restricted to characters that are plain in all of them instead of being quoted.

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,235}$")  # PBS: starts with a letter, <= 236

# GPUs in a select chunk. `ngpus` is not built into OpenPBS: a site defines its GPU resource
# (`ngpus` by convention, `gpus`, `nvidia_gpus`, ...) or asks for a fragment such as
# `ngpus={gpus}:gpu_model=a100`.
DEFAULT_GPU_RESOURCE = "ngpus"
_RESOURCE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CHUNK_ITEM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}=[A-Za-z0-9_.+-]{1,64}")


def gpu_select(gpu_resource: str, gpus: int) -> str:
    """The select-chunk part that asks for `gpus` GPUs: `ngpus=2` for a resource name, or the
    site's fragment with `{gpus}` replaced (`ngpus={gpus}:gpu_model=a100` -> `ngpus=2:gpu_model=a100`)."""
    reject_control("gpu_resource", gpu_resource)
    if _RESOURCE_NAME_RE.fullmatch(gpu_resource):
        return f"{gpu_resource}={int(gpus)}"
    if gpu_resource.count("{gpus}") != 1:
        raise ValueError(f"gpu_resource {gpu_resource!r} is neither a resource name (e.g. ngpus) nor a select "
                         "fragment with one {gpus} in it (e.g. ngpus={gpus}:gpu_model=a100)")
    fragment = gpu_resource.replace("{gpus}", str(int(gpus)))
    if not all(_CHUNK_ITEM_RE.fullmatch(item) for item in fragment.split(":")):
        raise ValueError(f"gpu_resource {gpu_resource!r} is not a select fragment of name=value items joined "
                         "by ':' (letters, digits, _ . + - only)")
    return fragment


_UNKNOWN_RESOURCE_RE = re.compile(
    r"(?:unknown|undefined) resource:?[ \t]*(?:Resource_List\.)?([A-Za-z_][A-Za-z0-9_]*)?", re.IGNORECASE)


def qsub_error_hint(stderr: str, *, gpus: int, gpu_resource: str, executor: str) -> str | None:
    """For a qsub refusal naming an unknown resource ("qsub: Unknown resource Resource_List.ngpus"):
    which setting of `executors.<executor>` asked for it."""
    m = _UNKNOWN_RESOURCE_RE.search(stderr or "")
    if not m:
        return None
    named = m.group(1)
    gpu_names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?==)", gpu_select(gpu_resource, 1))) if gpus else set()
    if gpus and (named is None or named in gpu_names):
        return (f"the task asks for {gpus} GPU(s) and this PBS server does not define the resource fem-hpc "
                f"asked for ({gpu_resource!r}): set executors.{executor}.gpu_resource to the GPU resource this "
                "server defines (a name such as ngpus, or a select fragment such as 'ngpus={gpus}:gpu_model=a100'; "
                "`qmgr -c 'list resource'` lists them)")
    return (f"this PBS server does not define the resource {named or '(unnamed)'}: check "
            f"executors.{executor}.extra_directives against the resources it defines (`qmgr -c 'list resource'`)")


def _path(what: str, value: str | os.PathLike[str]) -> str:
    return check_path(what, value, "it goes into a scheduler directive and, on Debian's qsub, through a shell")


def directives(
    task: Task,
    workdir: str | os.PathLike[str],
    dialect: Dialect,
    *,
    queue: str | None = None,
    account: str | None = None,
    extra_directives: Sequence[str] = (),
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
) -> list[str]:
    """The `#PBS` lines for one task, in order.

    pbspro: `-l select=<nodes>:ncpus=<cpus>[:mem=<MiB>mb][:<gpu_resource>=N]` (per chunk = per
    node; `gpu_resource` is the site's GPU resource name or select fragment, see gpu_select());
    torque: `-l nodes=<nodes>:ppn=<cpus>[:gpus=N]` and `-l mem=<nodes x MiB>mb` (a job total in
    Torque). Both: `-l walltime=HH:MM:SS` (hours may exceed 24), `-S /bin/sh` (PBS runs a script
    with the user's login shell otherwise), `-q`, `-A`, `-o`/`-e` into the task's .fem dir.
    `queue`/`account` are the site defaults; the task's own win. `extra_directives` are trusted
    site strings (`-l place=scatter` or a whole `#PBS ...` line), added last.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown PBS dialect {dialect!r} (expected one of {DIALECTS})")
    wd = _path("work dir", workdir)
    fem = f"{wd.rstrip('/')}/{FEM_DIR}"
    lines = [
        f"-N {check_plain('job name', job_name(task.id), _NAME_RE)}",
        "-S /bin/sh",
        f"-o {fem}/scheduler.out",
        f"-e {fem}/scheduler.err",
    ]
    q = task.queue or queue
    if q is not None:
        lines.append(f"-q {check_plain('queue', q, SAFE_WORD_RE)}")
    acct = task.account or account
    if acct is not None:
        lines.append(f"-A {check_plain('account', acct, SAFE_WORD_RE)}")
    res = task.resources
    nodes = int(res.nodes or 1)
    cpus = int(res.cpus or 1)
    if res.memory is not None:
        reject_control("memory", res.memory)
    mem = res.memory_mib
    gpus = int(res.gpus or 0)
    if dialect == "pbspro":
        select = f"select={nodes}:ncpus={cpus}"
        if mem is not None:
            select += f":mem={mem}mb"
        if gpus:
            select += f":{gpu_select(gpu_resource, gpus)}"
        lines.append(f"-l {select}")
    else:
        spec = f"nodes={nodes}:ppn={cpus}"
        if gpus:
            spec += f":gpus={gpus}"
        lines.append(f"-l {spec}")
        if mem is not None:  # Torque's mem is for the whole job; the task's memory is per node
            lines.append(f"-l mem={mem * nodes}mb")
    if res.walltime is not None:
        reject_control("walltime", res.walltime)
        seconds = res.walltime_seconds
        assert seconds is not None
        lines.append(f"-l walltime={format_walltime(seconds)}")
    return directive_lines("#PBS", lines, extra_directives)
