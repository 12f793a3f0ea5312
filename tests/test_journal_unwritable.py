"""A journal that refuses writes (a real SQLite error, forced with PRAGMA query_only; on a login
node: a full disk or an I/O error) must not cost a message: it is not acked, goes back to the
queue, and is taken once the journal can write again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, unique_node

from fem_hpc.client import Client
from fem_hpc.config import config_from_dict
from fem_hpc.service import Service

pytestmark = pytest.mark.rabbitmq


def test_unwritable_journal_returns_the_message_to_the_queue(tmp_path: Path):
    services.require("rabbitmq")
    node = unique_node("full")
    site = config_from_dict({"node": node, "broker": {"url": BROKER_URL}, "state_dir": str(tmp_path / "state"),
                             "work_root": str(tmp_path / "work"), "executors": {"local": {}}})
    service = Service(site)
    service.JOURNAL_RETRY_SECONDS = 0.2
    db = service.journal._db
    with service.journal._lock:
        db.execute("PRAGMA query_only = ON")  # every write now fails inside SQLite
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    # The service declares its queue when it connects: a message published before would be dropped.
    assert service.consumer.connected.wait(30)
    try:
        with Client(BROKER_URL, node) as c:
            corr = c.publish({"fem": 1, "op": "submit",
                              "task": {"id": "kept", "command": ["sh", "-c", "echo kept"]}})
            time.sleep(2)  # several deliveries fail to be journalled meanwhile
            assert service.journal.get("kept") is None
            assert service.consumer.inflight <= 1
            with service.journal._lock:
                db.execute("PRAGMA query_only = OFF")
            res = c.follow(corr, timeout=60)
        assert res.state == "COMPLETED" and res.result["stdout_tail"] == "kept\n"
    finally:
        service.request_stop()
        runner.join(30)
