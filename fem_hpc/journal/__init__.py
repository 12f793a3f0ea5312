"""The durable journal (SQLite, WAL): tasks, transitions, the outbox, the retention tables, and a
read-only view. This package is the only place with SQL."""

from .core import Journal, Message, OutboxRow, Route, TaskRecord
from .reader import STATUS_COLUMNS, JournalReader
from .retention import Compacted, CompactionDue, RemoteDue, RetentionTables, Tombstone, WorkdirDue

__all__ = ["STATUS_COLUMNS", "Compacted", "CompactionDue", "Journal", "JournalReader", "Message", "OutboxRow",
           "RemoteDue", "RetentionTables", "Route", "TaskRecord", "Tombstone", "WorkdirDue"]
