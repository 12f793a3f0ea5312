"""The lifecycle with its protocol frontends, without a broker: what lands in the outbox.

Regression tests of the redesign (issue 10): a duplicate legacy submit sends no v1 frame to the
legacy reply queue; the legacy reply is written in the final transition's transaction (a failed
write delays it, never loses it); a dead-lettered legacy request keeps no token.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from fem_hpc.broker.consumer import Delivery
from fem_hpc.config import config_from_dict
from fem_hpc.journal import Journal, Route
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State
from fem_hpc.protocols.legacy.codec import decode_reply
from fem_hpc.protocols.legacy.frontend import LegacyFrontend
from fem_hpc.protocols.legacy.handler import LegacyHandler
from fem_hpc.protocols.v1.dispatch import V1Dispatch
from fem_hpc.protocols.v1.frontend import V1Frontend

V1_TYPES = {"status", "result", "chunk"}
TOKEN = "tok-SECRET-4242"


def make(tmp_path: Path, **legacy: Any) -> tuple[Agent, Journal, Any]:
    site = config_from_dict({"node": "fe", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
                             "legacy": {"enabled": True, "reply_chunk_size": 64, **legacy}})
    journal = Journal(site.journal_path)
    frontends = {"v1": V1Frontend(site.node, site.broker.events_exchange),
                 "legacy": LegacyFrontend(site.node, site.broker.events_exchange, site.legacy)}
    return Agent(site, journal, frontends=frontends), journal, site


def rows_to(journal: Journal, queue: str) -> list[Any]:
    return [r for r in journal.pending(limit=10_000) if ("", queue) in r.destinations]


def legacy_reply(rows: list[Any], correlation_id: str) -> dict[str, Any]:
    bodies = [r.payload() for r in rows if r.properties.get("correlation_id") == correlation_id]
    return decode_reply(bodies)


TASK = {"id": "dup1", "command": ["sh", "-c", "echo out; mkdir -p o; echo 1 > o/x"], "outputs": ["o"]}


def test_duplicate_legacy_submit_sends_only_legacy_frames(tmp_path: Path) -> None:
    agent, journal, _ = make(tmp_path)
    try:
        assert agent.intake(TASK, Route("legacy", "legacy-q", "c1")).created
        assert agent.wait("dup1", 30).state == State.COMPLETED
        again = agent.intake(TASK, Route("legacy", "legacy-q", "c2"))
        assert not again.created
    finally:
        agent.close()
    rows = rows_to(journal, "legacy-q")
    v1 = [r for r in rows if r.properties.get("type") in V1_TYPES or r.properties.get("headers", {}).get("fem")]
    assert v1 == [], [r.properties for r in v1]
    for corr in ("c1", "c2"):  # the first answer, and the duplicate's: the same final reply
        reply = legacy_reply(rows, corr)
        assert reply["status"] == "success" and reply["fem_hpc"]["state"] == "COMPLETED" and reply["return_code"] == 0
        # the original's shape: `result` is what the command printed (not JSON here: its stdout)
        assert reply["task_id"] == "dup1" and reply["result"] == {"stdout": "out\n"}
    # fem.events subscribers still see every v1 event of the task, and the chunks, on the topic exchange
    topic = [r for r in journal.pending(limit=10_000) if any(ex == "fem.events" for ex, _ in r.destinations)]
    assert {r.properties["type"] for r in topic} >= {"status", "result", "chunk"}


def test_duplicate_v1_submit_gets_v1_frames_to_its_own_reply_queue(tmp_path: Path) -> None:
    agent, journal, _ = make(tmp_path)
    try:
        agent.intake(TASK, Route("v1", "v1-q", "a"))
        agent.wait("dup1", 30)
        agent.intake(TASK, Route("v1", "v1-other", "b"))
    finally:
        agent.close()
    again = rows_to(journal, "v1-other")
    assert [r.properties["type"] for r in again] == ["status", "chunk", "result"]
    assert all(r.properties["correlation_id"] == "b" for r in again)


def test_legacy_reply_survives_a_failed_final_write(tmp_path: Path, monkeypatch: Any) -> None:
    """The final transition (and the reply in it) fails twice, as on a full disk: nothing is
    committed half, and once the journal takes writes again the reply is there, exactly once."""
    agent, journal, _ = make(tmp_path)
    real = journal.transition
    failures = []

    def flaky(task_id: str, state: State, *args: Any, **kw: Any) -> int:
        if state.final and len(failures) < 2:
            failures.append(state)
            raise sqlite3.OperationalError("database or disk is full")
        return real(task_id, state, *args, **kw)

    monkeypatch.setattr(journal, "transition", flaky)
    try:
        agent.intake(TASK, Route("legacy", "legacy-q", "c1"))
        rec = agent.wait("dup1", 60)
        assert rec is not None and rec.state == State.COMPLETED, rec
    finally:
        agent.close()
    assert len(failures) == 2
    rows = rows_to(journal, "legacy-q")
    starts = [r for r in rows if json.loads(r.payload())["type"] == "chunk_start"]
    assert len(starts) == 1
    assert legacy_reply(rows, "c1")["fem_hpc"]["state"] == "COMPLETED"


def test_final_write_failing_until_restart_is_answered_after_it(tmp_path: Path, monkeypatch: Any) -> None:
    """The service stops while the final write still fails: the task is left in STAGING_OUT (not
    final, no reply), and the next start finishes it and sends the reply."""
    agent, journal, site = make(tmp_path)

    def broken(task_id: str, state: State, *args: Any, **kw: Any) -> int:
        if state.final:
            agent._closing = True  # the service is stopping meanwhile
            raise sqlite3.OperationalError("disk I/O error")
        return Journal.transition(journal, task_id, state, *args, **kw)

    monkeypatch.setattr(journal, "transition", broken)
    agent.intake(TASK, Route("legacy", "legacy-q", "c1"))
    agent.wait("dup1", 10)
    agent.close()
    assert journal.get("dup1").state == State.STAGING_OUT
    assert rows_to(journal, "legacy-q") == []
    journal.close()
    journal2 = Journal(site.journal_path)
    frontends = {"legacy": LegacyFrontend(site.node, site.broker.events_exchange, site.legacy)}
    agent2 = Agent(site, journal2, frontends=frontends)
    try:
        assert agent2.recover() == 1
        assert agent2.wait("dup1", 30).state == State.COMPLETED
    finally:
        agent2.close()
    assert legacy_reply(rows_to(journal2, "legacy-q"), "c1")["fem_hpc"]["state"] == "COMPLETED"


def delivery(body: bytes) -> Delivery:
    return Delivery(body=body, reply_to="legacy-q", correlation_id="x1", message_id="m1", headers={},
                    ack=lambda: None, nack=lambda: None)


def test_dead_lettered_legacy_request_keeps_no_token(tmp_path: Path) -> None:
    agent, journal, site = make(tmp_path)
    handler = LegacyHandler(site, journal, agent, lambda: {})
    try:
        # a bad task_info literal: the request cannot be decoded, and goes to <queue>.rejected
        handler.handle(delivery(f"submit_run|tool1|{{'a': __import__('os')}}|{{}}|{{}}|u1|None|{{}}|{TOKEN}".encode()))
        handler.handle(delivery(f"no_such|tool1|{{}}|{{}}|{{}}|u1|None|{{}}|{TOKEN}".encode()))
    finally:
        agent.close()
    everything = b"".join(r.payload() + json.dumps(r.properties).encode() for r in journal.pending(limit=1000))
    assert TOKEN.encode() not in everything
    rejected = [r for r in journal.pending(limit=1000) if ("", f"{site.queue}.rejected") in r.destinations]
    assert rejected and all(b"<token redacted>" in r.payload() for r in rejected)
    assert rejected[0].properties["headers"]["x-fem-reason"] == "invalid legacy request"


def test_a_legacy_request_to_a_v1_only_node_is_refused_without_its_token(tmp_path: Path) -> None:
    """legacy.enabled false: the body is refused by the v1 dispatcher, and its dead-letter copy
    (written with the REJECTED reply, in one transaction) keeps no token either."""
    site = config_from_dict({"node": "fe1", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work")})
    journal = Journal(site.journal_path)
    agent = Agent(site, journal, frontends={"v1": V1Frontend(site.node, site.broker.events_exchange)})
    dispatch = V1Dispatch(site, journal, agent, lambda: {}, legacy_enabled=False)
    puts: list[int] = []
    real_put = journal.put
    journal.put = lambda *messages: (puts.append(len(messages)), real_put(*messages))[1]  # type: ignore[method-assign]
    try:
        dispatch.handle(delivery(f"submit_run|tool1|{{}}|{{}}|{{}}|u1|None|{{}}|{TOKEN}".encode()))
    finally:
        agent.close()
    rows = journal.pending(limit=1000)
    everything = b"".join(r.payload() + json.dumps(r.properties).encode() for r in rows)
    assert TOKEN.encode() not in everything
    [copy] = [r for r in rows if ("", f"{site.queue}.rejected") in r.destinations]
    assert copy.payload().endswith(b"|<token redacted>") and copy.payload().startswith(b"submit_run|tool1|")
    [reply] = [r for r in rows if ("", "legacy-q") in r.destinations]
    body = json.loads(reply.payload())
    assert body["state"] == "REJECTED" and "legacy FEM protocol is not enabled" in json.dumps(body["errors"])
    assert puts == [2]  # the reply and the copy in one transaction
    journal.close()
