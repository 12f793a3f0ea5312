"""Site config: YAML loads into the model; a bad config lists every problem with its key path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from fem_hpc.config import ConfigError, SiteConfig
from fem_hpc.executors import load_site, site_from_dict

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "etc" / "fem-hpc.example.yaml"


def problems_of(raw: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        site_from_dict(raw, **kwargs)
    return info.value.problems


def test_valid_yaml_loads(tmp_path: Path, write_config) -> None:
    vol = tmp_path / "data"
    vol.mkdir()
    path = write_config({
        "node": "n1",
        "broker": {"url": "amqp://u:p@127.0.0.1:5672/%2F", "prefetch": 4},
        "state_dir": str(tmp_path / "state"),
        "work_root": str(tmp_path / "work"),
        "default_executor": "local",
        "executors": {"local": {"kill_grace_seconds": 2.5}},
        "volumes": {"data": {"path": str(vol), "mode": "rw"}},
        "policy": {"images": ["127.0.0.1:5000/*"], "git": ["file://*"],
                   "max_resources": {"cpus": 16, "memory": "64G", "walltime": "24:00:00", "gpus": 0}},
    })
    cfg = load_site(path)
    assert cfg.node == "n1"
    assert cfg.queue == "n1"  # defaults to the node
    assert cfg.broker.prefetch == 4
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.journal_path == tmp_path / "state" / "journal.sqlite"
    assert cfg.executors == {"local": {"kill_grace_seconds": 2.5}}
    assert cfg.volumes["data"].path == vol.resolve() and cfg.volumes["data"].mode == "rw"
    assert cfg.policy.max_resources.memory == "64G"
    assert cfg.policy.default_resources.cpus == 1  # built-in default


def test_minimal_config_defaults(site: dict[str, Any]) -> None:
    del site["executors"]
    cfg = site_from_dict(site)
    assert cfg.default_executor == "local" and "local" in cfg.executors
    assert cfg.broker.url.startswith("amqp://")
    assert cfg.policy.images == [] and cfg.policy.git == []  # nothing allowed unless the site says so


def test_bad_config_lists_every_problem(tmp_path: Path) -> None:
    raw = {
        "node": "bad/node",
        "state_dir": str(tmp_path / "s"),
        "work_root": str(tmp_path / "w"),
        "broker": {"prefetch": 0, "url": "http://x", "colour": "red"},
        "default_executor": "slurm",
        "executors": {"local": {"kill_grace_seconds": -1, "grace": 3}},
        "volumes": {"gone": {"path": str(tmp_path / "missing")}, "nopath": {"mode": "ro"}},
        "policy": {"max_resources": {"memory": "lots"}},
        "frobnicate": True,
    }
    problems = problems_of(raw)
    keys = [p.split(":", 1)[0] for p in problems]
    expected = {
        "node",
        "broker.prefetch",
        "broker.url",
        "broker.colour",
        "default_executor",
        "executors.local.kill_grace_seconds",
        "executors.local.grace",
        "volumes.gone.path",
        "volumes.nopath.path",
        "policy.max_resources.memory",
        "frobnicate",
    }
    assert expected <= set(keys), problems
    text = "\n".join(problems)
    assert "broker.colour: unknown key" in text
    assert "frobnicate: unknown key" in text
    assert "executors.local.grace: unknown key" in text
    assert "'slurm' is not configured" in text
    assert f"{tmp_path / 'missing'}" in text and "does not exist" in text
    assert "volumes.nopath.path: Field required" in text


def test_default_executor_not_configured_alone(site: dict[str, Any]) -> None:
    site["default_executor"] = "pbs"
    problems = problems_of(site)
    assert len(problems) == 1 and problems[0].startswith("default_executor:"), problems


def test_unknown_executor_type(site: dict[str, Any]) -> None:
    site["executors"]["mine"] = {"type": "no-such-executor"}
    problems = problems_of(site)
    assert any(p.startswith("executors.mine.type:") and "no-such-executor" in p for p in problems), problems


def test_missing_required_keys() -> None:
    problems = problems_of({})
    assert {p.split(":", 1)[0] for p in problems} >= {"node", "state_dir", "work_root"}


def test_top_level_not_a_mapping() -> None:
    assert problems_of(["node"]) == ["(top level): must be a mapping of keys"]


def test_templates_dir_must_exist(tmp_path: Path, site: dict[str, Any]) -> None:
    site["templates_dir"] = str(tmp_path / "no-templates")
    assert problems_of(site) == [f"templates_dir: {str(tmp_path / 'no-templates')!r} is not a directory"]
    (tmp_path / "no-templates").mkdir()
    assert site_from_dict(site).templates_dir == tmp_path / "no-templates"


def test_volume_paths_may_be_skipped(tmp_path: Path, site: dict[str, Any]) -> None:
    site["volumes"] = {"later": {"path": str(tmp_path / "not-yet")}}
    cfg = site_from_dict(site, check_paths=False)
    assert "later" in cfg.volumes


def test_env_expansion(monkeypatch: pytest.MonkeyPatch, site: dict[str, Any]) -> None:
    monkeypatch.delenv("FEM_HPC_BROKER_URL", raising=False)
    monkeypatch.setenv("FEMTEST_PASSWORD", "s3cret")
    monkeypatch.setenv("FEMTEST_NODE", "node-from-env")
    site["node"] = "${FEMTEST_NODE}"
    site["broker"] = {"url": "amqp://fem:${FEMTEST_PASSWORD}@127.0.0.1:5672/%2F"}
    cfg = site_from_dict(site)
    assert cfg.node == "node-from-env"
    assert cfg.broker.url == "amqp://fem:s3cret@127.0.0.1:5672/%2F"


def test_missing_env_var_is_a_problem(monkeypatch: pytest.MonkeyPatch, site: dict[str, Any]) -> None:
    monkeypatch.delenv("FEM_HPC_BROKER_URL", raising=False)
    monkeypatch.delenv("FEMTEST_NOT_SET", raising=False)
    site["broker"] = {"url": "amqp://fem:${FEMTEST_NOT_SET}@127.0.0.1/%2F", "prefetch": -5}
    problems = problems_of(site)
    assert "broker.url: environment variable FEMTEST_NOT_SET is not set" in problems
    assert any(p.startswith("broker.prefetch:") for p in problems)  # listed together


def test_broker_url_override(monkeypatch: pytest.MonkeyPatch, site: dict[str, Any]) -> None:
    monkeypatch.setenv("FEM_HPC_BROKER_URL", "amqps://node:pw@broker.example:5671/fem")
    site["broker"] = {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "prefetch": 3}
    cfg = site_from_dict(site)
    assert cfg.broker.url == "amqps://node:pw@broker.example:5671/fem"
    assert cfg.broker.prefetch == 3
    del site["broker"]
    assert site_from_dict(site).broker.url == "amqps://node:pw@broker.example:5671/fem"


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_site(tmp_path / "nope.yaml")
    assert "cannot read the file" in info.value.problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_site(bad)
    assert "not valid YAML" in info.value.problems[0]
    assert str(bad) in info.value.render()


def test_cli_bad_config_exits_78_without_traceback(tmp_path: Path, write_config, write_task, cli) -> None:
    config = write_config({
        "node": "n1",
        "state_dir": str(tmp_path / "state"),
        "work_root": str(tmp_path / "work"),
        "broker": {"prefetch": 0},
        "executors": {"local": {"kill_grace_secs": 1}},
        "volumes": {"d": {"path": str(tmp_path / "missing")}},
        "surprise": 1,
    })
    task = write_task({"id": "t1", "command": ["true"]})
    proc = cli("run", "--config", config, task)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"invalid config {config}" in proc.stderr
    for key in ("broker.prefetch", "executors.local.kill_grace_secs", "volumes.d.path", "surprise"):
        assert f"  - {key}:" in proc.stderr, proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "state").exists()


def test_cli_missing_config_file(tmp_path: Path, write_task, cli) -> None:
    proc = cli("run", "--config", tmp_path / "absent.yaml", write_task({"id": "t1", "command": ["true"]}))
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr and "cannot read the file" in proc.stderr


# -- the documented example --------------------------------------------------------------------
def test_example_config_loads() -> None:
    cfg = load_site(EXAMPLE)
    assert cfg.default_executor in cfg.executors
    assert set(cfg.executors) == {"local"}
    for vol in cfg.volumes.values():
        assert vol.path.exists()


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of `model`, dotted; `*` stands for the free key of a dict of models (a registry host)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out += _keys(candidate, f"{prefix}{name}.")
            for inner in getattr(candidate, "__args__", ()) if getattr(candidate, "__origin__", None) is dict else ():
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    out += _keys(inner, f"{prefix}{name}.*.")
    return out


_KEY_LINE = re.compile(r"^[\s#]*([^\s#:][^\s]*?):(\s|$)")  # a host or URL prefix is a key too


def _key_lines(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line number, indent, key) of every `key:` line, set or commented out (`#   key:`)."""
    out = []
    for i, line in enumerate(lines):
        m = _KEY_LINE.match(line)
        if m:
            out.append((i, m.start(1), m.group(1)))
    return out


def _find(keys: list[tuple[int, int, str]], path: list[str], lo: int = 0, hi: int | None = None,
          indent: int = -1) -> int | None:
    """The line of `path` inside the block keys[lo:hi] (whose parent key is at `indent`)."""
    hi = len(keys) if hi is None else hi
    for n in range(lo, hi):
        _, ind, key = keys[n]
        if ind <= indent:
            break
        if path[0] not in ("*", key):
            continue
        if len(path) == 1:
            return keys[n][0]
        end = next((m for m in range(n + 1, hi) if keys[m][1] <= ind), hi)
        found = _find(keys, path[1:], n + 1, end, ind)
        if found is not None:
            return found
    return None


def test_example_documents_every_key() -> None:
    """Each key of the site config appears in the example under its own section (a `max_bytes` of
    `retention.caches.git` is not satisfied by `stage_out.max_bytes`), with a comment on it or above."""
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    loaded = yaml.safe_load(text)
    keys = _key_lines(lines)
    for dotted in _keys(SiteConfig):
        at = _find(keys, dotted.split("."))
        assert at is not None, f"{dotted} is not in {EXAMPLE.name} under its section"
        assert any("#" in lines[i] or (i > 0 and lines[i - 1].lstrip().startswith("#"))
                   for i in (at,)), f"{dotted} (line {at + 1}) has no comment"
    assert isinstance(loaded, dict) and loaded["node"]
