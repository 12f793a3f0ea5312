"""Command line: fem-hpc serve | run | submit | cancel | status | render | plugins | doctor."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from . import __version__
from .config import ConfigError, SiteConfig, load_config
from .logs import setup_logging

# Exit statuses of `run` and `submit --wait` (README "Exit statuses"). A task's own exit code
# (1-255) passes through, so fem-hpc's own outcomes use the conventional codes a task is least
# likely to mean: sysexits(3) and timeout(1)'s 124. --json and the last stderr line tell them apart.
EX_FAILED = 1  # the task failed or was cancelled without an exit code of its own (LOST, NODE_FAIL, ...)
EX_USAGE = 64  # sysexits EX_USAGE: a command line that cannot work (status without a task id)
EX_REJECTED = 65  # sysexits EX_DATAERR: the task was rejected (invalid, against policy, a known id)
EX_NOINPUT = 66  # sysexits EX_NOINPUT: the task file cannot be read
EX_CONFIG = 78  # sysexits EX_CONFIG: the configuration is invalid
EX_TIMEOUT = 124  # as timeout(1): submit --wait gave up waiting for the final state
EX_INTERRUPTED = 130  # 128 + SIGINT


class FinalReport(BaseModel):
    """The end of `run` / `submit --wait`: one stderr line always, and this object on stdout with --json."""

    task_id: str | None = None
    state: str | None = None  # COMPLETED, FAILED, CANCELLED, REJECTED; None: no final state was seen
    reason: str | None = None
    exit_code: int | None = None  # the task's own exit code, when it has one
    message: str | None = None
    exit_status: int  # what fem-hpc exits with (the table above)
    errors: list[dict[str, str]] = Field(default_factory=list)  # REJECTED: field, message
    outputs: int | None = None  # entries unpacked with --outputs


def _exit_status(state: str, exit_code: int | None) -> int:
    if state == "COMPLETED":
        return 0
    if state == "REJECTED":
        return EX_REJECTED
    return exit_code if exit_code is not None and 0 < exit_code < 256 else EX_FAILED


def _finish(args: argparse.Namespace, report: FinalReport) -> int:
    """Print the final state on stderr (and the report on stdout with --json); return the exit status."""
    what = report.state or "no final state"
    parts = [report.reason, None if report.exit_code is None else f"exit code {report.exit_code}"]
    detail = ", ".join(p for p in parts if p)
    line = f"final: {report.task_id or '?'} {what}" + (f" ({detail})" if detail else "")
    line += (f": {report.message}" if report.message else "") + f"; exit status {report.exit_status}"
    print(line, file=sys.stderr)
    if getattr(args, "json", False):
        print(report.model_dump_json())
    return report.exit_status


def _rejected(args: argparse.Namespace, task_id: Any, errors: list[dict[str, str]], message: str) -> int:
    return _finish(args, FinalReport(task_id=task_id if isinstance(task_id, str) else None, state="REJECTED",
                                     message=message, exit_status=EX_REJECTED, errors=errors))


def _load(path: str) -> SiteConfig:
    try:
        site = load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(EX_CONFIG)
    return site


def _read_task(path: str, executor: str | None) -> Any:
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
    from .agent import Agent
    from .journal import Journal
    from .staging.outputs import safe_extract

    site = _load(args.config)
    setup_logging(site.logging.format, "DEBUG" if args.verbose else "WARNING")
    data = _read_task(args.task, args.executor)
    task_id = data.get("id") if isinstance(data, dict) else None
    errors: list[Any] = []
    task = _valid_task(data, site, errors)
    if task is None:
        return _rejected(args, task_id, [{"field": e.field, "message": e.message} for e in errors], "task rejected")
    journal = Journal(site.journal_path, outbox=False)
    known = journal.get(task.id)
    if known is not None:
        # Task ids are idempotency keys on a node: a second run of the same id would mix two
        # runs' files in one work dir, so it is refused.
        why = (f"task id {task.id!r} already exists on this node (state {known.state.value}, work dir "
               f"{known.workdir}); task ids are idempotency keys, use a new id")
        print(why, file=sys.stderr)
        return _rejected(args, task.id, [{"field": "task.id", "message": why}], why)
    agent = Agent(site, journal)
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
    from .staging.git import install as install_git

    install_git(agent)
    result = agent.intake(data, protocol="cli")
    if result.record is None:
        _print_errors(result.errors)
        agent.close()
        return _rejected(args, task.id, [{"field": e.field, "message": e.message} for e in result.errors],
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
    return _finish(args, FinalReport(task_id=task.id, state=state, reason=reason, exit_code=record.exit_code,
                                     message=record.message, exit_status=_exit_status(state, record.exit_code),
                                     outputs=unpacked))


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
    from .doctor import render_text
    from .doctor import run as run_doctor

    setup_logging("text", "ERROR")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the report says what failed, once
    report = run_doctor(args.config, broker_timeout=args.timeout)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(render_text(report))
    return 0 if report.ok else 1


# -- serve ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .service import serve

    site = _load(args.config)
    setup_logging(args.log_format or site.logging.format, args.log_level or site.logging.level)
    return serve(site)


# -- the orchestrator side ---------------------------------------------------------------------

def _client(args: argparse.Namespace):
    from .client import Client

    tls = None
    if args.ca_file:
        from .config import TLSConfig

        tls = TLSConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return Client(args.broker, args.node, queue=args.queue, tls=tls)


class _ProgressLine:
    """One live line per task: state, elapsed time, native id (a new line per event when not a tty)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") != "status":
            return
        line = (f"{event['task_id']}  {event['state']:<11} {time.monotonic() - self.t0:7.1f}s"
                f"  native={event.get('native_id') or '-'}" + (f"  {event['message']}" if event.get("message") else ""))
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            if event["state"] in ("COMPLETED", "FAILED", "CANCELLED", "REJECTED"):
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def cmd_submit(args: argparse.Namespace) -> int:
    from .client import ClientError, Timeout

    setup_logging("text", "WARNING")
    task = _read_task(args.task, args.executor)
    task_id = task.get("id") if isinstance(task, dict) else None
    task_id = task_id if isinstance(task_id, str) else None
    with _client(args) as client:
        if not args.wait:
            client.submit(task, wait=False)
            print(task_id or "")
            return 0
        try:
            res = client.submit(task, timeout=args.timeout, outputs_dir=args.outputs, on_event=_ProgressLine())
        except Timeout as exc:
            print(f"timed out: {exc}", file=sys.stderr)
            return _finish(args, FinalReport(task_id=task_id, message=f"timed out: {exc}", exit_status=EX_TIMEOUT))
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return _finish(args, FinalReport(task_id=task_id, message=f"error: {exc}", exit_status=EX_FAILED))
    assert res is not None
    result = res.result
    if res.state == "REJECTED":
        for e in result.get("errors", []):
            print(f"  - {e['field']}: {e['message']}", file=sys.stderr)
    if res.outputs:
        print(f"outputs: {len(res.outputs)} entries in {args.outputs}", file=sys.stderr)
    if res.state not in ("COMPLETED", "REJECTED") and result.get("reason"):
        print(f"{res.state}: {result['reason']}", file=sys.stderr)
    errors = [{"field": str(e.get("field")), "message": str(e.get("message"))} for e in result.get("errors", [])]
    # The result carries no message; the final status event does (e.g. "deleted in PBS by ...").
    message = next((e["message"] for e in reversed(res.events) if e.get("type") == "status" and e.get("message")),
                   None)
    return _finish(args, FinalReport(task_id=result.get("task_id") or task_id, state=res.state,
                                     reason=result.get("reason"), exit_code=res.exit_code,
                                     message=message, errors=errors,
                                     exit_status=_exit_status(res.state, res.exit_code),
                                     outputs=len(res.outputs) if args.outputs else None))


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
            return EX_USAGE
        setup_logging("text", "WARNING")
        with _client(args) as client:
            reply = client.status(args.task_id, timeout=args.timeout or 30)
        print(json.dumps(reply, indent=2))
        return 0 if reply.get("state") != "UNKNOWN" else 1
    if not args.config:
        print("status needs --config F (the local journal) or --broker URL --node N TASK_ID", file=sys.stderr)
        return EX_USAGE
    from .status import print_status

    return print_status(_load(args.config), task_id=args.task_id, all_tasks=args.all, as_json=args.json)


def _broker_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--broker", required=required, help="amqp[s]://user:pass@host:port/vhost")
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

    submit = sub.add_parser("submit", help="publish a task to a node (the orchestrator side)")
    submit.add_argument("task")
    _broker_args(submit)
    submit.add_argument("--executor", "-e")
    submit.add_argument("--wait", action="store_true", help="follow the task to its result")
    submit.add_argument("--outputs", "-o", help="with --wait: unpack the outputs here")
    submit.add_argument("--json", action="store_true", help="with --wait: print the final state as one JSON object")
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
