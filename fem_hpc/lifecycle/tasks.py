"""The in-memory side of the tasks this process carries: their views (task + route), the event a
waiter blocks on until the task is final, and secrets that must never reach the journal."""

from __future__ import annotations

import threading

from ..journal import Journal
from .ports import TaskView


class TaskRegistry:
    def __init__(self, journal: Journal):
        self.journal = journal
        self._lock = threading.Lock()
        self._views: dict[str, TaskView] = {}
        self._finals: dict[str, threading.Event] = {}
        self._secrets: dict[str, dict[str, str]] = {}  # by task id; memory only, never journalled

    def view(self, task_id: str) -> TaskView:
        with self._lock:
            view = self._views.get(task_id)
        if view is None:
            record = self.journal.get(task_id)
            assert record is not None, task_id
            view = TaskView.of(record)
            with self._lock:
                self._views.setdefault(task_id, view)
        return view

    def remember(self, view: TaskView, secret_env: dict[str, str] | None = None) -> None:
        with self._lock:
            self._views[view.task.id] = view
            self._finals.setdefault(view.task.id, threading.Event())
            if secret_env:
                self._secrets[view.task.id] = dict(secret_env)

    def set_native_id(self, task_id: str, native_id: str) -> None:
        with self._lock:
            view = self._views.get(task_id)
            if view is not None:
                view.native_id = native_id

    def secret_env(self, task_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._secrets.get(task_id, {}))

    def final_event(self, task_id: str) -> threading.Event:
        with self._lock:
            return self._finals.setdefault(task_id, threading.Event())

    def finished(self, task_id: str) -> None:
        """The task is final: drop what was kept for it and wake its waiters."""
        with self._lock:
            done = self._finals.setdefault(task_id, threading.Event())
            self._views.pop(task_id, None)
            self._secrets.pop(task_id, None)
        done.set()
