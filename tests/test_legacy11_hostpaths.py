"""Host paths of the real FEM documents, mapped by rule on a real file system (tmp dirs, real symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from femkit import flcore_document

from fem_hpc.config import LegacyVariable, VolumeConfig
from fem_hpc.protocols.legacy.errors import DocumentError
from fem_hpc.protocols.legacy.hostpaths import (
    HostMount,
    HostPathRules,
    MountKind,
    map_host_path,
    map_volumes,
    repository_name,
    working_dir,
)
from fem_hpc.protocols.legacy.placeholders import PlaceholderContext, SiteVariables, resolve_document

USER = "0e8f509e-3d43-4346-96da-aa744e7e8a75"
EXECUTION = "1e7b5310-7a2e-4f89-a4f7-320a89f67217"


class Site:
    """A node's directories in tmp_path: sandbox, state dir, the FEM client's own dir with its PKI, data."""

    def __init__(self, tmp: Path):
        self.sandbox = tmp / "sandbox"
        self.state = tmp / "state"
        self.femc = tmp / "fem-client"
        self.data = tmp / "data"
        self.scratch = tmp / "scratch"
        self.models = tmp / "models"
        for d in (self.sandbox, self.state, self.femc / "config" / "rabbitmq-certificates", self.data,
                  self.scratch, self.models):
            d.mkdir(parents=True)
        self.workdir = self.sandbox / USER / EXECUTION
        self.workdir.mkdir(parents=True)
        self.variables = SiteVariables.from_site({
            "HOST_FEMC_PATH": LegacyVariable(value=str(self.femc)),
            "DATA_PATH": LegacyVariable(value=str(self.data)),
            "SCRATCH": LegacyVariable(value=str(self.scratch), mode="rw"),
            "FLOWER_SSL_CACERT": LegacyVariable(value="/app/config/certificates/rootCA_cert.pem", mode="none"),
            "FLOWER_SSL_SERVER_CERT": LegacyVariable(value="/c.pem", mode="none"),
            "FLOWER_SSL_SERVER_KEY": LegacyVariable(value="/k.pem", mode="none"),
        }, node="UB2", sandbox=self.sandbox)
        self.ctx = PlaceholderContext(user_id=USER, execution_id=EXECUTION, node_name="UB2",
                                      task_id="flcore-server", tool_id="flcore")

    def rules(self, source_url: str | None = "https://github.com/DataTools4Heart/flcore.git --branch production",
              ) -> HostPathRules:
        return HostPathRules.build(sandbox=self.sandbox, workdir=self.workdir, variables=self.variables,
                                   site_volumes={"models": VolumeConfig(path=self.models)}, source_url=source_url,
                                   protected=[self.state])

    def resolve(self, host_path: str) -> str:
        doc = {"volumes": [{"host_path": host_path, "container_path": "/x"}]}
        info, _, errors = resolve_document(doc, {}, self.ctx, self.variables)
        if errors:
            raise DocumentError(errors[0].field, errors[0].message)
        return info["volumes"][0]["host_path"]

    def map(self, host_path: str, target: str = "/mnt/x", **kw: object) -> HostMount:
        return map_host_path(self.resolve(host_path), target, "task_info.volumes[0]", self.rules(**kw))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_the_real_document_maps_to_three_mounts(site: Site) -> None:
    info, _, errors = resolve_document(flcore_document(), {}, site.ctx, site.variables)
    assert errors == []
    mounts, problems = map_volumes(info["volumes"], site.rules())
    assert problems == []
    assert [(m.kind, m.target, m.mode, m.name) for m in mounts] == [
        (MountKind.CHECKOUT, "/flcore", "rw", "flcore"),
        (MountKind.VARIABLE, "/app/config/certificates", "ro", "HOST_FEMC_PATH"),
        (MountKind.WORKDIR, "/sandbox", "rw", None),
    ]
    assert mounts[0].source is None  # the checkout exists only after stage-in
    assert mounts[1].source == site.femc / "config" / "rabbitmq-certificates"
    assert mounts[2].source == site.workdir and mounts[2].subpath is None
    assert working_dir(mounts) == "/flcore"


def test_rules(site: Site) -> None:
    sub = site.map("$SANDBOX_PATH/%%user_id%%/%%execution_id%%/outputs//./models")
    assert (sub.kind, sub.subpath, sub.mode) == (MountKind.WORKDIR, "outputs/models", "rw")
    assert site.map("$DATA_PATH").mode == "ro"
    assert site.map("$DATA_PATH/cohort-1").source == site.data / "cohort-1"
    assert site.map("$SCRATCH/run").mode == "rw"  # the site said rw for this variable
    vol = site.map(str(site.models))
    assert (vol.kind, vol.name, vol.mode) == (MountKind.SITE_VOLUME, "models", "ro")
    # a literal path under a declared variable's root is that variable's
    assert site.map(str(site.data / "x")).name == "DATA_PATH"
    assert working_dir([sub]) is None


@pytest.mark.parametrize(("host_path", "reason"), [
    ("/etc", "is not the task's work area, its source checkout, under a path variable"),
    ("/", "would expose"),
    ("$SANDBOX_PATH/../..", "contains '..'"),
    ("$SANDBOX_PATH/%%user_id%%/%%execution_id%%/../../x", "contains '..'"),
    ("$DATA_PATH/../etc", "contains '..'"),
    ("$SANDBOX_PATH", "is inside the sandbox"),
    ("$SANDBOX_PATH/%%user_id%%", "is inside the sandbox"),
    ("$SANDBOX_PATH/%%user_id%%/other-execution", "is inside the sandbox"),
    ("$SANDBOX_PATH/other-repo", "is inside the sandbox"),
    ("relative/path", "must be an absolute path"),
    ("$DATA_PATH/a:b", "contains ':'"),
    ("$DATA_PATH/a,b", "contains ','"),
    ("$DATA_PATH/a\nb", "contains '\\n'"),
    ("$FLOWER_SSL_CACERT", "is not the task's work area"),  # a mode-none variable is no mount root
])
def test_refused_host_paths(site: Site, host_path: str, reason: str) -> None:
    with pytest.raises(DocumentError) as exc:
        site.map(host_path)
    assert exc.value.field == "task_info.volumes[0].host_path"
    assert reason in exc.value.reason, exc.value.reason


def test_hostile_placeholders_are_refused_before_mapping(site: Site) -> None:
    for host_path, reason in [("$HOME", "$HOME is not a variable"),
                              ("$FEM_HPC_BROKER_URL", "$FEM_HPC_BROKER_URL is not a variable"),
                              ("$SANDBOX_PATH/%%../../etc%%", "unknown placeholder")]:
        with pytest.raises(DocumentError, match="task_info.volumes") as exc:
            site.map(host_path)
        assert reason in exc.value.reason
    site.ctx = site.ctx.model_copy(update={"user_id": "../x"})
    with pytest.raises(DocumentError, match="not a safe identifier"):
        site.map("$SANDBOX_PATH/%%user_id%%/%%execution_id%%")


def test_a_symlink_planted_in_the_sandbox_is_never_followed(site: Site) -> None:
    (site.sandbox / "evil").symlink_to("/")
    (site.workdir / "root").symlink_to("/")
    (site.sandbox / "flcore").symlink_to("/")
    for host_path, reason in [
        ("$SANDBOX_PATH/evil", "is inside the sandbox"),
        ("$SANDBOX_PATH/evil/etc", "is inside the sandbox"),
        ("$SANDBOX_PATH/%%user_id%%/%%execution_id%%/root", "through a symlink in the sandbox (it leads to '/')"),
        ("$SANDBOX_PATH/%%user_id%%/%%execution_id%%/root/etc", "symlink in the sandbox (it leads to '/etc')"),
        ("$SANDBOX_PATH/flcore", "goes through a symlink in the sandbox (it leads to '/')"),
    ]:
        with pytest.raises(DocumentError) as exc:
            site.map(host_path)
        assert reason in exc.value.reason, (host_path, exc.value.reason)


def test_the_work_area_itself_replaced_by_a_symlink(site: Site) -> None:
    site.workdir.rmdir()
    site.workdir.symlink_to("/")
    with pytest.raises(DocumentError, match="goes through a symlink in the sandbox"):
        site.map("$SANDBOX_PATH/%%user_id%%/%%execution_id%%")


def test_symlinks_out_of_a_variable_root(site: Site) -> None:
    (site.data / "etc").symlink_to("/etc")
    (site.data / "inner").mkdir()
    (site.data / "alias").symlink_to(site.data / "inner")  # stays inside: fine, the real path is bound
    (site.femc / "sb").symlink_to(site.sandbox)
    (site.femc / "st").symlink_to(site.state)
    with pytest.raises(DocumentError, match="leads through a symlink to '/etc', outside \\$DATA_PATH"):
        site.map("$DATA_PATH/etc")
    assert site.map("$DATA_PATH/alias").source == site.data / "inner"
    with pytest.raises(DocumentError, match="would expose"):
        site.map("$HOST_FEMC_PATH/sb")
    with pytest.raises(DocumentError, match="would expose"):
        site.map("$HOST_FEMC_PATH/st")


def test_a_variable_that_contains_the_sandbox(tmp_path: Path) -> None:
    # the original deployment keeps its sandbox inside the client's own directory
    femc = tmp_path / "fem-client"
    sandbox = femc / "sandbox"
    (femc / "config").mkdir(parents=True)
    workdir = sandbox / USER / EXECUTION
    workdir.mkdir(parents=True)
    variables = SiteVariables.from_site({"HOST_FEMC_PATH": LegacyVariable(value=str(femc))}, node="n",
                                        sandbox=sandbox)
    rules = HostPathRules.build(sandbox=sandbox, workdir=workdir, variables=variables, site_volumes={})
    assert map_host_path(str(femc / "config"), "/c", "v", rules).kind == MountKind.VARIABLE
    with pytest.raises(DocumentError, match="would expose"):
        map_host_path(str(femc), "/c", "v", rules)
    assert map_host_path(str(workdir), "/sandbox", "v", rules).kind == MountKind.WORKDIR


def test_the_work_area_must_be_in_the_sandbox(site: Site) -> None:
    for workdir in (site.sandbox, site.data / "w"):
        with pytest.raises(ValueError, match="must be inside the sandbox"):
            HostPathRules.build(sandbox=site.sandbox, workdir=workdir, variables=site.variables, site_volumes={})


def test_without_a_source_there_is_no_checkout(site: Site) -> None:
    with pytest.raises(DocumentError, match="only the task's own work area"):
        site.map("$SANDBOX_PATH/flcore", source_url=None)


@pytest.mark.parametrize(("target", "reason"), [
    ("relative", "must be an absolute path"), ("/", "would hide the whole container"),
    ("/a/../b", "contains '..'"), ("/a:ro", "contains ':'"), ("", "non-empty string"),
])
def test_refused_targets(site: Site, target: str, reason: str) -> None:
    with pytest.raises(DocumentError) as exc:
        site.map("$DATA_PATH", target=target)
    assert exc.value.field == "task_info.volumes[0].container_path"
    assert reason in exc.value.reason


def test_map_volumes_reports_every_problem(site: Site) -> None:
    volumes = [{"host_path": str(site.data), "container_path": "/d"}, "not a dict",
               {"host_path": "/etc", "container_path": "/e"},
               {"host_path": str(site.data / "x"), "container_path": "/d"}, {"container_path": "/n"}]
    mounts, errors = map_volumes(volumes, site.rules())
    assert [m.target for m in mounts] == ["/d"]
    assert [(e.field, e.message.split(" ")[0]) for e in errors] == [
        ("task_info.volumes[1]", "must"), ("task_info.volumes[2].host_path", "host_path"),
        ("task_info.volumes[3].container_path", "'/d'"), ("task_info.volumes[4].host_path", "host_path")]
    assert map_volumes("", site.rules()) == ([], [])
    assert map_volumes({"a": 1}, site.rules())[1][0].field == "task_info.volumes"


@pytest.mark.parametrize(("url", "name"), [
    ("https://github.com/DataTools4Heart/flcore.git --branch production", "flcore"),
    ("git://127.0.0.1:9418/flcore.git", "flcore"),
    ("git@gitlab.example.org:fl/flcore.git", "flcore"),
    ("https://host/org/repo/", "repo"),
    ("file:///srv/git/x", "x"),
    ("https://host/..", None),
    ("'unterminated", None),
    ("", None),
])
def test_repository_name(url: str, name: str | None) -> None:
    assert repository_name(url) == name


def test_the_real_paths_are_bound_not_the_symlinks(site: Site) -> None:
    # a symlinked variable root (e.g. /data -> /mnt/vol1) binds the real directory
    real = site.data.parent / "vol1"
    real.mkdir()
    (real / "set").mkdir()
    linked = site.data.parent / "linked"
    os.symlink(real, linked)
    variables = SiteVariables.from_site({"DATA_PATH": LegacyVariable(value=str(linked))}, node="n",
                                        sandbox=site.sandbox)
    rules = HostPathRules.build(sandbox=site.sandbox, workdir=site.workdir, variables=variables, site_volumes={})
    assert map_host_path(str(linked / "set"), "/d", "v", rules).source == real / "set"


def _hostile(site: Site, case: str) -> dict:
    """The real document with one hostile change (the list of issue 11)."""
    doc = flcore_document()
    if case == "$HOME":
        doc["var_envs"]["FLOWER_SSL_CACERT"] = "$HOME/.ssh/id_rsa"
    elif case == "$FEM_HPC_BROKER_URL":
        doc["var_envs"]["NODE_NAME"] = "$FEM_HPC_BROKER_URL"
    elif case == "%%../../etc%%":
        doc["volumes"][2]["host_path"] = "$SANDBOX_PATH/%%../../etc%%"
    elif case == "user_id ../x":
        site.ctx = site.ctx.model_copy(update={"user_id": "../x"})
    elif case == "/etc":
        doc["volumes"][1]["host_path"] = "/etc"
    elif case == "$SANDBOX_PATH/../..":
        doc["volumes"][0]["host_path"] = "$SANDBOX_PATH/../.."
    elif case == "symlink to /":
        site.workdir.rmdir()
        site.workdir.symlink_to("/")
    return doc


@pytest.mark.parametrize(("case", "field", "reason"), [
    ("$HOME", "task_info.var_envs.FLOWER_SSL_CACERT", "$HOME is not a variable this site declares"),
    ("$FEM_HPC_BROKER_URL", "task_info.var_envs.NODE_NAME", "$FEM_HPC_BROKER_URL is not a variable this site"),
    ("%%../../etc%%", "task_info.volumes[2].host_path", "unknown placeholder '%%../../etc%%'"),
    ("user_id ../x", "task_info.volumes[2].host_path", "%%user_id%% would be '../x'"),
    ("/etc", "task_info.volumes[1].host_path", "'/etc' is not the task's work area"),
    ("$SANDBOX_PATH/../..", "task_info.volumes[0].host_path", "contains '..'"),
    ("symlink to /", "task_info.volumes[2].host_path", "goes through a symlink in the sandbox (it leads to '/')"),
])
def test_issue_11_hostile_list(site: Site, case: str, field: str, reason: str) -> None:
    """Each hostile change to the real document is refused, naming the field; the rest still maps."""
    doc = _hostile(site, case)
    # the two stages as the mapping runs them: placeholders first; host paths only when they all resolved
    info, _, found = resolve_document(doc, {}, site.ctx, site.variables)
    if not found:
        _, found = map_volumes(info["volumes"], site.rules())
    assert [e.field for e in found] == [field], found
    assert reason in found[0].message, found[0].message
