#!/usr/bin/env python3
"""Run one federated training across the nodes of federation.yaml (see make_sites.py), as the
orchestrator: through the broker, with fem-hpc's client, like `fem-hpc submit` does.

    python examples/federated/driver.py --dir /tmp/fl-demo [--rounds 5] [--min-clients 3]
        [--app-repo URL [--app-ref REF]] [--print-tasks]

1. The app (app/*.py) is committed to a Git repository the nodes stage in (file:// here), pinned
   to that commit. A real federation names its Git server instead: `--app-repo URL [--app-ref REF]`
   (or `app: {repo, ref}` in federation.yaml); the driver pins REF to its commit.
2. The aggregator task (the Flower server) goes to the aggregator node. The driver waits until the
   task is RUNNING and its port accepts connections: a client started earlier would fail.
3. One client task per node, with the server's address in its env and the node's read-only
   partition as the site volume `fl-data`.
4. Everything is followed to its result; outputs land in DIR/results/<run>/<node>/ (the server's in
   .../server/). A node that never answers is named in the report once the server is done; the
   run does not wait for it longer than --grace seconds. Ctrl-C cancels every node's task.
5. training.png (accuracy and loss per round, one line per node and the global model) and
   summary.txt are written next to the outputs.

Exit status: 0 when the server and every client COMPLETED, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from fem_hpc.client import Client, ClientError, Run
from fem_hpc.plan import cancel_all, outcome

HERE = Path(__file__).resolve().parent
APP = HERE / "app"
NO_TELEMETRY = {"FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}  # Flower phones home unless told not to


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def commit_app(repo_dir: Path) -> tuple[str, str]:
    """The app as a bare Git repository at one commit: (file:// URL, commit)."""
    bare = repo_dir / "fl-app.git"
    env = {**os.environ, "GIT_AUTHOR_NAME": "fl-driver", "GIT_AUTHOR_EMAIL": "fl@localhost",
           "GIT_COMMITTER_NAME": "fl-driver", "GIT_COMMITTER_EMAIL": "fl@localhost"}

    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    if not bare.exists():
        git("init", "-q", "--bare", str(bare), cwd=repo_dir)
    with tempfile.TemporaryDirectory(prefix="fl-app-") as tmp:
        work = Path(tmp)
        git("init", "-q", cwd=work)
        for src in sorted(APP.glob("*.py")):
            (work / src.name).write_text(src.read_text())
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "federated example app", cwd=work)
        commit = git("rev-parse", "HEAD", cwd=work)
        git("push", "-q", "--force", str(bare), "HEAD:refs/heads/main", cwd=work)
    return f"file://{bare}", commit


def resolve_app(url: str, ref: str | None) -> tuple[str, str]:
    """The app in a Git repository the nodes fetch from (a real federation's Git server): (URL,
    the commit REF names there). A 40-digit commit is taken as given (the driver need not reach
    the repository then); a branch, a tag or HEAD is resolved with `git ls-remote`, so every node
    checks out the same commit even if the branch moves during the run."""
    if ref and len(ref) == 40 and all(c in "0123456789abcdef" for c in ref.lower()):
        return url, ref.lower()
    want = ref or "HEAD"
    try:
        out = subprocess.run(["git", "ls-remote", "--", url, want, f"{want}^{{}}"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except subprocess.TimeoutExpired:
        raise SystemExit(f"--app-repo {url}: no answer within 60 s") from None
    if out.returncode != 0:
        raise SystemExit(f"--app-repo {url}: cannot read it ({out.stderr.strip() or f'git exit {out.returncode}'})")
    refs = dict(reversed(line.split("\t", 1)) for line in out.stdout.splitlines() if "\t" in line)
    # An annotated tag names a tag object: its commit is the peeled entry (`^{}`), asked for too.
    for name in (want, f"refs/heads/{want}", f"refs/tags/{want}^{{}}", f"refs/tags/{want}"):
        if name in refs:
            return url, refs[name]
    raise SystemExit(f"--app-repo {url}: no branch or tag {want!r} there (give --app-ref, or a 40-digit commit)")


def app_source(base: Path, fed: dict, repo: str | None, ref: str | None) -> dict[str, str]:
    """Where the nodes get the app: --app-repo/--app-ref, else federation.yaml's `app: {repo, ref}`,
    else a commit of this checkout's app/ in a file:// repository under the federation's
    directory (only nodes on this machine can read that one)."""
    app = fed.get("app") or {}
    repo, ref = repo or app.get("repo"), ref or app.get("ref")
    if ref and not repo:
        raise SystemExit("--app-ref (or app.ref) needs --app-repo (or app.repo)")
    url, commit = resolve_app(repo, ref) if repo else commit_app(base)
    return {"git": url, "commit": commit}


class Progress:
    """One line per node and state, like `fem-hpc submit` with several nodes."""

    def __init__(self, role: dict[str, str]):
        self.t0 = time.monotonic()
        self.role = role  # correlation of task id -> role label

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") != "status":
            return
        who = f"{event.get('node')}/{self.role.get(event.get('task_id', ''), '?')}"
        say(f"{who:<28} {event['state']:<11} {time.monotonic() - self.t0:6.1f}s native={event.get('native_id') or '-'}"
            + (f"  {event['message']}" if event.get("message") else ""))


def task_for(role: str, run_id: str, node: dict, source: dict, env: dict[str, str], walltime: str) -> dict:
    task: dict[str, Any] = {
        "id": f"fl-{role}-{run_id}", "execution_id": f"fl-{run_id}", "user_id": "researcher",
        "command": [node["python"], f"{role}_app.py"], "source": source,
        "env": {**NO_TELEMETRY, **env}, "outputs": ["out/*"],
        "resources": {"cpus": 1, "memory": "1G", "walltime": walltime}, "labels": {"fl_role": role}}
    if node.get("image"):
        task["image"] = node["image"]
    if role == "client":
        task["volumes"] = [{"name": "fl-data", "target": "/data", "mode": "ro"}]
    return task


def server_task(args: argparse.Namespace, aggregator: dict, run_id: str, source: dict, bind: str, min_clients: int,
                nodes: dict) -> dict:
    return task_for("server", run_id, aggregator, source, {
        "FL_SERVER_ADDRESS": bind, "FL_ROUNDS": str(args.rounds), "FL_MIN_CLIENTS": str(min_clients),
        "FL_EXPECTED": ",".join(nodes), "FL_CONNECT_TIMEOUT": str(int(args.connect_timeout))}, "00:30:00")


def client_task(run_id: str, name: str, node: dict, source: dict, address: str) -> dict:
    return task_for("client", run_id, node, source, {"FL_SERVER_ADDRESS": address, "FL_NODE": name}, "00:20:00")


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    nodes = sorted({n for r in rounds for n in r["nodes"]})
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((acc_ax, "accuracy", "accuracy on each node's hold-out"), (loss_ax, "loss", "log loss")):
        for node in nodes:
            pts = [(r["round"], r["nodes"][node][key]) for r in rounds
                   if node in r["nodes"] and r["nodes"][node].get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=node)
        pts = [(r["round"], r[key]) for r in rounds if evaluated(r)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", color="black", linewidth=2.5,
                label="global model (weighted)")
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_xticks([r["round"] for r in rounds])
    acc_ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Federated logistic regression (Flower FedAvg) on breast-cancer partitions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, type=Path, help="the federation's directory (make_sites.py --dir)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-clients", type=int, help="clients needed per round (default: every node)")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
    p.add_argument("--grace", type=float, default=30,
                   help="after the server is done, seconds to wait for the clients' results")
    p.add_argument("--connect-timeout", type=float, default=120,
                   help="seconds the server waits for enough clients before it gives up")
    p.add_argument("--app-repo", metavar="URL",
                   help="a Git repository every node can fetch, holding app/'s files at its top (default: "
                        "federation.yaml's app.repo, else a file:// commit of this checkout's app/)")
    p.add_argument("--app-ref", metavar="REF",
                   help="branch, tag or 40-digit commit in --app-repo (default: app.ref, else HEAD); pinned "
                        "to one commit for every node")
    p.add_argument("--print-tasks", action="store_true",
                   help="print the task documents the run would send (JSON, one per line) and exit")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped driver cancels the run, like Ctrl-C
    base = args.dir.resolve()
    fed = yaml.safe_load((base / "federation.yaml").read_text())
    nodes = {n["name"]: n for n in fed["nodes"]}
    aggregator = nodes[fed["aggregator"]]
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    source = app_source(base, fed, args.app_repo, args.app_ref)
    srv = {"bind": "127.0.0.1", "host": "127.0.0.1", "port": 0, **(fed.get("server") or {})}
    port = int(srv["port"]) or free_port()
    bind, address = f"{srv['bind']}:{port}", f"{srv['host']}:{port}"
    min_clients = args.min_clients or len(nodes)
    if args.print_tasks:
        print(json.dumps({"node": aggregator["name"],
                          "task": server_task(args, aggregator, run_id, source, bind, min_clients, nodes)}))
        for name, node in nodes.items():
            print(json.dumps({"node": name, "task": client_task(run_id, name, node, source, address)}))
        return 0
    results = base / "results" / run_id
    results.mkdir(parents=True)
    say(f"run {run_id}: app {source['git']} at commit {source['commit'][:10]}, server {address} on "
        f"{aggregator['name']}, {args.rounds} rounds, {min_clients} of {len(nodes)} clients needed")
    deadline = time.monotonic() + args.timeout
    role: dict[str, str] = {}
    progress = Progress(role)
    runs: list[Run] = []
    sent: list[tuple[str, str]] = []  # (node queue, task id) of every submit, noted before it is published
    try:
        with Client(fed["broker"]) as client:
            try:
                code = follow(args, client, nodes, aggregator, run_id, source, bind, address, min_clients,
                              deadline, results, role, progress, runs, sent)
            except KeyboardInterrupt:
                say("interrupted: cancelling every node's task")
                cancel_sent(client, sent, runs)
                return 130
            except ClientError:
                cancel_sent(client, sent, runs)
                raise
            # A task left without a result (the server never listened, a client still running
            # after the server ended, a node that may yet take its request) must not go on alone.
            cancel_sent(client, sent, runs)
            return code
    except ClientError as exc:
        say(f"error: {exc}")
        return 1


def cancel_sent(client: Client, sent: list[tuple[str, str]], runs: list[Run], timeout: float = 10) -> None:
    """Cancel every task that was sent and has no result, whether or not its node's first status
    came back: a node cancels a task it never saw, or a final one, as a no-op (state UNKNOWN, or
    "already ..."), so asking costs nothing, while not asking leaves a Flower client running."""
    finished = {(r.waiter.queue, r.task_id) for r in runs if r.result is not None}
    targets = [t for t in sent if t not in finished]
    if not targets:
        return
    say(f"cancelling {len(targets)} task(s) without a result")
    for (queue, task_id), answer in cancel_all(client, targets, timeout=timeout).items():
        if isinstance(answer, dict):
            say(f"  {queue}/{task_id}: {answer.get('state')} {answer.get('message') or ''}".rstrip())
        else:
            say(f"  {queue}/{task_id}: cancel not confirmed ({answer})")


def follow(args, client: Client, nodes: dict, aggregator: dict, run_id: str, source: dict, bind: str, address: str,
           min_clients: int, deadline: float, results: Path, role: dict, progress, runs: list[Run],
           sent: list[tuple[str, str]]) -> int:
    first = server_task(args, aggregator, run_id, source, bind, min_clients, nodes)
    role[first["id"]] = "server"
    sent.append((aggregator["name"], first["id"]))
    server = client.start(first, node=aggregator["name"], outputs_dir=results / "server", on_event=progress)
    runs.append(server)
    host, port = address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1])
    ok = client.pump([server], until=lambda: server.done or (server.state == "RUNNING" and listening(host, port)),
                     timeout=max(1.0, min(180.0, deadline - time.monotonic())))
    if not ok or server.done:
        if not ok:
            server.fail(f"the server task did not start listening on {address}")
        say(f"the aggregator on {aggregator['name']} is not listening on {address}: "
            f"{server.error or outcome(server)}; no client is sent")
        client.follow_all([server], timeout=30)
        return 1
    say(f"the aggregator is RUNNING and listening on {address}: sending the clients")
    clients: list[Run] = []
    for name, node in nodes.items():
        t = client_task(run_id, name, node, source, address)
        role[t["id"]] = "client"
        sent.append((name, t["id"]))
        try:
            # A request no node took before the server gives up is dropped by the broker: a node
            # that comes back later must not start a client for a run that is over.
            run = client.start(t, node=name, outputs_dir=results / name, on_event=progress,
                               expiration_seconds=args.connect_timeout)
        except ClientError as exc:
            sent.remove((name, t["id"]))  # nothing to cancel: it never reached a queue
            say(f"{name}: client not sent: {exc}")
            continue
        clients.append(run)
        runs.append(run)
    client.pump(runs, until=lambda: server.done, timeout=max(1.0, deadline - time.monotonic()))
    if not server.done:
        server.fail(f"no result within {args.timeout:.0f}s", timed_out=True)
    client.pump(runs, until=lambda: all(r.done for r in clients), timeout=args.grace)
    for run in clients:
        if not run.done:
            why = ("never received the task: is its fem-hpc serve running?" if run.state is None
                   else f"still {run.state} after the server ended")
            run.fail(f"no result: {why}", timed_out=True)
    return report(server, clients, nodes, results, address)


def num(value: float | None, spec: str = ".4f") -> str:
    """A metric as text: a round nobody evaluated has none, and must not end the report."""
    return "n/a" if value is None else format(value, spec)


def evaluated(entry: dict) -> bool:
    # "evaluated" is written by this example's server; a round without it is judged by its numbers.
    return bool(entry.get("evaluated", True)) and entry.get("loss") is not None and entry.get("accuracy") is not None


def last_evaluated(metrics: dict | None) -> dict | None:
    rounds = [r for r in (metrics or {}).get("rounds", []) if evaluated(r)]
    return rounds[-1] if rounds else None


def not_evaluated(metrics: dict | None) -> list[int]:
    return [r["round"] for r in (metrics or {}).get("rounds", []) if not evaluated(r)]


def global_lines(metrics: dict | None) -> list[str]:
    """The summary's lines about the global model: its last evaluated round, and the rounds that
    had no evaluation (every client's failed), named rather than shown as numbers."""
    if metrics is None:
        return ["no metrics from the server (metrics.json missing): no plot"]
    final = last_evaluated(metrics)
    lines = []
    if final is None:
        lines.append("no round was evaluated: no plot")
    else:
        lines.append(f"global model after round {final['round']}: accuracy {num(final['accuracy'])}, loss "
                     f"{num(final['loss'])} (weighted over {', '.join(sorted(final['nodes']))})")
    if skipped := not_evaluated(metrics):
        lines.append(f"rounds without evaluation (every client's evaluation failed or none ran): "
                     f"{', '.join(map(str, skipped))} of {len(metrics['rounds'])}")
    lines.append(f"server time {metrics.get('seconds', '-')}s, flwr {metrics.get('flwr', '-')}")
    return lines


def report(server: Run, clients: list[Run], nodes: dict, results: Path, address: str) -> int:
    metrics_path = results / "server" / "outputs" / "out" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    lines = [f"federated run: {results.name}", f"aggregator: {server.node} ({nodes[server.node]['executor']}), "
             f"{address}, {outcome(server)}, native id {server.native_id or '-'}"]
    if server.error:
        lines.append(f"  server: {server.error}")
    if server.result is not None and server.state != "COMPLETED":
        lines.append(f"  server stderr: {server.result.result.get('stderr_tail', '').strip()[-400:]}")
    missing = sorted(set(nodes) - {r.node for r in clients if r.state == "COMPLETED"})
    lines.append("clients:")
    for run in clients:
        rounds = "-"
        local = results / run.node / "outputs" / "out" / "metrics.json"
        if local.exists():
            m = json.loads(local.read_text())
            if m["rounds"]:
                last = m["rounds"][-1]
                rounds = (f"{len(m['rounds'])} rounds, last accuracy {num(last.get('accuracy'), '.3f')} "
                          f"loss {num(last.get('loss'), '.3f')}")
        native = (run.native_id or "-")[:14]  # a container id is 64 hex digits; docker shows 12
        lines.append(f"  {run.node:<22} {nodes[run.node]['executor']:<7} {outcome(run):<10} "
                     f"native={native:<14} {rounds}")
        if run.error:
            lines.append(f"    {run.error}")
        elif run.result is not None and run.state != "COMPLETED":
            tail = run.result.result.get("stderr_tail", "").strip().splitlines()
            lines.append(f"    {run.state}: {tail[-1] if tail else run.result.result.get('reason')}")
    for name in sorted(set(nodes) - {r.node for r in clients}):
        lines.append(f"  {name:<22} {nodes[name]['executor']:<7} NOT SENT")
    final = last_evaluated(metrics)
    lines += global_lines(metrics)
    if final is not None:
        plot(metrics, results / "training.png")
        lines.append(f"plot: {results / 'training.png'}")
    if missing:
        lines.append(f"missing nodes (no completed client): {', '.join(missing)}")
    text = "\n".join(lines) + "\n"
    (results / "summary.txt").write_text(text)
    (results / "run.json").write_text(json.dumps({
        "server": {"node": server.node, "state": outcome(server), "native_id": server.native_id},
        "clients": {r.node: {"state": outcome(r), "native_id": r.native_id, "error": r.error} for r in clients},
        "missing": missing, "final": final,
        "rounds_not_evaluated": not_evaluated(metrics)}, indent=2))
    print(text, end="")
    return 0 if outcome(server) == "COMPLETED" and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
