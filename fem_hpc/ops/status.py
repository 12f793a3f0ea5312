"""`fem-hpc status --config F`: the journal's tasks as a table (active first), then the disk areas
and what retention keeps; or all of it as JSON (`{"tasks": [...], "disk": {...}}`; with a task id,
`{"tasks": [that task]}`). Opens the journal read-only, so it is safe while `serve` runs."""

from __future__ import annotations

import json
import sys
import time

from ..config import SiteConfig
from ..journal import JournalReader
from ..model import FINAL_STATES
from .gc_report import area_lines, disk_status


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def load_rows(site: SiteConfig, all_tasks: bool = False, task_id: str | None = None) -> list[dict]:
    if not site.journal_path.exists():
        return []
    with JournalReader(site.journal_path) as journal:
        rows = journal.task_rows(task_id)
    finals = {s.value for s in FINAL_STATES}
    if not all_tasks and not task_id:
        rows = [r for r in rows if r["state"] not in finals]
    rows.sort(key=lambda r: (r["state"] in finals, -r["created"]))
    return rows


def print_status(site: SiteConfig, *, task_id: str | None = None, all_tasks: bool = False,
                 as_json: bool = False) -> int:
    rows = load_rows(site, all_tasks, task_id)
    if as_json:
        json.dump({"tasks": rows} if task_id else {"tasks": rows, "disk": disk_status(site)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if rows or not task_id else 1
    now = time.time()
    table = [("TASK", "USER", "EXECUTOR", "NATIVE", "STATE", "AGE", "MESSAGE")]
    for r in rows:
        table.append((r["id"], r["user_id"], r["executor"] or "-", r["native_id"] or "-", r["state"],
                      _age(now - r["created"]), (r["message"] or "")[:60]))
    widths = [max(len(str(row[i])) for row in table) for i in range(6)]
    for row in table:
        print("  ".join(f"{str(row[i]):<{widths[i]}}" for i in range(6)) + "  " + row[6])
    if len(table) == 1:
        print("(no active tasks; --all shows finished ones)" if not all_tasks else "(no tasks)")
    if not task_id:  # the disk areas and what retention keeps
        print("\n" + "\n".join(area_lines(site)))
    return 0 if rows or not task_id else 1
