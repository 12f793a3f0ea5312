"""A client written from PROTOCOL.md alone (plain pika, no fem_hpc code) against `fem-hpc serve`:
every rule of the wire contract that a receiver can observe is checked here."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import uuid

import pika
import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node

pytestmark = pytest.mark.rabbitmq

STATUS_KEYS = {"fem", "type", "node", "task_id", "seq", "state", "time", "native_id", "message", "labels"}
RESULT_KEYS = {"fem", "type", "node", "task_id", "seq", "state", "exit_code", "reason", "errors", "started",
               "finished", "outputs", "stdout_tail", "stderr_tail", "labels"}


def test_submit_as_the_protocol_describes_it(tmp_path):
    services.require("rabbitmq")
    node = unique_node("conf")
    serve = ServeProcess(tmp_path, node).start()
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        ch = conn.channel()
        reply = ch.queue_declare("", exclusive=True).method.queue
        ch.exchange_declare("fem.events", exchange_type="topic", durable=True)
        topic = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(topic, "fem.events", routing_key=f"{node}.#")
        corr = str(uuid.uuid4())
        task = {"id": "conf-1", "command": ["sh", "-c", "mkdir -p o; head -c 2500000 /dev/urandom > o/w.bin;"
                                            " echo out; echo err >&2"],
                "outputs": ["o/*"], "labels": {"round": "1"}}
        ch.basic_publish("", node, json.dumps({"fem": 1, "op": "submit", "task": task}).encode(),
                         pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                              message_id=str(uuid.uuid4()), correlation_id=corr, reply_to=reply))
        messages = []
        deadline = time.monotonic() + 60
        for method, props, body in ch.consume(reply, auto_ack=True, inactivity_timeout=0.5):
            assert time.monotonic() < deadline, "no result in time"
            if method is None:
                continue
            assert props.correlation_id == corr
            messages.append((props, body))
            if props.type != "chunk" and json.loads(body)["type"] == "result":
                break
        ch.cancel()

        seqs, chunks, statuses = [], {}, []
        for props, body in messages:
            if props.type == "chunk":
                h = props.headers
                assert props.content_type == "application/octet-stream"
                assert set(h) >= {"fem", "task_id", "seq", "index", "total", "sha256"} and h["fem"] == 1
                assert len(body) <= 1024 * 1024
                chunks[h["index"]] = body
                seqs.append(h["seq"])
                continue
            event = json.loads(body)
            seqs.append(event["seq"])
            if event["type"] == "status":
                assert set(event) == STATUS_KEYS, set(event) ^ STATUS_KEYS
                assert event["labels"] == {"round": "1"} and event["node"] == node
                statuses.append(event["state"])
        result = json.loads(messages[-1][1])
        assert set(result) >= RESULT_KEYS
        # seq grows by one per event of the task, chunks and the result included.
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert statuses == ["RECEIVED", "STAGING_IN", "SUBMITTED", "RUNNING", "STAGING_OUT", "COMPLETED"]
        assert result["state"] == "COMPLETED" and result["exit_code"] == 0 and result["errors"] == []
        out = result["outputs"]
        assert out["format"] == "tar.gz" and out["chunks"] == len(chunks) == 3
        archive = b"".join(chunks[i] for i in range(out["chunks"]))
        assert len(archive) == out["size"] and hashlib.sha256(archive).hexdigest() == out["sha256"]
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            names = set(tar.getnames())
            assert {"outputs/o/w.bin", "logs/stdout", "logs/stderr"} <= names
            assert tar.extractfile("logs/stdout").read() == b"out\n"
        assert result["stderr_tail"] == "err\n"

        # The same events on fem.events, routed as <node>.<task_id>.<type>.
        keys = []
        for method, _props, _body in ch.consume(topic, auto_ack=True, inactivity_timeout=1):
            if method is None:
                break
            keys.append(method.routing_key)
        assert set(keys) == {f"{node}.conf-1.status", f"{node}.conf-1.chunk", f"{node}.conf-1.result"}
        assert len(keys) == len(messages)
    finally:
        conn.close()
        serve.stop()
