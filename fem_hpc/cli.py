"""Command line: fem-hpc serve | run | submit | cancel | status | render | plugins | doctor | gc."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import ConfigError, SiteConfig
from .exits import (
    EX_CONFIG,
    EX_INTERRUPTED,
    EX_REJECTED,
    EX_USAGE,
    FinalReport,
    exit_status,
    finish,
    read_task,
    rejected,
)
from .logs import setup_logging


def _load(path: str) -> SiteConfig:
    from .executors import load_site

    try:
        site = load_site(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(EX_CONFIG)
    return site


def _print_errors(errors: list[Any]) -> None:
    print("task rejected:", file=sys.stderr)
    for e in errors:
        print(f"  - {e.field}: {e.message}", file=sys.stderr)


def _valid_task(data: Any, site: SiteConfig, found: list[Any] | None = None):
    """The task if it is valid and allowed on this site; else None, with the problems printed
    (and appended to `found`)."""
    from .model import parse_task
    from .policy import check_policy

    task, errors = parse_task(data)
    if task is not None:
        errors = check_policy(task, site)
    if task is None or errors:
        _print_errors(errors)
        if found is not None:
            found.extend(errors)
        return None
    return task


# -- run ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .journal import Journal
    from .lifecycle.agent import Agent
    from .staging.git import stage_source
    from .staging.outputs import safe_extract

    site = _load(args.config)
    setup_logging(site.logging.format, "DEBUG" if args.verbose else "WARNING")
    data = read_task(args.task, args.executor)
    errors: list[Any] = []
    task = _valid_task(data, site, errors)
    if task is None:
        task_id = data.get("id") if isinstance(data, dict) else None
        return rejected(args, task_id, [{"field": e.field, "message": e.message} for e in errors], "task rejected")
    journal = Journal(site.journal_path, outbox=False)
    known = journal.get(task.id)
    why = None
    if known is None and (tomb := journal.retention.tombstone(task.id)) is not None:
        why = (f"task id {task.id!r} already ran on this node and {tomb.note()} (state {tomb.state.value}); "
               "task ids are idempotency keys, use a new id")
    elif known is not None:
        # Task ids are idempotency keys on a node: a second run of the same id would mix two
        # runs' files in one work dir, so it is refused.
        why = (f"task id {task.id!r} already exists on this node (state {known.state.value}, work dir "
               f"{known.workdir}); task ids are idempotency keys, use a new id")
    if why is not None:
        print(why, file=sys.stderr)
        return rejected(args, task.id, [{"field": "task.id", "message": why}], why)
    agent = Agent(site, journal, steps=[stage_source])
    t0 = time.monotonic()

    def progress(task_id: str, event: Any) -> None:
        if getattr(event, "type", None) != "status":
            return
        native = f" native={event.native_id}" if event.native_id else ""
        msg = f" {event.message}" if event.message else ""
        print(f"[{time.monotonic() - t0:6.1f}s] {task_id} {event.state.value}{native}{msg}", file=sys.stderr)

    agent.observers.append(progress)
    agent.progress_observers.append(
        lambda task_id, text: print(f"[{time.monotonic() - t0:6.1f}s] {task_id} {text}", file=sys.stderr))
    result = agent.intake(data)
    if result.record is None:
        _print_errors(result.errors)
        agent.close()
        return rejected(args, task.id, [{"field": e.field, "message": e.message} for e in result.errors],
                        "task rejected")

    def interrupt(signum: int, frame: Any) -> None:
        print(f"signal {signum}: cancelling {task.id}", file=sys.stderr)
        agent.cancel(task.id)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    record = agent.wait(task.id)
    while record is not None and not record.final:
        record = agent.wait(task.id, 1.0)
    agent.close()
    assert record is not None
    workdir = Path(record.workdir or "")
    reason = record.reason
    unpacked = None
    if record.result_json:
        res = json.loads(record.result_json)
        reason = res.get("reason") or reason
        if args.outputs and (workdir / ".fem" / "outputs.tar.gz").exists():
            names = safe_extract(workdir / ".fem" / "outputs.tar.gz", Path(args.outputs))
            unpacked = len(names)
            print(f"outputs: {len(names)} entries in {args.outputs}", file=sys.stderr)
        if res.get("reason"):
            print(f"reason: {res['reason']}: {record.message or ''}", file=sys.stderr)
    state = record.state.value
    return finish(args, FinalReport(task_id=task.id, state=state, reason=reason, exit_code=record.exit_code,
                                    message=record.message, exit_status=exit_status(state, record.exit_code),
                                    outputs=unpacked))


# -- render ---------------------------------------------------------------------------------
def cmd_render(args: argparse.Namespace) -> int:
    from .executors import registry
    from .executors.base import Job
    from .layout import task_workdir
    from .policy import effective_task, executor_for
    from .render import render_job

    site = _load(args.config)
    task = _valid_task(read_task(args.task, args.executor), site)
    if task is None:
        return EX_REJECTED
    task = effective_task(task, site)
    executor = registry.create(executor_for(task, site), site)
    sys.stdout.write(render_job(executor, Job(task=task, workdir=task_workdir(site.work_root, task))))
    return 0


# -- plugins --------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from .executors import registry

    rows = [("NAME", "MODULE", "STATUS", "RUNTIME")]
    for info in registry.plugins().values():
        found, where = info.runtime_found()
        runtime = where if found else f"missing ({where})"
        rows.append((info.name, info.module, info.status, runtime))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


# -- doctor ---------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from .ops.doctor import render_text
    from .ops.doctor import run as run_doctor

    setup_logging("text", "ERROR")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the report says what failed, once
    report = run_doctor(args.config, broker_timeout=args.timeout)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(render_text(report))
    return 0 if report.ok else 1


# -- gc ---------------------------------------------------------------------------------------
def cmd_gc(args: argparse.Namespace) -> int:
    import sqlite3
    import tempfile

    from .journal import Journal
    from .ops.gc import run_pass
    from .ops.gc_report import render_report, save_report

    site = _load(args.config)
    setup_logging("text", "WARNING")
    with tempfile.TemporaryDirectory(prefix="fem-gc-") as tmp:
        # A dry run on a node without a journal yet must not create one: it plans on an empty one.
        path = site.journal_path if site.journal_path.exists() or not args.dry_run else Path(tmp) / "empty.sqlite"
        try:
            journal = Journal(path)
            try:
                report = run_pass(site, journal, dry_run=args.dry_run)
            finally:
                journal.close()
        except (sqlite3.Error, OSError) as exc:
            print(f"cannot use the journal {site.journal_path} or state_dir: {exc}", file=sys.stderr)
            return 1
    if not args.dry_run:
        save_report(site, report)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print("\n".join(render_report(report)))
    return 1 if report.errors else 0


# -- serve ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .service import serve

    site = _load(args.config)
    setup_logging(args.log_format or site.logging.format, args.log_level or site.logging.level)
    return serve(site)


def cmd_status(args: argparse.Namespace) -> int:
    if args.broker:
        from .orchestrate import status_over_broker

        return status_over_broker(args)
    if not args.config:
        print("status needs --config F (the local journal) or --broker URL --node N TASK_ID", file=sys.stderr)
        return EX_USAGE
    from .ops.status import print_status

    return print_status(_load(args.config), task_id=args.task_id, all_tasks=args.all, as_json=args.json)


def cmd_submit(args: argparse.Namespace) -> int:
    from .orchestrate import cmd_submit as submit

    return submit(args)


def cmd_cancel(args: argparse.Namespace) -> int:
    from .orchestrate import cmd_cancel as cancel

    return cancel(args)


def _broker_args(p: argparse.ArgumentParser, required: bool = True, multi: bool = False) -> None:
    p.add_argument("--broker", required=required, help="amqp[s]://user:pass@host:port/vhost")
    if multi:
        p.add_argument("--node", action="append", help="a node to send the task to (repeat for several)")
    else:
        p.add_argument("--node", required=required, help="the node to talk to")
    p.add_argument("--queue", help="the node's queue, if not named after the node")
    p.add_argument("--ca-file")
    p.add_argument("--cert-file")
    p.add_argument("--key-file")
    p.add_argument("--timeout", type=float, help="seconds to wait for the final reply")


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad command line, which is also what a task exiting 2 gives `run` and
    `submit --wait`: fem-hpc's own usage errors exit 64 (sysexits EX_USAGE) instead."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fem-hpc", description="Run federated tasks on Slurm, PBS, Docker, "
                                "Apptainer or locally, for an orchestrator speaking over RabbitMQ.")
    p.add_argument("--version", action="version", version=f"fem-hpc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task through the whole lifecycle, without a broker")
    run.add_argument("task", help="TASK as a JSON file (PROTOCOL.md)")
    run.add_argument("--config", "-c", required=True)
    run.add_argument("--executor", "-e")
    run.add_argument("--outputs", "-o", help="unpack the outputs and logs into this directory")
    run.add_argument("--verbose", "-v", action="store_true")
    run.add_argument("--json", action="store_true", help="print the final state as one JSON object on stdout")
    run.set_defaults(func=cmd_run)

    render = sub.add_parser("render", help="print the job script a task would run")
    render.add_argument("task")
    render.add_argument("--config", "-c", required=True)
    render.add_argument("--executor", "-e")
    render.set_defaults(func=cmd_render)

    serve = sub.add_parser("serve", help="consume the node queue and run tasks until SIGTERM")
    serve.add_argument("--config", "-c", required=True)
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)

    submit = sub.add_parser("submit", help="publish a task to one or more nodes (the orchestrator side)")
    submit.add_argument("task", nargs="?", help="TASK as a JSON file (or use --plan)")
    _broker_args(submit, multi=True)
    submit.add_argument("--plan", help="a plan file (YAML/JSON): one task for several nodes, per-node changes")
    submit.add_argument("--executor", "-e")
    submit.add_argument("--wait", action="store_true", help="follow the task to its result")
    submit.add_argument("--outputs", "-o", help="with --wait: unpack the outputs here (DIR/<node>/ with several nodes)")
    submit.add_argument("--json", action="store_true",
                        help="with --wait: print each node's final state as one JSON object (a line each)")
    submit.set_defaults(func=cmd_submit)

    cancel = sub.add_parser("cancel", help="cancel a task on a node")
    cancel.add_argument("task_id")
    _broker_args(cancel)
    cancel.set_defaults(func=cmd_cancel)

    status = sub.add_parser("status", help="tasks in the local journal, or one task's state over the broker")
    status.add_argument("task_id", nargs="?")
    status.add_argument("--config", "-c")
    status.add_argument("--all", action="store_true", help="include finished tasks")
    status.add_argument("--json", action="store_true")
    _broker_args(status, required=False)
    status.set_defaults(func=cmd_status)

    plugins = sub.add_parser("plugins", help="list the executors and whether their runtime is present")
    plugins.set_defaults(func=cmd_plugins)

    gc = sub.add_parser("gc", help="remove what the retention settings let go (work dirs, journal rows, caches)")
    gc.add_argument("--config", "-c", required=True)
    gc.add_argument("--dry-run", "-n", action="store_true", help="list and size what would go; change nothing")
    gc.add_argument("--json", action="store_true", help="the report as JSON")
    gc.set_defaults(func=cmd_gc)

    doctor = sub.add_parser("doctor", help="check the config, directories, broker and executors; exit 1 on errors")
    doctor.add_argument("--config", "-c", required=True)
    doctor.add_argument("--json", action="store_true", help="the report as JSON")
    doctor.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    doctor.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return EX_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
