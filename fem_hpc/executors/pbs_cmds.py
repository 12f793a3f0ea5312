"""PBS (OpenPBS / PBS Pro and Torque) as a handful of pure functions: argv and output parsers.

Two dialects:

- ``pbspro``: OpenPBS / PBS Pro. Status is `qstat -f -F json -x IDS` (-x keeps finished jobs while
  the server keeps job history), with `Exit_status` in the JSON.
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
from typing import Any, Literal

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


def qstat_argv(dialect: Dialect, job_ids: list[str]) -> list[str]:
    """ONE qstat for all tracked jobs: pbspro `qstat -f -F json -x IDS`, torque `qstat -f IDS`.
    Ids the server no longer knows are reported on stderr (and make qstat exit non-zero) while the
    others are still printed: the caller parses stdout whatever the exit status."""
    if not job_ids:
        raise ValueError("qstat_argv needs at least one job id")
    ids = [_check_job_id(j) for j in job_ids]
    if dialect == "pbspro":
        return ["qstat", "-f", "-F", "json", "-x", *ids]
    if dialect == "torque":
        return ["qstat", "-f", *ids]
    raise ValueError(f"unknown PBS dialect {dialect!r} (expected one of {DIALECTS})")


# PBS / Torque exit_status < 0: the server or MoM could not run the job (JOB_EXEC_* codes).
_EXEC_FAILURES = {
    -1: "job exec failed before files, no retry",
    -2: "job exec failed after files, no retry",
    -3: "job exec failed, retry",
    -4: "job aborted on MoM initialization",
    -10: "invalid UID/GID for the job",
}

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


def _final_status(job_id: str, job: Mapping[str, Any], name: str | None) -> NativeStatus:
    """A finished job (OpenPBS F/X, Torque C), decided by its exit status.

    0..127 is the job script's own exit; 128..255 usually the shell's report of a child killed by
    signal (status - 128); >= 256 a job killed by PBS with signal (status - 256), e.g. 271 =
    SIGTERM after a walltime kill; < 0 PBS could not run the job. No exit status at all (Debian's
    Torque wrapper, or a job deleted before it ran): the exit-code marker decides.
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

    if status is None:
        if comment and "delet" in comment.lower():
            return out(State.CANCELLED, message=comment)
        return out(State.COMPLETED, message=comment)
    if status == 0:
        return out(State.COMPLETED, code=0)
    if status < 0:
        what = _EXEC_FAILURES.get(status, "PBS could not run the job")
        text = f"Exit_status {status}: {what}" + (f"; {comment}" if comment else "")
        return out(State.FAILED, Reason.NODE_FAIL, message=text)
    if status < 128:
        return out(State.FAILED, Reason.EXIT_CODE, code=status, message=comment)
    signal = status - 256 if status >= 256 else status - 128
    code = 128 + signal
    text = f"Exit_status {status} (signal {signal})" + (f"; {comment}" if comment else "")
    lowered = (comment or "").lower()
    used = _seconds(_get(job, "resources_used", "walltime"))
    limit = _seconds(_get(job, "Resource_List", "walltime"))
    if "walltime" in lowered or (used is not None and limit and used >= limit):
        return out(State.FAILED, Reason.TIMEOUT, code=code, message=text)
    if "mem" in lowered and "exceed" in lowered:
        return out(State.FAILED, Reason.OUT_OF_MEMORY, code=code, message=text)
    return out(State.FAILED, Reason.EXIT_CODE, code=code, message=text)


_PBSPRO_FINAL = frozenset({"F", "X"})
_TORQUE_FINAL = frozenset({"C"})


def _job_status(job_id: str, job: Mapping[str, Any], final_states: frozenset[str]) -> NativeStatus:
    state = str(job.get("job_state", "")).strip().upper()
    name = job.get("Job_Name")
    name = name if isinstance(name, str) and name else None
    comment = job.get("comment")
    comment = comment if isinstance(comment, str) and comment else None
    if state in final_states:
        return _final_status(job_id, job, name)
    if state in ("Q", "H", "W", "T", "M"):
        label = {"Q": None, "H": "held", "W": "waiting", "T": "in transit", "M": "moved"}[state]
        message = "; ".join(p for p in (label, comment) if p) or None
        return NativeStatus(native_id=job_id, state=State.SUBMITTED, message=message, job_name=name)
    if state in ("R", "E", "B"):
        return NativeStatus(native_id=job_id, state=State.RUNNING, job_name=name)
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
        out[job_id] = _job_status(job_id, job, final_states=_PBSPRO_FINAL)
    return out


_JOB_ID_LINE_RE = re.compile(r"^Job Id:\s*(\S+)\s*$")
_ATTR_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*) = ?(.*)$")


def parse_torque_blocks(text: str) -> dict[str, dict[str, str]]:
    """Torque `qstat -f` text -> {job id: {attribute: value}}, with dotted keys
    (`Resource_List.walltime`). Attribute lines are indented (4 spaces in Torque, a tab in Debian's
    wrapper); in Torque a long value continues on lines indented by a tab, which are joined."""
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
        attr = _ATTR_RE.match(body)
        starts_with_tab = line.startswith("\t")
        if attr and first_attr:
            tab_attrs = starts_with_tab
            first_attr = False
        if attr and (not starts_with_tab or tab_attrs):
            last_key = attr.group(1)
            current[last_key] = attr.group(2).strip()
        elif last_key is not None:  # a continuation line
            current[last_key] += body
    return blocks


def parse_qstat_torque(text: str) -> dict[str, NativeStatus]:
    """Torque `qstat -f` text -> {job id: status}. `C` with no exit_status (Debian's wrapper)
    is COMPLETED with exit_code None: the marker decides."""
    return {
        job_id: _job_status(job_id, attrs, final_states=_TORQUE_FINAL)
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
) -> list[str]:
    """The `#PBS` lines for one task, in order.

    pbspro: `-l select=<nodes>:ncpus=<cpus>[:mem=<MiB>mb][:ngpus=N]` (per chunk = per node);
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
            select += f":ngpus={gpus}"
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
