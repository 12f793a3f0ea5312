"""Stage-out streams: a 200 MB output goes through the real broker without the service's memory
growing by anything like its size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node

from fem_hpc.client import Client

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

SIZE = 200 * 1024 * 1024


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_200mb_output_streams_with_flat_memory(tmp_path):
    services.require("rabbitmq")
    node = unique_node("mem")
    s = ServeProcess(tmp_path, node).start()
    try:
        assert s.proc is not None
        # Warm up (imports, first task) so the baseline is the service's steady state.
        with Client(BROKER_URL, node) as c:
            assert c.submit({"id": "warm", "command": ["true"]}, timeout=60).state == "COMPLETED"
        before = vm_hwm_kib(s.proc.pid)
        task = {"id": "big", "outputs": ["big.bin"],
                "command": ["sh", "-c", f"head -c {SIZE} /dev/urandom > big.bin"]}
        with Client(BROKER_URL, node) as c:
            res = c.submit(task, timeout=300, outputs_dir=tmp_path / "out")
        assert res.state == "COMPLETED"
        after = vm_hwm_kib(s.proc.pid)
        received = tmp_path / "out/outputs/big.bin"
        assert received.stat().st_size == SIZE
        workdir_file = tmp_path / "work/anonymous/big/big/big.bin"
        assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(workdir_file.read_bytes()).digest()
        assert res.result["outputs"]["chunks"] >= 200
        growth_mib = (after - before) / 1024
        assert growth_mib < 64, f"service peak RSS grew by {growth_mib:.0f} MiB for a 200 MiB output"
    finally:
        s.stop()
