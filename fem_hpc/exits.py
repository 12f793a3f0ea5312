"""The exit statuses of the command line (README "Exit statuses") and the final report of `run` and
`submit --wait`: one stderr line always, one JSON object on stdout with --json.

A task's own exit code (1-255) passes through, so fem-hpc's own outcomes use the conventional
codes a task is least likely to mean: sysexits(3) and timeout(1)'s 124. --json and the last
stderr line tell them apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

EX_FAILED = 1  # the task failed or was cancelled without an exit code of its own (LOST, NODE_FAIL, ...)
EX_USAGE = 64  # sysexits EX_USAGE: a command line that cannot work (argparse errors, status without a task id)
EX_REJECTED = 65  # sysexits EX_DATAERR: the task was rejected (invalid, against policy, a known id)
EX_NOINPUT = 66  # sysexits EX_NOINPUT: the task file cannot be read
EX_CONFIG = 78  # sysexits EX_CONFIG: the configuration is invalid
EX_TIMEOUT = 124  # as timeout(1): submit --wait gave up waiting for the final state
EX_INTERRUPTED = 130  # 128 + SIGINT


class FinalReport(BaseModel):
    """The end of `run` / `submit --wait` for one task."""

    task_id: str | None = None
    node: str | None = None  # with several nodes: whose task this is
    state: str | None = None  # COMPLETED, FAILED, CANCELLED, REJECTED; None: no final state was seen
    reason: str | None = None
    exit_code: int | None = None  # the task's own exit code, when it has one
    message: str | None = None
    exit_status: int  # what fem-hpc exits with (the table above)
    errors: list[dict[str, str]] = Field(default_factory=list)  # REJECTED: field, message
    outputs: int | None = None  # entries unpacked with --outputs


def exit_status(state: str, exit_code: int | None) -> int:
    if state == "COMPLETED":
        return 0
    if state == "REJECTED":
        return EX_REJECTED
    return exit_code if exit_code is not None and 0 < exit_code < 256 else EX_FAILED


def final_line(report: FinalReport) -> str:
    what = report.state or "no final state"
    parts = [report.reason, None if report.exit_code is None else f"exit code {report.exit_code}"]
    detail = ", ".join(p for p in parts if p)
    who = f"{report.node}: " if report.node else ""
    line = f"final: {who}{report.task_id or '?'} {what}" + (f" ({detail})" if detail else "")
    return line + (f": {report.message}" if report.message else "") + f"; exit status {report.exit_status}"


def finish(args: argparse.Namespace, report: FinalReport) -> int:
    """Print the final state on stderr (and the report on stdout with --json); return the exit status."""
    print(final_line(report), file=sys.stderr)
    if getattr(args, "json", False):
        print(report.model_dump_json(exclude={"node"} if report.node is None else None))
    return report.exit_status


def rejected(args: argparse.Namespace, task_id: Any, errors: list[dict[str, str]], message: str) -> int:
    return finish(args, FinalReport(task_id=task_id if isinstance(task_id, str) else None, state="REJECTED",
                                    message=message, exit_status=EX_REJECTED, errors=errors))


def read_task(path: str, executor: str | None) -> Any:
    """A TASK file as JSON (with --executor applied); exits 66 when unreadable, 65 when not JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        print(f"cannot read task file {path}: {exc.strerror}", file=sys.stderr)
        sys.exit(EX_NOINPUT)
    except json.JSONDecodeError as exc:
        print(f"task file {path} is not valid JSON: {exc}", file=sys.stderr)
        sys.exit(EX_REJECTED)
    if executor and isinstance(data, dict):
        data["executor"] = executor
    return data
