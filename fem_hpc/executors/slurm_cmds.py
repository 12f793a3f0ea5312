"""Slurm as a handful of pure functions: the argv of each command, and parsers of its output.

Nothing here runs a process or sleeps; the executor runs the argv (locally or over SSH) and the
shared tracker decides when. Parsers never raise on one bad line: a line that does not parse is
skipped (and reported to the caller when it passes a ``bad_lines`` list), so one odd job can not
turn a whole poll into a failure.

Checked against Slurm 22.05 (Debian's slurm-wlm): squeue(1), sacct(1), sbatch(1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ..layout import FEM_DIR, job_name
from ..model import Reason, State, Task
from .base import NativeStatus
from .directive_checks import SAFE_WORD_RE, check_path, check_plain, directive_lines, reject_control

# --- submit ------------------------------------------------------------------------------------


def sbatch_argv(script_path: str) -> list[str]:
    """`sbatch --parsable SCRIPT`: prints `<jobid>` or `<jobid>;<cluster>`."""
    return ["sbatch", "--parsable", script_path]


# A job id as Slurm prints it: 123, an array element 123_4 (or a pending array 123_[1-9%2]),
# a heterogeneous component 123+1. Always starts with a digit, so it can never be read as an option.
_JOB_ID_RE = re.compile(r"^[0-9]+(?:_(?:[0-9]+|\[[0-9,%\-]+\]))?(?:\+[0-9]+)?$")
_PARSABLE_RE = re.compile(r"^([0-9]+)(?:;([A-Za-z0-9_.-]+))?$")


def parse_sbatch(stdout: str) -> str:
    """The job id from `sbatch --parsable` output (`123` or `123;cluster`).

    sbatch may print warnings before the id (e.g. about ignored options); the id is the last
    non-empty line. Anything else raises ValueError quoting what was printed.
    """
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if lines:
        m = _PARSABLE_RE.fullmatch(lines[-1])
        if m:
            return m.group(1)
    shown = stdout.strip()[:200] or "(nothing)"
    raise ValueError(f"sbatch did not print a job id (expected '<id>' or '<id>;<cluster>'), got: {shown!r}")


def _check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"{job_id!r} is not a Slurm job id")
    return job_id


# --- status: squeue ----------------------------------------------------------------------------

# Fields: job id (%i: "123", "123_4" for array elements), compact state (%t), long state (%T),
# reason (%r, "None" when there is none), job name (%j). No widths, so nothing is padded or cut.
# The job name is LAST: a '|' inside a name stays in the name (the line is split at most 4 times).
# squeue has no exit code; the marker (then sacct) decides how a job ended.
SQUEUE_FORMAT = "%i|%t|%T|%r|%j"
_SQUEUE_FIELDS = 5


def squeue_argv(user: str | None = None) -> list[str]:
    """ONE squeue for every job of this user, in all states (finished jobs stay until MinJobAge).

    Filtering by `-j ids` is avoided on purpose: squeue exits 1 ("Invalid job id specified") when
    the ids asked for are no longer known (checked on 22.05), so a finished job would look like a
    failed poll. The caller keeps the ids it tracks from the result.
    """
    argv = ["squeue", "--noheader", "-t", "all", "-o", SQUEUE_FORMAT]
    if user is None:
        argv.append("--me")
    else:
        check_plain("user", user, _USER_RE)
        argv += ["-u", user]
    return argv


def find_by_name_argv(job_name: str) -> list[str]:
    """squeue for the jobs carrying one name (in all states), in the SQUEUE_FORMAT: parse with
    parse_squeue. Used to re-adopt a job submitted before a restart."""
    check_plain("job name", job_name, _NAME_RE)
    return ["squeue", "--noheader", "-t", "all", f"--name={job_name}", "-o", SQUEUE_FORMAT]


# compact state -> (state, reason); None reason for non-failures.
_TERMINAL: dict[str, tuple[State, Reason | None]] = {
    "CD": (State.COMPLETED, None),
    "F": (State.FAILED, Reason.EXIT_CODE),
    "TO": (State.FAILED, Reason.TIMEOUT),
    "DL": (State.FAILED, Reason.TIMEOUT),
    "OOM": (State.FAILED, Reason.OUT_OF_MEMORY),
    "NF": (State.FAILED, Reason.NODE_FAIL),
    "BF": (State.FAILED, Reason.NODE_FAIL),
    "CA": (State.CANCELLED, None),
}
# Waiting for (another) allocation: pending, held, requeued, preempted (DESIGN: never terminal).
_WAITING = {"PD", "CF", "PR", "RQ", "RF", "RH", "RD", "SE"}
# Holding an allocation (or about to change it): running, completing, suspended, stopped, ...
_HOLDING = {"R", "CG", "S", "ST", "SI", "SO", "RS", "RV"}


def _squeue_status(job_id: str, compact: str, long: str, reason: str, name: str | None) -> NativeStatus:
    reason_text = reason if reason and reason != "None" else None
    long = long or compact
    if compact in _TERMINAL:
        state, why = _TERMINAL[compact]
        message = long if reason_text is None else f"{long} ({reason_text})"
        if compact == "CD":
            message = None
        return NativeStatus(native_id=job_id, state=state, reason=why, message=message, job_name=name)
    if compact == "PD":  # the message is the pending reason: Priority, Resources, BeginTime, ...
        return NativeStatus(native_id=job_id, state=State.SUBMITTED, message=reason_text, job_name=name)
    if compact in _WAITING:
        message = long if reason_text is None else f"{long} ({reason_text})"
        return NativeStatus(native_id=job_id, state=State.SUBMITTED, message=message, job_name=name)
    if compact == "R":
        return NativeStatus(native_id=job_id, state=State.RUNNING, job_name=name)
    if compact in _HOLDING:
        message = long if reason_text is None else f"{long} ({reason_text})"
        return NativeStatus(native_id=job_id, state=State.RUNNING, message=message, job_name=name)
    # A state this code does not know (a newer Slurm): keep tracking it, never call it final.
    return NativeStatus(
        native_id=job_id,
        state=State.RUNNING,
        message=f"unknown Slurm state {compact} ({long})",
        job_name=name,
    )


def parse_squeue(stdout: str, bad_lines: list[str] | None = None) -> dict[str, NativeStatus]:
    """Output of squeue_argv()/find_by_name_argv() -> {job id: status}.

    A line that does not parse is skipped and, if `bad_lines` is given, appended to it.
    """
    out: dict[str, NativeStatus] = {}
    for raw in stdout.splitlines():
        if not raw.strip():
            continue
        parts = raw.split("|", _SQUEUE_FIELDS - 1)
        if len(parts) != _SQUEUE_FIELDS:
            _skip(bad_lines, raw)
            continue
        job_id, compact, long, reason, name = parts
        job_id, compact, long, reason = job_id.strip(), compact.strip(), long.strip(), reason.strip()
        if not _JOB_ID_RE.fullmatch(job_id) or not re.fullmatch(r"[A-Z]{1,4}", compact):
            _skip(bad_lines, raw)
            continue
        out[job_id] = _squeue_status(job_id, compact, long, reason, name or None)
    return out


def _skip(bad_lines: list[str] | None, line: str) -> None:
    if bad_lines is not None:
        bad_lines.append(line)


# --- finished jobs: sacct ----------------------------------------------------------------------

# JobName is asked for LAST for the same reason as in squeue: with -P the separator is '|', and a
# name may contain one.
SACCT_FIELDS = "JobID,State,ExitCode,JobName"


def sacct_argv(job_ids: list[str]) -> list[str]:
    """`sacct -n -P -X -j IDS -o ...`: one line per job allocation (no steps), '|'-separated.
    With -j and no -S, sacct searches from the epoch, so old jobs are found too. sacct gets slow
    with hundreds of ids: ask only about jobs that left the queue without a marker, in batches."""
    if not job_ids:
        raise ValueError("sacct_argv needs at least one job id")
    ids = ",".join(_check_job_id(j) for j in job_ids)
    return ["sacct", "-n", "-P", "-X", "-j", ids, "-o", SACCT_FIELDS]


_SACCT_STATES: dict[str, tuple[State, Reason | None]] = {
    "COMPLETED": (State.COMPLETED, None),
    "FAILED": (State.FAILED, Reason.EXIT_CODE),
    "TIMEOUT": (State.FAILED, Reason.TIMEOUT),
    "DEADLINE": (State.FAILED, Reason.TIMEOUT),
    "OUT_OF_MEMORY": (State.FAILED, Reason.OUT_OF_MEMORY),
    "NODE_FAIL": (State.FAILED, Reason.NODE_FAIL),
    "BOOT_FAIL": (State.FAILED, Reason.NODE_FAIL),
    "CANCELLED": (State.CANCELLED, None),
}
_SACCT_WAITING = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "RESV_DEL_HOLD",
    "CONFIGURING",
}
_EXIT_CODE_RE = re.compile(r"^([0-9]+):([0-9]+)$")


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """Slurm's `exit:signal` (ExitCode column) -> (exit code, signal); signal 0 -> None.
    A job killed by signal N gets the shell's exit code 128+N."""
    m = _EXIT_CODE_RE.fullmatch(text.strip())
    if not m:
        return None, None
    code, sig = int(m.group(1)), int(m.group(2))
    if sig:
        return (code if code else 128 + sig), sig
    return code, None


def parse_sacct(stdout: str, bad_lines: list[str] | None = None) -> dict[str, NativeStatus]:
    """Output of sacct_argv() -> {job id: status}. States like `CANCELLED by 0` are read by their
    first word. COMPLETED carries the exit code sacct recorded."""
    out: dict[str, NativeStatus] = {}
    for raw in stdout.splitlines():
        if not raw.strip():
            continue
        parts = raw.split("|", 3)
        if len(parts) != 4:
            _skip(bad_lines, raw)
            continue
        job_id, state_text, exit_text, name = parts[0].strip(), parts[1].strip(), parts[2].strip(), parts[3]
        if not _JOB_ID_RE.fullmatch(job_id) or not state_text:
            _skip(bad_lines, raw)
            continue
        word = state_text.split()[0].upper()
        exit_code, sig = parse_exit_code(exit_text)
        detail = state_text if sig is None else f"{state_text}, signal {sig}"
        if word in _SACCT_STATES:
            state, why = _SACCT_STATES[word]
            if state is not State.COMPLETED and exit_code == 0:
                exit_code = None  # e.g. TIMEOUT/CANCELLED with 0:0: no exit code to speak of
            if state is State.COMPLETED and exit_code not in (None, 0):
                # Defensive: accounting said COMPLETED but recorded a non-zero code.
                state, why = State.FAILED, Reason.EXIT_CODE
            status = NativeStatus(
                native_id=job_id,
                state=state,
                reason=why,
                exit_code=exit_code,
                message=None if state is State.COMPLETED else detail,
                job_name=name or None,
            )
        elif word in _SACCT_WAITING:
            status = NativeStatus(native_id=job_id, state=State.SUBMITTED, message=state_text, job_name=name or None)
        elif word == "RUNNING":
            status = NativeStatus(native_id=job_id, state=State.RUNNING, job_name=name or None)
        else:  # SUSPENDED, RESIZING, REVOKED, STOPPED, ... or unknown: not final
            status = NativeStatus(native_id=job_id, state=State.RUNNING, message=state_text, job_name=name or None)
        out[job_id] = status
    return out


# --- cancel ------------------------------------------------------------------------------------


def scancel_argv(job_id: str) -> list[str]:
    """`scancel ID`: Slurm sends SIGTERM to the job (the wrapper records it), then SIGKILL after
    KillWait."""
    return ["scancel", _check_job_id(job_id)]


# --- job script directives ---------------------------------------------------------------------
#
# sbatch reads `#SBATCH` lines itself, without a shell (sbatch(1): until the first line that is
# neither a comment nor blank). It splits them on whitespace, groups with ' or ", treats a
# backslash as an escape and an unquoted '#' as the start of a comment; --output/--error then
# expand %-patterns (%j, %x, ...). Instead of quoting for that private grammar, every value put in
# a directive is restricted to characters that mean nothing to it.

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}$")


def format_slurm_time(seconds: int) -> str:
    """Seconds -> `HH:MM:SS`, or `D-HH:MM:SS` from one day on (sbatch --time)."""
    if seconds <= 0:
        raise ValueError("walltime must be positive")
    days, rest = divmod(seconds, 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms


def _path(what: str, value: str | os.PathLike[str]) -> str:
    return check_path(what, value,
                      "it goes into a scheduler directive, where spaces, quotes, '#', '\\' and '%' mean something")


def directives(
    task: Task,
    workdir: str | os.PathLike[str],
    *,
    partition: str | None = None,
    account: str | None = None,
    extra_directives: Sequence[str] = (),
) -> list[str]:
    """The `#SBATCH` lines for one task, in order.

    `partition`/`account` are the site defaults; the task's `queue`/`account` win. Resources come
    from `task.resources` (site defaults and caps are applied before this is called).
    `extra_directives` are trusted site strings (`--qos=normal` or a whole `#SBATCH ...` line);
    they are added last, so they can override what is computed here.
    """
    wd = _path("work dir", workdir)
    fem = f"{wd.rstrip('/')}/{FEM_DIR}"
    name = check_plain("job name", job_name(task.id), _NAME_RE)
    lines = [
        f"--job-name={name}",
        f"--chdir={wd}",
        f"--output={fem}/scheduler.out",
        f"--error={fem}/scheduler.err",
    ]
    part = task.queue or partition
    if part is not None:
        lines.append(f"--partition={check_plain('partition', part, SAFE_WORD_RE)}")
    acct = task.account or account
    if acct is not None:
        lines.append(f"--account={check_plain('account', acct, SAFE_WORD_RE)}")
    res = task.resources
    if res.nodes is not None:
        lines.append(f"--nodes={int(res.nodes)}")
    if res.cpus is not None:
        lines.append(f"--cpus-per-task={int(res.cpus)}")
    if res.memory is not None:
        reject_control("memory", res.memory)
        lines.append(f"--mem={res.memory_mib}M")
    if res.gpus:
        lines.append(f"--gres=gpu:{int(res.gpus)}")
    if res.walltime is not None:
        reject_control("walltime", res.walltime)
        seconds = res.walltime_seconds
        assert seconds is not None
        lines.append(f"--time={format_slurm_time(seconds)}")
    return directive_lines("#SBATCH", lines, extra_directives)
