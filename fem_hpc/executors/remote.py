"""The work dir on a cluster without a shared file system, as pure functions: the argv of each
remote operation and parsers of what it prints (like slurm_cmds.py: nothing here runs a process).

Every remote operation is ONE command on the one SSH connection:
- upload: `tar -x` of the staged work dir, fed on stdin by a local tar writer;
- the tracker's cycle: the markers of all tracked jobs, the job list on stdin (so the command line
  stays the same size whatever the number of jobs); the same script removes the work dirs the
  retention pass lets go (ops/gc.py), many in one command;
- stage-out: packer.py (sent as `python3 -c`) writes the archive to stdout;
- the cluster-side SIF cache: `apptainer pull` under flock into a temp file, then a rename.

Paths are built from the remote root and a task's user/execution/task ids, whose charset
(`[A-Za-z0-9][A-Za-z0-9_.-]*`) cannot hold a `..`, a space or a newline; each is checked again
here, so a line of the cycle's stdin is always one path.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ..layout import FEM_DIR, MARKER_NAME, Marker, parse_marker
from ..model import Task
from ..staging import packer

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ROOT = re.compile(r"^/[A-Za-z0-9_./+-]*$")


def check_root(root: str | PurePosixPath) -> str:
    """The remote work root: absolute, and only characters a scheduler directive takes as is."""
    text = str(root)
    if not _ROOT.fullmatch(text) or "/../" in f"{text}/":
        raise ValueError(f"remote_work_root {text!r} must be an absolute path of letters, digits and _ . / + -")
    return text.rstrip("/") or "/"


def relative_dir(task: Task) -> str:
    """`<user>/<execution>/<task>`: where a task's work dir is under the remote root."""
    return relative_path(task.user_id, task.execution, task.id)


def relative_path(user_id: str, execution: str, task_id: str) -> str:
    """The same from the journal's columns (the retention pass has no Task at hand)."""
    parts = [user_id, execution, task_id]
    for part in parts:
        if not _SEGMENT.fullmatch(part) or part in (".", ".."):
            raise ValueError(f"{part!r} cannot be a path segment of a remote work dir")
    return "/".join(parts)


def remote_dir(root: str, task: Task) -> PurePosixPath:
    return PurePosixPath(check_root(root)) / relative_dir(task)


# -- upload -------------------------------------------------------------------------------------
# A fresh directory each time (a retried upload never mixes two attempts), then tar reads stdin.
_UPLOAD = 'rm -rf -- "$1" && mkdir -p -- "$1" && exec tar -x -f - -C "$1"'


def upload_argv(directory: PurePosixPath) -> list[str]:
    return ["sh", "-c", _UPLOAD, "sh", str(directory)]


# -- the tracker's cycle: markers and removals --------------------------------------------------
# stdin: lines `m <rel>` (print the marker of <rel> if there is one) and `r <rel>` (remove <rel>).
# stdout: `<rel>\t<marker JSON>` per marker found. No root yet: nothing to report.
_CYCLE = (
    'cd -- "$1" 2>/dev/null || exit 0; '
    'while IFS=" " read -r op rel; do case "$op" in '
    f'm) if [ -f "$rel/{FEM_DIR}/{MARKER_NAME}" ]; then printf "%s\\t" "$rel"; '
    f'tr -d "\\n" < "$rel/{FEM_DIR}/{MARKER_NAME}"; echo; fi ;; '
    'r) rm -rf -- "$rel" ;; '
    'esac; done'
)


def cycle_argv(root: str) -> list[str]:
    return ["sh", "-c", _CYCLE, "sh", check_root(root)]


def cycle_input(markers: list[str], removals: list[str]) -> bytes:
    """The stdin of cycle_argv: the relative dirs to read markers of, and to remove."""
    lines = []
    for op, rels in (("m", markers), ("r", removals)):
        for rel in rels:
            parts = rel.split("/")
            if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) and p not in (".", "..") for p in parts):
                raise ValueError(f"{rel!r} is not a remote work dir of the form user/execution/task")
            lines.append(f"{op} {rel}\n")
    return "".join(lines).encode()


def parse_cycle(stdout: str) -> dict[str, Marker]:
    """Markers by relative dir; a line that does not parse (a marker being written) is skipped:
    the next cycle reads it again."""
    out: dict[str, Marker] = {}
    for line in stdout.splitlines():
        rel, sep, text = line.partition("\t")
        if not sep:
            continue
        marker = parse_marker(text)
        if marker is not None:
            out[rel] = marker
    return out


# -- stage-out ----------------------------------------------------------------------------------
PACKER_SOURCE = Path(packer.__file__).read_text()


def pack_argv(python: str, directory: PurePosixPath, patterns: list[str], max_bytes: int,
              compress_level: int | None) -> list[str]:
    """packer.py on the cluster: the archive of `patterns` + logs of `directory` on stdout."""
    level = "auto" if compress_level is None else str(int(compress_level))
    # -E -S: none of the cluster user's PYTHON* variables or site-packages; the packer needs neither.
    return [python, "-E", "-S", "-c", PACKER_SOURCE, str(directory), str(int(max_bytes)), level, *patterns]


def parse_pack_stderr(stderr: str) -> tuple[list[str], str]:
    """(the refused matches, everything else the packer said)."""
    skipped, other = [], []
    for line in stderr.splitlines():
        if line.startswith(packer.SKIPPED_PREFIX):
            skipped.append(line[len(packer.SKIPPED_PREFIX):])
        elif line.strip():
            other.append(line)
    return skipped, "\n".join(other)


# -- images on the cluster ----------------------------------------------------------------------
# The pull policy is applied here, in the remote command, and not by staging.images.pull_needed:
# whether the image is present can only be seen on the cluster, and deciding there under the
# cache's lock, in the same round trip as the pull, is what keeps one call per image and no race
# between two services' pulls. The rules are the same (always: pull; never: fail when missing;
# if-not-present: pull when missing); tests/test_remote.py runs each of them on the cluster side.
# Under an exclusive flock per image (concurrent pulls of one image wait, the second finds it),
# into a temp file of the cache dir, then renamed over the entry: no reader sees half a SIF.
# $1 cache dir, $2 entry stem, $3 force (1: pull over a cached SIF), $4 never (1: do not pull),
# then the pull command with TMP as the placeholder of its destination.
_SIF = (
    'cache=$1 key=$2 force=$3 never=$4; shift 4; '
    'mkdir -p -- "$cache/.locks" || exit 1; '
    'exec 9>>"$cache/.locks/$key.lock" && flock 9 || exit 1; '
    'if [ -s "$cache/$key.sif" ] && [ "$force" != 1 ]; then exit 0; fi; '
    'if [ "$never" = 1 ]; then echo "image not in the SIF cache ($cache/$key.sif) and pull_policy is never" >&2; '
    'exit 2; fi; '
    'tmp="$cache/.$key.$$.tmp.sif"; '
    'for a; do shift; if [ "$a" = TMP ]; then set -- "$@" "$tmp"; else set -- "$@" "$a"; fi; done; '
    '"$@" || { rc=$?; rm -f -- "$tmp"; exit "$rc"; }; '
    'if [ ! -s "$tmp" ]; then rm -f -- "$tmp"; echo "the pull wrote no SIF file" >&2; exit 1; fi; '
    'chmod 644 "$tmp" && mv -f -- "$tmp" "$cache/$key.sif"'
)


def sif_pull_argv(binary: str, cache: PurePosixPath, key: str, ref: str, *, pull_args: list[str],
                  force: bool, never: bool) -> list[str]:
    """`<binary> pull [args] <tmp> docker://<ref>` into the cluster's SIF cache `cache/<key>.sif`."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise ValueError(f"{key!r} is not a SIF cache key")
    return ["sh", "-c", _SIF, "sh", str(cache), key, "1" if force else "0", "1" if never else "0",
            binary, "pull", *pull_args, "TMP", f"docker://{ref}"]


_DOCKER = 'if [ "$1" != always ] && "$2" image inspect "$3" >/dev/null 2>&1; then exit 0; fi; ' \
          'if [ "$1" = never ]; then echo "image $3 is not present on the cluster and pull_policy is never" >&2; ' \
          'exit 2; fi; exec "$2" pull "$3"'


def docker_pull_argv(binary: str, ref: str, pull_policy: str) -> list[str]:
    """The image present in the cluster's docker daemon, under the pull policy."""
    return ["sh", "-c", _DOCKER, "sh", pull_policy, binary, ref]


# -- checks ---------------------------------------------------------------------------------------
# Prints python's version, then whether `flock` is there: the SIF cache lock (_SIF) needs it, but
# only tasks with an image in apptainer use it, so its absence is the caller's warning, not a failure.
_CHECK = 'mkdir -p -- "$1" && [ -w "$1" ] || { echo "$1 is not writable" >&2; exit 1; }; ' \
         'command -v "$2" >/dev/null || { echo "$2 not found on the cluster" >&2; exit 1; }; ' \
         'command -v tar >/dev/null || { echo "tar not found on the cluster" >&2; exit 1; }; ' \
         '"$2" -c "import sys; print(sys.version.split()[0])" || exit 1; ' \
         'if command -v flock >/dev/null; then echo flock; else echo no-flock; fi'


def parse_check(stdout: str) -> tuple[str, bool]:
    """(python version, whether flock was found) from the check's output."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    return (lines[0] if lines else "?"), "flock" in lines[1:]


def check_argv(root: str, python: str) -> list[str]:
    return ["sh", "-c", _CHECK, "sh", check_root(root), python]
