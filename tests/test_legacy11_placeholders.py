"""Placeholders of the real FEM documents: %%name%% from the request, $NAME only from the site."""

from __future__ import annotations

from pathlib import Path

import pytest
from femkit import flcore_document

from fem_hpc.config import ConfigError, LegacyVariable, config_from_dict
from fem_hpc.protocols.legacy.errors import DocumentError
from fem_hpc.protocols.legacy.placeholders import (
    PlaceholderContext,
    SiteVariables,
    resolve_document,
    resolve_text,
    resolve_value,
)

USER = "0e8f509e-3d43-4346-96da-aa744e7e8a75"
EXECUTION = "1e7b5310-7a2e-4f89-a4f7-320a89f67217"
SANDBOX = Path("/srv/fem/sandbox")
CTX = PlaceholderContext(user_id=USER, execution_id=EXECUTION, node_name="UB2", task_id="flcore-server",
                         tool_id="flcore")
DECLARED = {
    "HOST_FEMC_PATH": LegacyVariable(value="/opt/fem-client"),
    "DATA_PATH": LegacyVariable(value="/data", mode="ro"),
    "FLOWER_SSL_CACERT": LegacyVariable(value="/app/config/certificates/rootCA_cert.pem", mode="none"),
    "FLOWER_SSL_SERVER_CERT": LegacyVariable(value="/app/config/certificates/UB2_server_cert.pem", mode="none"),
    "FLOWER_SSL_SERVER_KEY": LegacyVariable(value="/app/config/certificates/UB2_server_key.pem", mode="none"),
}
VARS = SiteVariables.from_site(DECLARED, node="UB2", sandbox=SANDBOX)


def test_the_real_document_resolves_completely() -> None:
    info, params, errors = resolve_document(flcore_document(), {"num_clients": 3}, CTX, VARS)
    assert errors == []
    assert [v["host_path"] for v in info["volumes"]] == [
        "/srv/fem/sandbox/flcore",
        "/opt/fem-client/config/rabbitmq-certificates",
        f"/srv/fem/sandbox/{USER}/{EXECUTION}",
    ]
    assert info["var_envs"] == {
        "FLOWER_CENTRAL_SERVER_IP": "0.0.0.0",
        "FLOWER_CENTRAL_SERVER_PORT": "4433",
        "FLOWER_SSL_CACERT": "/app/config/certificates/rootCA_cert.pem",
        "NODE_NAME": "UB2",
        "FLOWER_SSL_SERVER_CERT": "/app/config/certificates/UB2_server_cert.pem",
        "FLOWER_SSL_SERVER_KEY": "/app/config/certificates/UB2_server_key.pem",
    }
    # non-string defaults are kept as they are; nothing else of the document changed
    assert [a["default_value"] for a in info["command"]["args"]][:2] == [1, 5]
    assert params == {"num_clients": 3}
    assert info["image"] == flcore_document()["image"]


def test_placeholders_in_arguments_and_parameters() -> None:
    doc = flcore_document()
    doc["command"]["args"].append({"id": "node_name", "type": "str", "default_value": "%%node_name%%",
                                   "prefix": "--node_name"})
    info, params, errors = resolve_document(
        doc, {"run": "%%tool_id%%-%%task_id%%-%%execution_id%%", "price": "$5", "note": "$HOME"}, CTX, VARS)
    assert errors == []
    assert info["command"]["args"][-1]["default_value"] == "UB2"
    # a user's parameter: %%name%% is filled in, a leading '$' is plain text (never a site variable)
    assert params == {"run": f"flcore-flcore-server-{EXECUTION}", "price": "$5", "note": "$HOME"}


@pytest.mark.parametrize("name", ["HOME", "FEM_HPC_BROKER_URL", "PATH", "SLURM_CONF"])
def test_the_services_environment_is_never_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "/leaked/value")
    for value in (f"${name}", f"${name}/x"):
        with pytest.raises(DocumentError) as exc:
            resolve_text(value, "task_info.var_envs.X", CTX, VARS)
        assert exc.value.field == "task_info.var_envs.X"
        assert f"${name} is not a variable this site declares" in exc.value.reason
        assert "/leaked/value" not in exc.value.message


def test_hostile_values_in_a_document_each_name_the_field() -> None:
    doc = flcore_document()
    doc["var_envs"]["SECRET"] = "$FEM_HPC_BROKER_URL"
    doc["volumes"].append({"host_path": "$HOME/.ssh", "container_path": "/keys"})
    doc["volumes"].append({"host_path": "$SANDBOX_PATH/%%../../etc%%", "container_path": "/etc2"})
    _, _, errors = resolve_document(doc, {}, CTX, VARS)
    by_field = {e.field: e.message for e in errors}
    assert set(by_field) == {"task_info.var_envs.SECRET", "task_info.volumes[3].host_path",
                             "task_info.volumes[4].host_path"}
    assert "$FEM_HPC_BROKER_URL is not a variable" in by_field["task_info.var_envs.SECRET"]
    assert "$HOME is not a variable" in by_field["task_info.volumes[3].host_path"]
    assert "unknown placeholder '%%../../etc%%'" in by_field["task_info.volumes[4].host_path"]


@pytest.mark.parametrize("user_id", ["../x", "..", "a/b", "", " x", "x\n", "é", "-rf", "x" * 129])
def test_an_unsafe_user_id_is_never_substituted(user_id: str) -> None:
    ctx = CTX.model_copy(update={"user_id": user_id})
    with pytest.raises(DocumentError) as exc:
        resolve_text("$SANDBOX_PATH/%%user_id%%/%%execution_id%%", "task_info.volumes[2].host_path", ctx, VARS)
    assert exc.value.field == "task_info.volumes[2].host_path"
    assert "%%user_id%% would be" in exc.value.reason and "not a safe identifier" in exc.value.reason
    # a value that is never used does not matter
    assert resolve_text("%%execution_id%%", "f", ctx) == EXECUTION


@pytest.mark.parametrize(("text", "reason"), [
    ("%%../../etc%%", "unknown placeholder '%%../../etc%%'"),
    ("%%USER_ID%%", "unknown placeholder '%%USER_ID%%'"),
    ("%%%%", "unknown placeholder '%%%%'"),
    ("/a/%%user_id", "unterminated %% placeholder"),
    ("%%user_id%%%%", "unterminated %% placeholder"),
    ("${HOME}", "starts with '$' but is not $NAME or $NAME/path"),
    ("$DATA_PATH:/x", "starts with '$' but is not $NAME or $NAME/path"),
    ("$", "starts with '$' but is not $NAME or $NAME/path"),
])
def test_malformed_placeholders(text: str, reason: str) -> None:
    with pytest.raises(DocumentError, match="^f: ") as exc:
        resolve_text(text, "f", CTX, VARS)
    assert reason in exc.value.reason


def test_a_missing_context_value_is_an_error_when_used() -> None:
    ctx = PlaceholderContext(user_id=USER)
    with pytest.raises(DocumentError, match="execution.execution_id is missing"):
        resolve_text("%%execution_id%%", "f", ctx)


def test_resolution_is_one_pass() -> None:
    # a site value is not scanned again, and substituted text cannot form a new placeholder
    site = SiteVariables.from_site({"ODD": LegacyVariable(value="/v/%%user_id%%", mode="none")}, node="n",
                                   sandbox=SANDBOX)
    assert resolve_text("$ODD/%%user_id%%", "f", CTX, site) == f"/v/%%user_id%%/{USER}"
    assert resolve_text("%%node_name%%%%user_id%%", "f", CTX) == f"UB2{USER}"
    ctx = CTX.model_copy(update={"tool_id": "%%user_id%%"})  # a value that looks like a placeholder
    with pytest.raises(DocumentError, match="not a safe identifier"):
        resolve_text("%%tool_id%%", "f", ctx)


def test_a_dollar_inside_a_value_is_text_and_values_nest() -> None:
    assert resolve_text("pa$$word", "f", CTX, VARS) == "pa$$word"
    assert resolve_value(["%%node_name%%", 3, {"k": "$NODE_NAME"}], "f", CTX, VARS) == ["UB2", 3, {"k": "UB2"}]
    with pytest.raises(DocumentError) as exc:
        resolve_value(["ok", {"k": "$HOME"}], "p", CTX, VARS)
    assert exc.value.field == "p[1].k"


def test_site_variables_always_have_node_and_sandbox() -> None:
    site = SiteVariables.from_site({}, node="UB2", sandbox=SANDBOX)
    assert site.values == {"NODE_NAME": "UB2", "SANDBOX_PATH": str(SANDBOX)}
    assert site.modes == {"NODE_NAME": "none", "SANDBOX_PATH": "none"}


def test_config_declares_variables(tmp_path: Path) -> None:
    base = {"node": "UB2", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")}
    cfg = config_from_dict({**base, "legacy": {"variables": {
        "HOST_FEMC_PATH": "/opt/fem", "OUT": {"value": "/scratch/out", "mode": "rw"},
        "FLOWER_SSL_CACERT": {"value": "rootCA.pem", "mode": "none"}}}})
    assert cfg.legacy.variables["HOST_FEMC_PATH"] == LegacyVariable(value="/opt/fem", mode="ro")
    assert cfg.legacy.variables["OUT"].mode == "rw"
    for bad, why in [
        ({"NODE_NAME": "x"}, "NODE_NAME is set by fem-hpc"),
        ({"SANDBOX_PATH": "/x"}, "SANDBOX_PATH is set by fem-hpc"),
        ({"1X": "/x"}, "does not match"),
        ({"X": {"value": "rel", "mode": "rw"}}, "mode rw needs an absolute path"),
        ({"X": {"value": "/x", "mode": "rwx"}}, "legacy.variables.X.mode"),
    ]:
        with pytest.raises(ConfigError) as exc:
            config_from_dict({**base, "legacy": {"variables": bad}})
        assert why in str(exc.value), (bad, str(exc.value))
