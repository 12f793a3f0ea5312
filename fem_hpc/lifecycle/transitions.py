"""One state change = one journal transaction holding the frontend's messages for it.

Every status event, result and chunk of a task is built here and handed to the frontend of the
task's protocol (or, for an answer, of the requester's), whose messages are written in the same
transaction as the change they report: no reply can be lost between two transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..journal import Journal, Message, Route, TaskRecord, Tombstone
from ..model import OutputsInfo, ResultEvent, State, StatusEvent, utcnow
from .ports import Chunk, Frontend, Silent, TaskEvent, TaskView
from .tasks import TaskRegistry

log = logging.getLogger("fem_hpc.lifecycle")

Observer = Callable[[str, BaseModel], None]
_SILENT = Silent()


class Transitions:
    def __init__(self, node: str, journal: Journal, registry: TaskRegistry, frontends: Mapping[str, Frontend],
                 observers: list[Observer]):
        self.node = node
        self.journal = journal
        self.registry = registry
        self.frontends = frontends
        # Display hooks (progress lines of `fem-hpc run`), called after the commit. They carry no
        # replies: everything sent anywhere is written by a frontend inside the transaction.
        self.observers = observers

    def frontend(self, route: Route) -> Frontend:
        return self.frontends.get(route.protocol, _SILENT)

    def messages(self, view: TaskView | None, event: TaskEvent, to: Route | None = None,
                  note: str | None = None) -> list[Message]:
        route = to if to is not None else view.route if view is not None else None
        if route is None:
            return []
        return self.frontend(route).messages(view, event, to=to, note=note)

    def notify(self, task_id: str, event: BaseModel) -> None:
        for observer in list(self.observers):
            try:
                observer(task_id, event)
            except Exception:
                log.exception("event observer failed", extra={"task_id": task_id})

    def status_event(self, view: TaskView, state: State, seq: int, message: str | None) -> StatusEvent:
        return StatusEvent(node=self.node, task_id=view.task.id, seq=seq, state=state, time=utcnow(),
                           native_id=view.native_id, message=message, labels=view.task.labels)

    # -- the task's own events ---------------------------------------------------------------
    def change(self, task_id: str, state: State, *, message: str | None = None, native_id: str | None = None,
               **fields: Any) -> None:
        if native_id is not None:
            fields["native_id"] = native_id
            self.registry.set_native_id(task_id, native_id)
        view = self.registry.view(task_id)
        built: list[StatusEvent] = []

        def make(seq: int) -> list[Message]:
            ev = self.status_event(view, state, seq, message)
            built.append(ev)
            return self.messages(view, ev, note=message)

        self.journal.transition(task_id, state, make, message=message, **fields)
        log.info("%s %s%s", task_id, state.value, f": {message}" if message else "",
                 extra={"task_id": task_id, "native_id": view.native_id})
        self.notify(task_id, built[0])

    def final(self, task_id: str, result: ResultEvent, message: str | None) -> None:
        """The terminal status event and the result (and whatever the frontend answers with
        them, e.g. a legacy reply), committed together."""
        view = self.registry.view(task_id)
        built: list[BaseModel] = []

        def status(seq: int) -> list[Message]:
            ev = self.status_event(view, result.state, seq, message)
            built.append(ev)
            return self.messages(view, ev, note=message)

        def final_result(seq: int) -> list[Message]:
            ev = result.model_copy(update={"seq": seq})
            built.append(ev)
            return self.messages(view, ev, note=message)

        self.journal.transition(
            task_id, result.state, status, message=message, exit_code=result.exit_code,
            reason=result.reason.value if result.reason else None, started=result.started,
            finished=result.finished, result_json=result.model_dump_json(), also=[final_result])
        log.info("%s %s%s", task_id, result.state.value, f": {message}" if message else "",
                 extra={"task_id": task_id, "native_id": view.native_id})
        for ev in built:
            self.notify(task_id, ev)

    def chunks(self, view: TaskView, archive: Path, info: OutputsInfo, chunk_bytes: int,
               to: Route | None = None) -> None:
        """Queue the archive's chunks as file references (the rows never hold the bytes)."""
        task_id = view.task.id
        makers = []
        for index in range(info.chunks):
            offset = index * chunk_bytes
            length = min(chunk_bytes, info.size - offset)
            makers.append(lambda seq, i=index, o=offset, n=length: self.messages(
                view, Chunk(task_id, seq, i, info.chunks, info.sha256, (str(archive), o, n)), to=to))
        self.journal.events(task_id, makers)

    def tombstone_status(self, tomb: Tombstone, seq: int) -> StatusEvent:
        """The final status of a task retention compacted, as its tombstone keeps it."""
        return StatusEvent(node=self.node, task_id=tomb.id, seq=seq, state=tomb.state, time=utcnow(),
                           message=tomb.note(), labels=tomb.labels)

    # -- answers -----------------------------------------------------------------------------------
    def answer(self, task_id: str, record: TaskRecord | None, note: str | None, to: Route) -> State:
        """One status event with the task's current state for whoever asked; UNKNOWN, outside any
        task's seq, for a task this node never saw."""
        if record is None:
            tomb = self.journal.retention.tombstone_events(
                task_id, [lambda tomb, seq: self.messages(None, self.tombstone_status(tomb, seq), to=to)])
            if tomb is not None:
                return tomb.state  # compacted by retention: its final state, from the tombstone
            ev = StatusEvent(node=self.node, task_id=task_id, seq=0, state=State.UNKNOWN, time=utcnow(),
                             message="this node has never seen this task")
            self.journal.put(*self.messages(None, ev, to=to))
            return State.UNKNOWN
        view = TaskView.of(record)
        self.journal.event(task_id, lambda seq: self.messages(
            view, self.status_event(view, record.state, seq, note), to=to, note=note))
        return record.state

    def resend(self, record: TaskRecord, to: Route, chunk_bytes: int, archive: Path) -> None:
        """Re-send a task's current status (and its result and chunks when final) to `to`, through
        the requester's own frontend, with fresh seqs."""
        self.answer(record.id, record, record.message, to)
        if not (record.final and record.result_json):
            return
        stored = ResultEvent.model_validate_json(record.result_json)
        view = TaskView.of(record)
        if stored.outputs is not None:
            if archive.is_file() and archive.stat().st_size == stored.outputs.size:
                self.chunks(view, archive, stored.outputs, chunk_bytes, to=to)
            else:  # the work dir was cleaned since: say so rather than promise chunks
                stored = stored.model_copy(update={"outputs": None})
        self.journal.event(record.id, lambda seq: self.messages(
            view, stored.model_copy(update={"seq": seq}), to=to, note=record.message))
