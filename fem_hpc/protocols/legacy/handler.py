"""The legacy FEM-client actions on the node queue, on top of the same lifecycle as protocol v1.

A legacy `submit_run` is journalled and acked like any task; its reply is written by the legacy
frontend in the transaction of the transition it reports, so a long task never holds the queue
and neither a crash nor a failed write can lose it. The request's token is kept in memory only
(never logged, journalled, dead-lettered or written to disk).
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ... import metrics as metrics_hooks
from ...broker.consumer import Delivery
from ...config import SiteConfig
from ...journal import Journal, Message, Route, TaskRecord
from ...lifecycle.agent import Agent
from ...logs import TOKEN_REDACTED, redact_pipe_token
from ...model import FINAL_STATES, FieldError, State
from ...staging.images import local_images
from ...staging.outputs import collect
from ..v1.dispatch import dead_letter_message
from .codec import COLON_FORM_MESSAGE, LEGACY_ACTIONS, LegacyError, LegacyRequest, colon_form, decode_request
from .frontend import PROTOCOL, reply_messages
from .healthcheck import HEALTH_CHECK, Probes, docker_probe, health_report, inputs_from_site, is_health_check
from .literal import LiteralError
from .mapping import legacy_task_id, legacy_workdir, sanitize_id, to_task
from .replies import error_reply, legacy_time
from .result import FemFields, ReplyIds, reply_body

log = logging.getLogger("fem_hpc.protocols.legacy")

class LegacyHandler:
    def __init__(self, site: SiteConfig, journal: Journal, agent: Agent, health: Callable[[], dict[str, Any]],
                 probes: Callable[[], Probes] | None = None):
        self.site = site
        self.journal = journal
        self.agent = agent
        self.health = health
        # how the health-check tool looks at the node (replaced in tests)
        self.probes = probes or (lambda: Probes(docker_images=docker_probe(site)))
        self.cfg = site.legacy
        self.sandbox = (self.cfg.sandbox_path or self.site.work_root).resolve()
        # Each action returns its outcome ("ok" or "error") for fem_legacy_requests_total.
        self.actions: dict[str, Callable[[LegacyRequest, Route], str]] = {
            "submit_run": self.submit_run, "run_status": self.run_status, "cancel_run": self.cancel_run,
            "run_report": self.run_report, "health-check": self.health_check, "send_files": self.send_files,
            "print_images": self.print_images}

    def reply(self, to: Route, payload: dict[str, Any], *also: Message) -> None:
        """The reply frames, and `also` (a dead-letter copy), in one journal transaction."""
        self.journal.put(*reply_messages(to, payload, self.cfg.reply_chunk_size), *also)

    def handle(self, d: Delivery) -> None:
        to = Route(PROTOCOL, d.reply_to, d.correlation_id)
        old = colon_form(d.body)
        if old is not None:
            log.warning("refused a legacy request in the 2024 form tool:task:execution (%s)", ":".join(old.values()))
            self.reply(to, error_reply("submit_run", COLON_FORM_MESSAGE, node=self.site.node, **old),
                       dead_letter_message(self.site.queue, d, "2024 legacy form (tool:task:execution)",
                                           [FieldError(field="body", message=COLON_FORM_MESSAGE)]))
            metrics_hooks.legacy_request("colon-form-2024", "error")
            return
        try:
            req = decode_request(d.body, self.site.broker.max_body_bytes)
        except (LegacyError, LiteralError) as exc:
            message = exc.message if isinstance(exc, LegacyError) else str(exc)
            ids = exc.ids if isinstance(exc, LegacyError) else {}
            _, token = redact_pipe_token(d.body)  # the dead-letter copy redacts it by itself
            if token:
                message = message.replace(token, TOKEN_REDACTED.decode())
            log.warning("refused a legacy request: %s", message)
            self.reply(to, error_reply(ids.get("action", "unknown"), message, node=self.site.node, **ids),
                       dead_letter_message(self.site.queue, d, "invalid legacy request",
                                           [FieldError(field="body", message=message)]))
            action_name = ids.get("action")
            metrics_hooks.legacy_request(action_name if action_name in LEGACY_ACTIONS else "invalid", "error")
            return
        action = self.actions.get(req.action)
        if action is None:
            self.reply(to, error_reply(req.action, f"unknown action {req.action!r}", node=self.site.node,
                                       **req.ids()))
            metrics_hooks.legacy_request("invalid", "error")
            return
        metrics_hooks.legacy_request(req.action, action(req, to))

    # -- lookups ---------------------------------------------------------------------------
    def workdir(self, req: LegacyRequest) -> Path:
        """The legacy protocol gives one work dir per execution: <sandbox>/<user>/<execution>."""
        return legacy_workdir(self.site, req)

    def _find(self, req: LegacyRequest) -> TaskRecord | None:
        """The task a status/cancel/report request is about: by its exact id, else the latest
        task of that tool in that execution, else the latest task of the execution."""
        if req.execution_id is None:
            return None
        legacy_id = req.task_info.get("_id")
        if legacy_id is not None:
            rec = self.journal.get(legacy_task_id(legacy_id, req.execution_id, req.parametric_args))
            if rec is not None:
                return rec
        execution = sanitize_id(req.execution_id)
        candidates = [r for r in self.journal.by_execution(execution) if r.protocol == PROTOCOL]
        if legacy_id is not None:
            prefix = legacy_task_id(legacy_id, req.execution_id, {}).rsplit(".", 1)[0] + "."
            same_tool = [r for r in candidates if r.id.startswith(prefix)]
            candidates = same_tool or candidates
        return candidates[0] if candidates else None

    def _ids(self, req: LegacyRequest, rec: TaskRecord | None) -> dict[str, Any]:
        return {"node": self.site.node, "task_id": rec.id if rec else None, **req.ids()}

    def _not_found(self, req: LegacyRequest, to: Route) -> str:
        self.reply(to, error_reply(req.action, "no such task on this node", **self._ids(req, None)))
        return "error"

    # -- actions -----------------------------------------------------------------------------
    def submit_run(self, req: LegacyRequest, to: Route) -> str:
        if is_health_check(req.tool_id, req.task_info):
            return self.health_check_tool(req, to)
        task, errors = to_task(req, self.site)
        if not errors:
            workdir = self.workdir(req)
            busy = [r for r in self.journal.by_execution(task["execution_id"])
                    if r.workdir == str(workdir) and r.id != task["id"] and r.state not in FINAL_STATES]
            if busy:
                self.reply(to, error_reply(
                    req.action, f"task {busy[0].id} of this execution is still running in {workdir}; "
                    "the legacy protocol gives one work dir per execution", **self._ids(req, None)))
                return "error"
            secret = {}
            if self.cfg.token_env and req.token.get_secret_value():
                secret[self.cfg.token_env] = req.token.get_secret_value()
            # A duplicate is answered by the lifecycle through this protocol's frontend: the
            # final reply if it has one, never a v1 frame.
            result = self.agent.intake(task, to, workdir=workdir, secret_env=secret)
            if result.settled:  # compacted by retention long ago: said, not run again
                self.reply(to, error_reply(req.action, result.settled, **self._ids(req, None)))
                return "error"  # what the requester got: an error reply, nothing run
            errors = result.errors
        if errors:
            message = "; ".join(f"{e.field}: {e.message}" for e in errors)
            log.warning("refused legacy submit_run of %s: %s", req.task_info.get("_id"), message)
            self.reply(to, {**error_reply(req.action, message, **self._ids(req, None)),
                            "errors": [e.model_dump() for e in errors]})
            return "error"
        return "ok"

    def health_check_tool(self, req: LegacyRequest, to: Route) -> str:
        """Run the built-in checks here, in the handler (about a second: no job, no work dir), and
        reply through the journal's outbox like every reply."""
        started = datetime.now(UTC)
        data = self.cfg.variables.get("DATA_PATH")
        data_path = Path(data.value) if data is not None and data.value.startswith("/") else None
        report = health_report(inputs_from_site(self.site, data_path=data_path), self.probes())
        ids = ReplyIds(execution_id=req.execution_id, tool_id=req.tool_id,
                       task_id=str(req.task_info.get("_id", HEALTH_CHECK)), user_id=req.user_id, node=self.site.node)
        self.reply(to, reply_body(ids, result=report, status="success", return_code=0, started=started,
                                  finished=datetime.now(UTC), fem=FemFields(message="the node's built-in checks")))
        return "ok"

    def run_status(self, req: LegacyRequest, to: Route) -> str:
        rec = self._find(req)
        if rec is None:
            return self._not_found(req, to)
        self.reply(to, {**self._ids(req, rec), "action": req.action, "status": "success", "state": rec.state.value,
                        "native_id": rec.native_id, "return_code": rec.exit_code, "message": rec.message})
        return "ok"

    def cancel_run(self, req: LegacyRequest, to: Route) -> str:
        rec = self._find(req)
        if rec is None:
            return self._not_found(req, to)
        state = self.agent.cancel(rec.id)
        already = rec.state in FINAL_STATES
        self.reply(to, {**self._ids(req, rec), "action": req.action, "status": "error" if already else "success",
                        "state": state.value,
                        "message": f"already {rec.state.value.lower()}" if already else "cancel requested"})
        return "error" if already else "ok"

    def run_report(self, req: LegacyRequest, to: Route) -> str:
        rec = self._find(req)
        if rec is None:
            return self._not_found(req, to)
        self.reply(to, {**self._ids(req, rec), **self._report(rec), "action": req.action, "status": "success"})
        return "ok"

    @staticmethod
    def _report(rec: TaskRecord) -> dict[str, Any]:
        elapsed = None
        if rec.started and rec.finished:
            fmt = "%Y-%m-%dT%H:%M:%S"
            elapsed = (datetime.strptime(rec.finished[:19], fmt) - datetime.strptime(rec.started[:19], fmt)).seconds
        error = None if rec.state == State.COMPLETED or not rec.final else (rec.message or rec.reason)
        return {"state": rec.state.value, "exit_code": rec.exit_code, "start_time": legacy_time(rec.started),
                "stop_time": legacy_time(rec.finished), "elapsed_time_sec": elapsed, "error": error}

    def health_check(self, req: LegacyRequest, to: Route) -> str:
        """The legacy `health-check` action: the node's health reply (ops.health, what the v1 `health`
        op gets: its disk, load, executor checks) in the legacy shape, plus the legacy sandbox."""
        health = self.health()
        paths = {"sandbox": {"path": str(self.sandbox), "exists": self.sandbox.exists(),
                             "writable": os.access(self.sandbox, os.W_OK)}}
        checks = {c["name"]: c for c in health["checks"]}
        state_dir = checks.get("state_dir", {})
        paths["state_dir"] = {"path": str(self.site.state_dir), "exists": self.site.state_dir.exists(),
                              "writable": state_dir.get("status") == "ok"}
        executors = health["executors"]
        installation = {"fem_hpc": health["version"], "python": sys.version.split()[0], "platform": platform.platform(),
                        "executors": {k: v.get("works", False) for k, v in executors.items()}}
        resources = {"cpus": os.cpu_count(), "load": health["load"], "disk": health["disk"],
                     "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
        ok = all(p["writable"] for p in paths.values()) and any(installation["executors"].values())
        self.reply(to, {**self._ids(req, None), "action": req.action, "status": "success" if ok else "error",
                        "checks": {"installation": installation, "paths": paths, "resources": resources,
                                   "images": local_images(self.site)}})
        return "ok" if ok else "error"

    def print_images(self, req: LegacyRequest, to: Route) -> str:
        self.reply(to, {**self._ids(req, None), "action": req.action, "status": "success",
                        "images": local_images(self.site)})
        return "ok"

    def send_files(self, req: LegacyRequest, to: Route) -> str:
        workdir = self.workdir(req)
        if not workdir.is_dir():
            self.reply(to, error_reply(req.action, f"no staged files for execution {req.execution_id}",
                                       **self._ids(req, None)))
            return "error"
        files, skipped = collect(workdir, ["**"])
        total = sum(f.stat().st_size for f in files)
        if total > self.cfg.send_files_max_bytes:
            self.reply(to, error_reply(
                req.action, f"the execution's files are {total} bytes, over the limit of "
                f"{self.cfg.send_files_max_bytes} (legacy.send_files_max_bytes)", **self._ids(req, None)))
            return "error"
        entries = [{"path": str(f.relative_to(workdir)), "size": f.stat().st_size,
                    "data": base64.b64encode(f.read_bytes()).decode()} for f in files]
        self.reply(to, {**self._ids(req, None), "action": req.action, "status": "success", "files": entries,
                        "skipped": skipped})
        return "ok"
