"""OpenPBS/PBS Pro and Torque `qstat` output parsed into the scheduler's word on each job: the
JSON of `qstat -f -F json [-x]` and Torque's `qstat -f` text, the JOB_EXEC_* meaning of a
negative Exit_status, and who deleted a job. Pure functions, tested on recorded real outputs
(tests/fixtures/openpbs-23.06/)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from ..model import Reason, State
from .base import NativeStatus

Dialect = Literal["pbspro", "torque"]
DIALECTS: tuple[str, ...] = ("pbspro", "torque")


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
    # What a live job says that its end may need: whether PBS put it back after a run (a marker
    # of that run is stale), and the walltime PBS enforces (the task's, or the queue's default),
    # which tells a walltime kill from a qdel when the server keeps no job history.
    live = {"job_name": name, "requeued": requeued is not None,
            "walltime_limit": _seconds(_get(job, "Resource_List", "walltime")) or None}
    if state in ("Q", "H", "W", "T", "M"):
        label = {"Q": None, "H": "held", "W": "waiting", "T": "in transit", "M": "moved"}[state]
        message = "; ".join(p for p in (label, requeued, comment) if p) or None
        return NativeStatus(native_id=job_id, state=State.SUBMITTED, message=message, **live)
    if state in ("R", "E", "B"):
        return NativeStatus(native_id=job_id, state=State.RUNNING, message=requeued, **live)
    if state in ("S", "U"):
        return NativeStatus(native_id=job_id, state=State.RUNNING, message="suspended", **live)
    return NativeStatus(native_id=job_id, state=State.RUNNING, message=f"unknown PBS job_state {state or '(none)'}",
                        **live)


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
