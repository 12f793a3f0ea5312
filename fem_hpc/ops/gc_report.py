"""The last retention pass's report, kept for `fem-hpc status` and the running service, and how it
is shown: `fem-hpc gc`'s lines, and the disk areas with what retention keeps (`status`, text and
JSON), from one `disk_status`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..config import SiteConfig
from ..diskguard import DiskGuard, human_bytes
from .gc_model import Clock, GcReport, days_ago

log = logging.getLogger("fem_hpc.ops.gc")


def last_report_path(site: SiteConfig) -> Path:
    return site.state_dir / "gc-last.json"


def save_report(site: SiteConfig, report: GcReport) -> None:
    """Keep the last real pass's report (atomically) for `fem-hpc status`; a full disk only loses it."""
    path = last_report_path(site)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(report.model_dump_json())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot save the gc report to %s (%s)", path, exc)


def load_report(site: SiteConfig) -> GcReport | None:
    try:
        return GcReport.model_validate_json(last_report_path(site).read_text())
    except (OSError, ValueError):
        return None


def render_report(report: GcReport) -> list[str]:
    """What `fem-hpc gc` prints: one line per item, then the bytes per area."""
    verb = "would remove" if report.dry_run else "removed"
    lines = []
    for item in report.items:
        state = verb if report.dry_run or item.done else f"kept ({item.skipped})"
        lines.append(f"{state:<14} {item.area:<10} {human_bytes(item.bytes):>10}  {item.what}  [{item.reason}]")
    totals: dict[str, int] = {}
    for item in report.items:
        if item.done or report.dry_run:
            totals[item.area] = totals.get(item.area, 0) + item.bytes
    summary = ", ".join(f"{area} {human_bytes(n)}" for area, n in totals.items()) or "nothing"
    lines.append(f"{'would free' if report.dry_run else 'freed'}: {summary}"
                 + (f" ({report.confirmed} result(s) newly confirmed: their clocks start now)" if report.confirmed
                    else ""))
    lines += [f"error: {e}" for e in report.errors]
    return lines


def disk_status(site: SiteConfig) -> dict[str, Any]:
    """The areas (free space, live) and what the last gc pass measured and freed: `status --json`'s
    `disk`, and what `status` prints (area_lines)."""
    areas = [{"name": a.name, "path": str(a.path), "free_bytes": a.free, "total_bytes": a.total,
              "keep_free_bytes": a.threshold, "low": a.low, "error": a.error}
             for a in DiskGuard(site).areas(fresh=True)]
    report = load_report(site)
    last = None if report is None else {
        "time": report.time, "freed_bytes": report.freed(), "errors": report.errors,
        "kept": [u.model_dump() for u in report.usage], "unconfirmed_since": report.clocks.get("unconfirmed")}
    return {"areas": areas, "last_gc": last}


def area_lines(site: SiteConfig, now: Clock = time.time) -> list[str]:
    """The areas for `fem-hpc status`: free space (live) and what the last gc pass measured."""
    t = now()
    disk = disk_status(site)
    lines = [f"{'AREA':<22} {'FREE':>10} {'KEPT FREE':>10}  PATH"]
    for a in disk["areas"]:
        flag = "  LOW: new tasks do not start" if a["low"] else (f"  ({a['error']})" if a["error"] else "")
        lines.append(f"{a['name']:<22} {human_bytes(a['free_bytes'] or 0):>10} {human_bytes(a['keep_free_bytes']):>10}"
                     f"  {a['path']}{flag}")
    last = disk["last_gc"]
    if last is None:
        lines.append("retention: no gc pass yet (fem-hpc gc --dry-run shows what one would free)")
        return lines
    freed = last["freed_bytes"]
    lines.append(f"last gc {days_ago(last['time'], t)}: freed "
                 + ", ".join(f"{k} {human_bytes(v)}" for k, v in freed.items() if v) if any(freed.values())
                 else f"last gc {days_ago(last['time'], t)}: freed nothing")
    lines.append(f"{'KEPT':<22} {'BYTES':>10} {'ENTRIES':>10}  OLDEST KEPT (its clock started)")
    for u in last["kept"]:
        oldest = days_ago(u["oldest"], t) if u["oldest"] else "-"
        entries = "-" if u["entries"] is None else str(u["entries"])
        lines.append(f"{u['area']:<22} {human_bytes(u['bytes']):>10} {entries:>10}  {oldest}")
    if last["unconfirmed_since"]:
        lines.append(f"results not yet confirmed by the broker since {days_ago(last['unconfirmed_since'], t)}: "
                     "kept until they are")
    return lines
