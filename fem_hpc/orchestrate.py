"""The orchestrator side of the command line: `fem-hpc submit` (one task to one or several nodes,
followed to the end), `cancel` and `status` over the broker."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .client import Client, ClientError
from .config import TLSConfig
from .exits import (
    EX_FAILED,
    EX_INTERRUPTED,
    EX_REJECTED,
    EX_TIMEOUT,
    EX_USAGE,
    FinalReport,
    exit_status,
    finish,
    read_task,
)
from .logs import setup_logging
from .plan import PlanError, cancel_all, load_plan, outcome, worst


def client_for(args: argparse.Namespace, node: str | None = None) -> Client:
    tls = None
    if args.ca_file:
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
    if args.plan:
        if args.task or args.node:
            print("give either --plan PLAN or TASK with --node, not both", file=sys.stderr)
            return EX_USAGE
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
        return EX_USAGE
    if args.queue and len(args.node) > 1:
        print("--queue names one node's queue; with several --node, use a plan file", file=sys.stderr)
        return EX_USAGE
    if len(set(args.node)) != len(args.node):
        print(f"a node is named twice: {args.node}", file=sys.stderr)
        return EX_USAGE
    task = read_task(args.task, args.executor)
    return [(n, args.queue or n, task) for n in args.node]


def _run_status(run: Any) -> int:
    """A followed run's exit status (README "Exit statuses"); 124 when no final state came in time."""
    if run.result is None:
        return EX_TIMEOUT if run.timed_out else EX_FAILED
    return exit_status(run.state, run.result.exit_code)


def _report(run: Any, outputs: str | None) -> FinalReport:
    """The final report of one node's run. The result carries no message; the final status event
    does (e.g. "deleted in PBS by ...")."""
    if run.result is None:
        return FinalReport(task_id=run.task_id, message=f"{'timed out' if run.timed_out else 'error'}: {run.error}",
                           exit_status=_run_status(run))
    result = run.result.result
    message = next((e["message"] for e in reversed(run.result.events)
                    if e.get("type") == "status" and e.get("message")), None)
    errors = [{"field": str(e.get("field")), "message": str(e.get("message"))} for e in result.get("errors", [])]
    return FinalReport(task_id=result.get("task_id") or run.task_id, state=run.state, reason=result.get("reason"),
                       exit_code=run.result.exit_code, message=message, errors=errors, exit_status=_run_status(run),
                       outputs=len(run.result.outputs) if outputs else None)


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
    setup_logging("text", "WARNING")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a stopped `submit --wait` cancels like Ctrl-C
    targets = _submit_targets(args)
    if isinstance(targets, int):
        return targets
    multi = len(targets) > 1 or bool(args.plan)
    try:
        client = client_for(args, targets[0][0])
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_FAILED
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
                    return EX_FAILED
                print(f"{node}: not sent: {exc}", file=sys.stderr)
                runs.append(_Unsent(node, str(exc)))
        if not args.wait:
            for run in runs:
                if not isinstance(run, _Unsent):
                    client._forget(run.waiter)
                    print(f"{run.node} {run.task_id}" if multi else (run.task_id or ""))
            return EX_FAILED if any(isinstance(r, _Unsent) for r in runs) else 0
        followed = [r for r in runs if not isinstance(r, _Unsent)]
        try:
            client.follow_all(followed, timeout=args.timeout)
        except KeyboardInterrupt:
            _cancel_open(client, followed)
            return EX_INTERRUPTED
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EX_FAILED
    for run in runs:
        where = str(Path(args.outputs) / run.node) if multi and args.outputs else args.outputs
        _report_run(run, where, named=multi)
        finish(args, _report(run, where).model_copy(update={"node": run.node if multi else None}))
    if multi:
        print("summary:", file=sys.stderr)
        for run in runs:
            native = run.native_id or "-"
            print(f"  {run.node:<{max(len(r.node) for r in runs)}}  {outcome(run):<10} exit={_run_status(run):<3} "
                  f"native={native}", file=sys.stderr)
    bad = worst(runs)
    return _run_status(bad) if bad is not None else 0  # the final lines above said each node's


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
    """Interrupted while following: cancel every node's task that is not final yet, all at once
    (a node that is down costs one timeout, not one per node)."""
    open_runs = [r for r in runs if not r.done and r.task_id]
    print(f"interrupted: cancelling {len(open_runs)} task(s)", file=sys.stderr)
    answers = cancel_all(client, [(r.waiter.queue, r.task_id) for r in open_runs], timeout=10)
    for run in open_runs:
        reply = answers.get((run.waiter.queue, run.task_id), "no answer")
        if isinstance(reply, dict):
            print(f"  {run.node}: {reply.get('state')} {reply.get('message') or ''}".rstrip(), file=sys.stderr)
        else:
            print(f"  {run.node}: cancel not confirmed ({reply})", file=sys.stderr)


def cmd_cancel(args: argparse.Namespace) -> int:
    setup_logging("text", "WARNING")
    with client_for(args) as client:
        reply = client.cancel(args.task_id, timeout=args.timeout or 30)
    print(json.dumps(reply, indent=2))
    return 0


def status_over_broker(args: argparse.Namespace) -> int:
    if not args.task_id:
        print("status over the broker needs a TASK_ID", file=sys.stderr)
        return EX_USAGE
    setup_logging("text", "WARNING")
    with client_for(args) as client:
        reply = client.status(args.task_id, timeout=args.timeout or 30)
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("state") != "UNKNOWN" else 1
