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

import os
import re
from collections.abc import Mapping, Sequence

from ..layout import FEM_DIR, job_name
from ..model import Task, format_walltime
from .base import NativeStatus
from .directive_checks import SAFE_WORD_RE, check_path, check_plain, directive_lines, reject_control
from .pbs_parse import DIALECTS, Dialect

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
NO_HISTORY_NOTE = ("PBS keeps no job history here: job_history_enable=False, so who deleted it is not known; "
                   f"to keep PBS's record of finished jobs: {HISTORY_FIX}")


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
