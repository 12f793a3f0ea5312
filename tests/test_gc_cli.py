"""`fem-hpc gc [--dry-run]` and the areas of `fem-hpc status`, through the real command line:
the dry run lists and sizes what would go and changes nothing; `gc` then removes exactly that."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fem_hpc.executors import load_site
from fem_hpc.ops.gc import PeriodicGC


def _config(tmp_path: Path) -> dict[str, Any]:
    return {
        "node": "clinode", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "executors": {"local": {"kill_grace_seconds": 1}},
        # 0 days: due at the first pass after the one that saw the result confirmed
        "retention": {"workdirs_days": 0, "keep_failed_days": 0, "journal_days": 0, "idempotency_days": 30},
    }


def test_dry_run_lists_and_sizes_then_gc_removes_exactly_that(tmp_path: Path, cli, write_config, write_task):
    config = write_config(_config(tmp_path))
    ok = write_task({"id": "ok1", "command": ["sh", "-c", "head -c 5000 /dev/zero > big.bin"], "outputs": ["big.bin"]})
    bad = write_task({"id": "bad1", "command": ["sh", "-c", "exit 3"]})
    assert cli("run", "--config", config, ok).returncode == 0
    assert cli("run", "--config", config, bad).returncode == 3
    workdirs = [tmp_path / "work" / "anonymous" / i / i for i in ("ok1", "bad1")]
    assert all(d.is_dir() for d in workdirs)

    first = cli("gc", "--config", config)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "freed: nothing (2 result(s) newly confirmed: their clocks start now)"

    dry = cli("gc", "--config", config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert [ln.split()[2] for ln in lines[:-1]] == ["workdirs", "workdirs", "journal", "journal"]
    assert all(ln.startswith("would remove") for ln in lines[:-1])
    assert lines[-1].startswith("would free: workdirs ") and "journal " in lines[-1]
    assert "(workdirs_days 0)" in dry.stdout and "(keep_failed_days 0)" in dry.stdout
    assert all(d.is_dir() for d in workdirs), "a dry run removes nothing"

    planned = json.loads(cli("gc", "--config", config, "--dry-run", "--json").stdout)
    done = json.loads(cli("gc", "--config", config, "--json").stdout)
    assert planned["dry_run"] and not done["dry_run"]
    assert [(i["area"], i["what"], i["bytes"]) for i in planned["items"]] == \
        [(i["area"], i["what"], i["bytes"]) for i in done["items"]]
    assert all(i["done"] for i in done["items"])
    sizes = {i["what"]: i["bytes"] for i in done["items"] if i["area"] == "workdirs"}
    assert sizes[str(workdirs[0])] > 5000  # big.bin, the archive and the logs
    assert not any(d.exists() for d in workdirs)

    status = cli("status", "--config", config, "--all")
    assert status.returncode == 0
    assert "(no tasks)" in status.stdout  # compacted: only tombstones are left
    for text in ("AREA", "state_dir", "work_root", "KEPT FREE", "last gc", "freed workdirs", "OLDEST KEPT"):
        assert text in status.stdout, text
    # the same for scripts, and for a running service's metrics and health reply (PeriodicGC.last
    # takes the report `fem-hpc gc` saved, also when the service makes no passes of its own)
    as_json = json.loads(cli("status", "--config", config, "--all", "--json").stdout)
    assert as_json["tasks"] == []
    names = {a["name"] for a in as_json["disk"]["areas"]}
    assert {"state_dir", "work_root"} <= names
    assert all(a["free_bytes"] > 0 and a["low"] is False for a in as_json["disk"]["areas"])
    last = as_json["disk"]["last_gc"]
    assert last["freed_bytes"]["workdirs"] == sum(sizes.values()) and last["freed_bytes"]["journal"] > 0
    assert {k["area"] for k in last["kept"]} >= {"workdirs", "journal"}
    site = load_site(config)
    periodic = PeriodicGC(site)
    assert periodic.last is not None and periodic.last.time == last["time"]
    assert periodic.summary()["last"]["freed_bytes"]["workdirs"] == sum(sizes.values())
    assert json.loads(cli("gc", "--config", config, "--json").stdout)["items"] == []
    assert PeriodicGC(site).last.freed()["workdirs"] == 0  # the newest saved pass

    again = cli("run", "--config", config, ok)
    assert again.returncode == 65  # EX_DATAERR: a task id the node has seen
    assert "already ran on this node and finished on " in again.stderr and "outputs expired" in again.stderr
    assert not workdirs[0].exists(), "nothing ran"


def test_gc_on_a_fresh_node_and_a_bad_config(tmp_path: Path, cli, write_config):
    fresh = cli("gc", "--config", write_config(_config(tmp_path)), "--dry-run")
    assert fresh.returncode == 0 and fresh.stdout.strip() == "would free: nothing"
    assert not (tmp_path / "state").exists(), "a dry run creates nothing, not even the journal"
    bad = cli("gc", "--config", write_config({**_config(tmp_path), "retention": {"journal_days": 1}}))
    assert bad.returncode == 78
    assert "retention: Value error" not in bad.stderr
    assert "journal_days (1) must be at least workdirs_days (7)" in bad.stderr
