"""Command line: fem-hpc serve | run | submit | cancel | status | render | plugins | doctor | gc."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, SiteConfig
from .logs import setup_logging

EX_CONFIG = 78  # sysexits: configuration error
EX_REJECTED = 2


def _load(path: str) -> SiteConfig:
    from .executors import load_site

    try:
        site = load_site(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(EX_CONFIG)
    return site


def _read_task(path: str, executor: str | None) -> Any:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        print(f"cannot read task file {path}: {exc.strerror}", file=sys.stderr)
        sys.exit(EX_REJECTED)
    except json.JSONDecodeError as exc:
        print(f"task file {path} is not valid JSON: {exc}", file=sys.stderr)
        sys.exit(EX_REJECTED)
    if executor and isinstance(data, dict):
        data["executor"] = executor
    return data


def _print_errors(errors: list[Any]) -> None:
    print("task rejected:", file=sys.stderr)
    for e in errors:
        print(f"  - {e.field}: {e.message}", file=sys.stderr)


def _valid_task(data: Any, site: SiteConfig):
    """The task if it is valid and allowed on this site; else None, with the problems printed."""
    from .model import parse_task
    from .policy import check_policy

    task, errors = parse_task(data)
    if task is not None:
        errors = check_policy(task, site)
    if task is None or errors:
        _print_errors(errors)
        return None
    return task


# -- run ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .journal import Journal
    from .lifecycle.agent import Agent
    from .model import State
    from .staging.git import stage_source
    from .staging.outputs import safe_extract

    site = _load(args.config)
    setup_logging(site.logging.format, "DEBUG" if args.verbose else "WARNING")
    data = _read_task(args.task, args.executor)
    task = _valid_task(data, site)
    if task is None:
        return EX_REJECTED
    journal = Journal(site.journal_path, outbox=False)
    known = journal.get(task.id)
    if known is None and (tomb := journal.retention.tombstone(task.id)) is not None:
        print(f"task id {task.id!r} already ran on this node and {tomb.note()} (state {tomb.state.value}); "
              "task ids are idempotency keys, use a new id", file=sys.stderr)
        return EX_REJECTED
    if known is not None:
        # Task ids are idempotency keys on a node: a second run of the same id would mix two
        # runs' files in one work dir, so it is refused.
        print(f"task id {task.id!r} already exists on this node (state {known.state.value}, work dir "
              f"{known.workdir}); task ids are idempotency keys, use a new id", file=sys.stderr)
        return EX_REJECTED
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
        return EX_REJECTED

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
    if record.result_json:
        res = json.loads(record.result_json)
        if args.outputs and (workdir / ".fem" / "outputs.tar.gz").exists():
            names = safe_extract(workdir / ".fem" / "outputs.tar.gz", Path(args.outputs))
            print(f"outputs: {len(names)} entries in {args.outputs}", file=sys.stderr)
        if res.get("reason"):
            print(f"reason: {res['reason']}: {record.message or ''}", file=sys.stderr)
    if record.state == State.COMPLETED:
        return 0
    if record.exit_code is not None and 0 < record.exit_code < 256:
        return record.exit_code
    return 1


# -- render ---------------------------------------------------------------------------------
def cmd_render(args: argparse.Namespace) -> int:
    from .executors import registry
    from .executors.base import Job
    from .layout import task_workdir
    from .policy import effective_task, executor_for
    from .render import render_job

    site = _load(args.config)
    task = _valid_task(_read_task(args.task, args.executor), site)
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
    from .ops.gc import render_report, run_pass, save_report

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


# -- the orchestrator side ---------------------------------------------------------------------
EX_TIMEOUT = 3


def _client(args: argparse.Namespace, node: str | None = None):
    from .client import Client

    tls = None
    if args.ca_file:
        from .config import TLSConfig

        tls = TLSConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    # pika logs its own view of a lost connection (errors, sometimes tracebacks); the client says
    # what happened in one warning line and reconnects, so pika's lines would only alarm the user.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    return Client(args.broker, node if node is not None else args.node, queue=args.queue, tls=tls)


class _ProgressLine:
    """One line per task and state: elapsed time, native id; with several nodes, the node first.
    A single task on a tty keeps one live line."""

    def __init__(self, nodes: list[str] | None = None) -> None:
        self.t0 = time.monotonic()
        self.width = max((len(n) for n in nodes), default=0) if nodes and len(nodes) > 1 else 0
        self.tty = sys.stderr.isatty() and not self.width

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") != "status":
            return
        node = f"{event.get('node', '?'):<{self.width}}  " if self.width else ""
        line = (f"{node}{event['task_id']}  {event['state']:<11} {time.monotonic() - self.t0:7.1f}s"
                f"  native={event.get('native_id') or '-'}" + (f"  {event['message']}" if event.get("message") else ""))
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            if event["state"] in ("COMPLETED", "FAILED", "CANCELLED", "REJECTED"):
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _submit_targets(args: argparse.Namespace) -> list[tuple[str, str, Any]] | int:
    """(node, queue, TASK) for every node of this submit, or an exit status after printing why not."""
    from .plan import PlanError, load_plan

    if args.plan:
        if args.task or args.node:
            print("give either --plan PLAN or TASK with --node, not both", file=sys.stderr)
            return EX_REJECTED
        try:
            plan = load_plan(args.plan)
            tasks = plan.tasks()
        except PlanError as exc:
            print(f"plan {args.plan} is invalid:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            return EX_REJECTED
        targets = []
        for node, (queue, task) in tasks.items():
            if args.executor:
                task["executor"] = args.executor
            targets.append((node, queue, task))
        return targets
    if not args.task or not args.node:
        print("submit needs TASK and at least one --node (or --plan PLAN)", file=sys.stderr)
        return EX_REJECTED
    if args.queue and len(args.node) > 1:
        print("--queue names one node's queue; with several --node, use a plan file", file=sys.stderr)
        return EX_REJECTED
    if len(set(args.node)) != len(args.node):
        print(f"a node is named twice: {args.node}", file=sys.stderr)
        return EX_REJECTED
    task = _read_task(args.task, args.executor)
    return [(n, args.queue or n, task) for n in args.node]


def _run_status(run: Any) -> int:
    """A followed run's exit status: 0, the task's exit code, 2 rejected, 3 no answer in time."""
    if run.result is None:
        return EX_TIMEOUT if run.timed_out else 1
    if run.state == "COMPLETED":
        return 0
    if run.state == "REJECTED":
        return EX_REJECTED
    code = run.result.exit_code
    return code if code is not None and 0 < code < 256 else 1


def _report_run(run: Any, outputs: str | None, *, named: bool) -> None:
    who = f"{run.node}: " if named else ""
    if run.result is None:
        print(f"{who}{'timed out: ' if run.timed_out else 'error: '}{run.error}", file=sys.stderr)
        return
    if run.state == "REJECTED":
        print(f"{who}task rejected:", file=sys.stderr)
        for e in run.result.result.get("errors", []):
            print(f"  - {e['field']}: {e['message']}", file=sys.stderr)
    if run.result.outputs:
        print(f"{who}outputs: {len(run.result.outputs)} entries in {outputs}", file=sys.stderr)
    if run.state not in ("COMPLETED", "REJECTED") and run.result.result.get("reason"):
        print(f"{who}{run.state}: {run.result.result['reason']}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from .client import ClientError
    from .plan import outcome, worst

    setup_logging("text", "WARNING")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a stopped `submit --wait` cancels like Ctrl-C
    targets = _submit_targets(args)
    if isinstance(targets, int):
        return targets
    multi = len(targets) > 1 or bool(args.plan)
    try:
        client = _client(args, targets[0][0])
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with client:
        progress = _ProgressLine([t[0] for t in targets])
        runs = []
        for node, queue, task in targets:
            # Several nodes: outputs per node in DIR/<node>/; one node: in DIR itself, as ever.
            out = (Path(args.outputs) / node if multi else Path(args.outputs)) if args.outputs else None
            try:
                runs.append(client.start(task, node=node, queue=queue, outputs_dir=out, on_event=progress))
            except ClientError as exc:
                if not multi:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
                print(f"{node}: not sent: {exc}", file=sys.stderr)
                runs.append(_Unsent(node, str(exc)))
        if not args.wait:
            for run in runs:
                if not isinstance(run, _Unsent):
                    client._forget(run.waiter)
                    print(f"{run.node} {run.task_id}" if multi else (run.task_id or ""))
            return 1 if any(isinstance(r, _Unsent) for r in runs) else 0
        followed = [r for r in runs if not isinstance(r, _Unsent)]
        try:
            client.follow_all(followed, timeout=args.timeout)
        except KeyboardInterrupt:
            _cancel_open(client, followed)
            return 130
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for run in runs:
        _report_run(run, str(Path(args.outputs) / run.node) if multi and args.outputs else args.outputs, named=multi)
    if multi:
        print("summary:", file=sys.stderr)
        for run in runs:
            native = run.native_id or "-"
            print(f"  {run.node:<{max(len(r.node) for r in runs)}}  {outcome(run):<10} exit={_run_status(run):<3} "
                  f"native={native}", file=sys.stderr)
    bad = worst(runs)
    return _run_status(bad) if bad is not None else 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _Unsent:
    """A node whose submit could not even be sent (e.g. its queue does not exist)."""

    def __init__(self, node: str, error: str):
        self.node, self.error = node, error
        self.result = None
        self.timed_out = False
        self.state = None
        self.native_id = None
        self.task_id = None


def _cancel_open(client: Any, runs: list[Any]) -> None:
    """Interrupted while following: cancel every node's task that is not final yet."""
    open_runs = [r for r in runs if not r.done and r.task_id]
    print(f"interrupted: cancelling {len(open_runs)} task(s)", file=sys.stderr)
    for run in open_runs:
        try:
            reply = client.cancel(run.task_id, timeout=10, node=run.waiter.queue)
            print(f"  {run.node}: {reply.get('state')} {reply.get('message') or ''}".rstrip(), file=sys.stderr)
        except Exception as exc:  # one node's failure must not keep the others running
            print(f"  {run.node}: cancel not confirmed ({exc})", file=sys.stderr)


def cmd_cancel(args: argparse.Namespace) -> int:
    setup_logging("text", "WARNING")
    with _client(args) as client:
        reply = client.cancel(args.task_id, timeout=args.timeout or 30)
    print(json.dumps(reply, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.broker:
        if not args.task_id:
            print("status over the broker needs a TASK_ID", file=sys.stderr)
            return EX_REJECTED
        setup_logging("text", "WARNING")
        with _client(args) as client:
            reply = client.status(args.task_id, timeout=args.timeout or 30)
        print(json.dumps(reply, indent=2))
        return 0 if reply.get("state") != "UNKNOWN" else 1
    if not args.config:
        print("status needs --config F (the local journal) or --broker URL --node N TASK_ID", file=sys.stderr)
        return EX_REJECTED
    from .ops.status import print_status

    return print_status(_load(args.config), task_id=args.task_id, all_tasks=args.all, as_json=args.json)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fem-hpc", description="Run federated tasks on Slurm, PBS, Docker, "
                                "Apptainer or locally, for an orchestrator speaking over RabbitMQ.")
    p.add_argument("--version", action="version", version=f"fem-hpc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task through the whole lifecycle, without a broker")
    run.add_argument("task", help="TASK as a JSON file (PROTOCOL.md)")
    run.add_argument("--config", "-c", required=True)
    run.add_argument("--executor", "-e")
    run.add_argument("--outputs", "-o", help="unpack the outputs and logs into this directory")
    run.add_argument("--verbose", "-v", action="store_true")
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
