"""The legacy FEM-client actions on the node queue, on top of the same agent as protocol v1.

A legacy `submit_run` is journalled and acked like any task; its reply (when the task is final,
or once submitted if `legacy.submit_waits` is false) is produced from the task's events, so a
long task never holds the queue and a restart still sends the reply. The request's token is
kept in memory only (never logged, journalled or written to disk).
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .. import __version__
from ..journal import Message, TaskRecord
from ..model import FINAL_STATES, ResultEvent, State
from ..staging.outputs import collect
from .legacy import (
    LegacyError,
    LegacyRequest,
    decode_request,
    encode_reply,
    error_reply,
    legacy_task_id,
    legacy_time,
    sanitize_id,
    submit_reply,
    to_task,
)
from .literal import LiteralError

if TYPE_CHECKING:
    from ..service import Service
    from .consumer import Delivery

log = logging.getLogger("fem_hpc.broker.legacy")


class LegacyHandler:
    def __init__(self, service: Service):
        self.service = service
        self.site = service.site
        self.agent = service.agent
        self.journal = service.journal
        self.cfg = service.site.legacy
        self.sandbox = (self.cfg.sandbox_path or self.site.work_root).resolve()
        self.agent.observers.append(self._on_event)

    # -- transport ------------------------------------------------------------------------
    def reply(self, reply_to: str | None, correlation_id: str | None, payload: dict[str, Any],
              task_id: str | None = None) -> None:
        if not reply_to:
            return
        props = {"content_type": "application/json", "correlation_id": correlation_id}
        for body in encode_reply(payload, self.cfg.reply_chunk_size):
            self.journal.put(Message([("", reply_to)], props, body=body), task_id=task_id)

    def handle(self, d: Delivery) -> None:
        from ..model import FieldError

        try:
            req = decode_request(d.body, self.site.broker.max_body_bytes)
        except (LegacyError, LiteralError) as exc:
            message = exc.message if isinstance(exc, LegacyError) else str(exc)
            ids = exc.ids if isinstance(exc, LegacyError) else {}
            log.warning("refused a legacy request: %s", message)
            self.reply(d.reply_to, d.correlation_id, error_reply(ids.get("action", "unknown"), message,
                                                                  node=self.site.node, **ids))
            self.service.dead_letter(d, "invalid legacy request", [FieldError(field="body", message=message)])
            return
        action = req.action.replace("-", "_")
        handler = getattr(self, f"_do_{action}", None)
        if handler is None:
            self.reply(d.reply_to, d.correlation_id,
                       error_reply(req.action, f"unknown action {req.action!r}", node=self.site.node, **req.ids()))
            return
        handler(req, d)

    # -- lookups ---------------------------------------------------------------------------
    def _workdir(self, req: LegacyRequest) -> Path:
        return self.sandbox / sanitize_id(req.user_id) / sanitize_id(req.execution_id or "none")

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
        candidates = [r for r in self.journal.by_execution(execution) if r.protocol == "legacy"]
        if legacy_id is not None:
            prefix = legacy_task_id(legacy_id, req.execution_id, {}).rsplit(".", 1)[0] + "."
            same_tool = [r for r in candidates if r.id.startswith(prefix)]
            candidates = same_tool or candidates
        return candidates[0] if candidates else None

    def _ids(self, req: LegacyRequest, rec: TaskRecord | None) -> dict[str, Any]:
        return {"node": self.site.node, "task_id": rec.id if rec else None, **req.ids()}

    # -- actions -----------------------------------------------------------------------------
    def _do_submit_run(self, req: LegacyRequest, d: Delivery) -> None:
        volumes = {name: str(v.path) for name, v in self.site.volumes.items()}
        task, errors = to_task(req, site_volumes=volumes, default_executor=self.cfg.executor)
        if not errors:
            workdir = self._workdir(req)
            busy = [r for r in self.journal.by_execution(task["execution_id"])
                    if r.workdir == str(workdir) and r.id != task["id"] and r.state not in FINAL_STATES]
            if busy:
                self.reply(d.reply_to, d.correlation_id, error_reply(
                    req.action, f"task {busy[0].id} of this execution is still running in {workdir}; "
                    "the legacy protocol gives one work dir per execution", **self._ids(req, None)))
                return
            secret = {}
            if self.cfg.token_env and req.token.get_secret_value():
                secret[self.cfg.token_env] = req.token.get_secret_value()
            result = self.agent.intake(task, reply_to=d.reply_to, correlation_id=d.correlation_id,
                                       protocol="legacy", workdir=workdir, secret_env=secret)
            errors = result.errors
            if result.record is not None and not result.created and result.record.final:
                self._send_submit_reply(result.record, reply_to=d.reply_to, correlation_id=d.correlation_id)
        if errors:
            message = "; ".join(f"{e.field}: {e.message}" for e in errors)
            self.reply(d.reply_to, d.correlation_id, {**error_reply(req.action, message, **self._ids(req, None)),
                                                      "errors": [e.model_dump() for e in errors]})

    def _do_run_status(self, req: LegacyRequest, d: Delivery) -> None:
        rec = self._find(req)
        if rec is None:
            self.reply(d.reply_to, d.correlation_id, error_reply(req.action, "no such task on this node",
                                                                  **self._ids(req, None)))
            return
        self.reply(d.reply_to, d.correlation_id, {
            **self._ids(req, rec), "action": req.action, "status": "success", "state": rec.state.value,
            "native_id": rec.native_id, "return_code": rec.exit_code, "message": rec.message})

    def _do_cancel_run(self, req: LegacyRequest, d: Delivery) -> None:
        rec = self._find(req)
        if rec is None:
            self.reply(d.reply_to, d.correlation_id, error_reply(req.action, "no such task on this node",
                                                                  **self._ids(req, None)))
            return
        state = self.agent.cancel(rec.id)
        already = rec.state in FINAL_STATES
        self.reply(d.reply_to, d.correlation_id, {
            **self._ids(req, rec), "action": req.action, "status": "error" if already else "success",
            "state": state.value,
            "message": f"already {rec.state.value.lower()}" if already else "cancel requested"})

    def _do_run_report(self, req: LegacyRequest, d: Delivery) -> None:
        rec = self._find(req)
        if rec is None:
            self.reply(d.reply_to, d.correlation_id, error_reply(req.action, "no such task on this node",
                                                                  **self._ids(req, None)))
            return
        self.reply(d.reply_to, d.correlation_id, {**self._ids(req, rec), **self._report(rec),
                                                  "action": req.action, "status": "success"})

    @staticmethod
    def _report(rec: TaskRecord) -> dict[str, Any]:
        from datetime import datetime

        elapsed = None
        if rec.started and rec.finished:
            fmt = "%Y-%m-%dT%H:%M:%S"
            elapsed = (datetime.strptime(rec.finished[:19], fmt) - datetime.strptime(rec.started[:19], fmt)).seconds
        error = None if rec.state == State.COMPLETED or not rec.final else (rec.message or rec.reason)
        return {"state": rec.state.value, "exit_code": rec.exit_code, "start_time": legacy_time(rec.started),
                "stop_time": legacy_time(rec.finished), "elapsed_time_sec": elapsed, "error": error}

    def _do_health_check(self, req: LegacyRequest, d: Delivery) -> None:
        health = self.service.health()
        paths = {}
        for name, path in (("sandbox", self.sandbox), ("state_dir", self.site.state_dir)):
            paths[name] = {"path": str(path), "exists": path.exists(), "writable": os.access(path, os.W_OK)}
        executors = health["executors"]
        installation = {"fem_hpc": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
                        "executors": {k: v.get("works", False) for k, v in executors.items()}}
        usage = shutil.disk_usage(self.sandbox if self.sandbox.exists() else self.site.state_dir)
        resources = {"cpus": os.cpu_count(), "load": health["load"], "disk_free_bytes": usage.free,
                     "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
        images = self._images()
        ok = all(p["writable"] for p in paths.values()) and any(installation["executors"].values())
        self.reply(d.reply_to, d.correlation_id, {
            **self._ids(req, None), "action": req.action, "status": "success" if ok else "error",
            "checks": {"installation": installation, "paths": paths, "resources": resources, "images": images}})

    def _images(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "docker" in self.site.executors:
            try:
                import docker

                client = docker.from_env(timeout=10)
                out["docker"] = sorted(t for img in client.images.list() for t in img.tags)
            except Exception as exc:
                out["docker"] = {"error": str(exc)}
        sif_dir = self.site.state_dir / "sif"
        if sif_dir.is_dir():
            out["sif"] = sorted(p.name for p in sif_dir.glob("*.sif"))
        return out

    def _do_print_images(self, req: LegacyRequest, d: Delivery) -> None:
        self.reply(d.reply_to, d.correlation_id, {**self._ids(req, None), "action": req.action,
                                                  "status": "success", "images": self._images()})

    def _do_send_files(self, req: LegacyRequest, d: Delivery) -> None:
        workdir = self._workdir(req)
        if not workdir.is_dir():
            self.reply(d.reply_to, d.correlation_id, error_reply(req.action, f"no staged files for execution "
                                                                  f"{req.execution_id}", **self._ids(req, None)))
            return
        files, skipped = collect(workdir, ["**"])
        total = sum(f.stat().st_size for f in files)
        if total > self.cfg.send_files_max_bytes:
            self.reply(d.reply_to, d.correlation_id, error_reply(
                req.action, f"the execution's files are {total} bytes, over the limit of "
                f"{self.cfg.send_files_max_bytes} (legacy.send_files_max_bytes)", **self._ids(req, None)))
            return
        entries = [{"path": str(f.relative_to(workdir)), "size": f.stat().st_size,
                    "data": base64.b64encode(f.read_bytes()).decode()} for f in files]
        self.reply(d.reply_to, d.correlation_id, {**self._ids(req, None), "action": req.action,
                                                  "status": "success", "files": entries, "skipped": skipped})

    # -- replies from task events -----------------------------------------------------------------
    def _on_event(self, task_id: str, event: BaseModel) -> None:
        kind = getattr(event, "type", None)
        state = getattr(event, "state", None)
        if kind == "result" or (kind == "status" and state == State.SUBMITTED and not self.cfg.submit_waits):
            rec = self.journal.get(task_id) if task_id else None
            if rec is None or rec.protocol != "legacy":
                return
            if kind == "result" and not self.cfg.submit_waits and self._submitted_before(rec):
                return  # already answered when the job was submitted
            self._send_submit_reply(rec, result=event if kind == "result" else None)

    def _submitted_before(self, rec: TaskRecord) -> bool:
        return any(t["state"] == State.SUBMITTED.value for t in self.journal.transitions(rec.id))

    def _send_submit_reply(self, rec: TaskRecord, result: Any = None, reply_to: str | None = None,
                           correlation_id: str | None = None) -> None:
        if result is None and rec.result_json and rec.final:
            result = ResultEvent.model_validate_json(rec.result_json)
        task = rec.task
        labels = task.labels
        final = result is not None
        exit_code = result.exit_code if final else None
        status = ("success" if rec.state != State.REJECTED and (not final or result.state == State.COMPLETED)
                  else "error")
        outputs = None
        if final and result.outputs is not None:
            outputs = {"workdir": rec.workdir, "files": task.outputs, "size": result.outputs.size,
                       "sha256": result.outputs.sha256}
        payload = submit_reply(
            execution_id=labels.get("legacy_execution_id", rec.execution_id), tool_id=labels.get("legacy_tool_id", ""),
            task_id=rec.id, user_id=rec.user_id, node=self.site.node, exit_code=exit_code,
            native_id=rec.native_id or (result.native_id if final else None), outputs=outputs, status=status,
            return_code=exit_code if final else None,
            starting_time=result.started if final else None, finish_time=result.finished if final else None,
            message=(rec.message if final else "submitted"))
        if final:
            payload["state"] = result.state.value
            payload["stdout"] = result.stdout_tail
            payload["stderr"] = result.stderr_tail
        self.reply(reply_to or rec.reply_to, correlation_id or rec.correlation_id, payload, task_id=rec.id)
        log.info("%s legacy reply sent (%s)", rec.id, status, extra={"task_id": rec.id, "native_id": rec.native_id})

