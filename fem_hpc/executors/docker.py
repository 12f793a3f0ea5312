"""The `docker` executor: each task's wrapper runs in a container of the task's image, through the
docker SDK (the daemon's API; no `docker` CLI needed).

- The work dir is bind-mounted read-write at /fem/work; the wrapper's paths are rendered for the
  inside of the container (/fem/work/.fem, /fem/work[/source.path]); the task's named volumes are
  bind mounts at their targets, read-only unless the task asks rw and the site volume allows it.
- Native id = container id. Containers carry the labels `fem.task_id=<id>` and `fem.node=<node>`,
  are named `fem-<node>-<task id>`, and are found again by label after a restart.
- One sparse `containers.list` per poll cycle for every tracked job (plus one inspect per container
  seen ended, for its exit code and OOM flag). Exit code and logs come from the wrapper's markers
  like every executor; the container's own state is the safety net.
- The image is made present at stage-in under `pull_policy` (staging.images.ensure_image).
- Walltime is enforced here (like the local executor, with the same timers.Stopper): the
  container is stopped, verdict TIMEOUT. Cancel and walltime send SIGTERM to the wrapper (which
  forwards it to the command and still writes its marker), then SIGKILL after
  `stop_grace_seconds`: `docker stop`, without blocking the caller for the grace period.
- Security (the container spec is containers.docker_create_args): never privileged, all
  capabilities dropped, no-new-privileges, network `none` unless configured, `host` only with
  `allow_host_network`.

Work dir permissions: the container runs as a non-root user. `user: auto` (the default) is the
service's own uid:gid, so the work dir the service created is already the container's; when the
service runs as root, `auto` means 65534:65534 (nobody:nogroup). At stage-in the work dir tree is
chowned to the container's uid:gid when the service is root (it still reads and removes
everything); a non-root service can only run containers as itself, and a configured different
user is then a clear stage-in error instead of a job that cannot write its own directory.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..layout import FEM_DIR, read_marker
from ..model import Check, Reason, State
from ..staging.errors import StageError
from ..staging.images import PullPolicy, credentials_for, docker_explanation, ensure_image
from ..staging.mirrors import site_image
from ..staging.volumes import check_targets, resolve_volumes, volume_env
from .base import Executor, ExecutorError, ExecutorSettings, Job, NativeStatus
from .containers import WORK_MOUNT, container_name, docker_create_args, in_container
from .timers import Stopper

log = logging.getLogger("fem_hpc.executors.docker")

NOBODY = (65534, 65534)  # the container user of `user: auto` when the service runs as root
_USER = re.compile(r"^(auto|[0-9]{1,10}(:[0-9]{1,10})?)$")


class DockerSettings(ExecutorSettings):
    base_url: str | None = None  # e.g. unix:///var/run/docker.sock or tcp://host:2376; default: DOCKER_HOST
    api_timeout: float = Field(default=60.0, gt=0)  # seconds per API call (a pull may stream longer)
    user: str = "auto"  # "auto" | "UID" | "UID:GID", numeric (see the module docstring)
    network: str = "none"  # "none", "bridge", a named network; "host" needs allow_host_network
    allow_host_network: bool = False
    # Host address a task's `ports` are published on (bridge or named networks only)
    publish_host: str = "0.0.0.0"
    pull_policy: PullPolicy = "if-not-present"
    stop_grace_seconds: float = Field(default=10.0, ge=0)  # SIGTERM ... SIGKILL on cancel and walltime
    lost_grace_seconds: float = Field(default=60.0, gt=0)  # a container gone without a marker -> LOST
    gpus: bool = True  # pass GPU requests (device_requests) to the daemon; False: such tasks fail
    init: bool = True  # docker-init as PID 1 (reaps zombies, forwards signals to the wrapper)
    cap_add: list[str] = Field(default_factory=list)  # every capability is dropped, except these
    extra_labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not _USER.fullmatch(v):
            raise ValueError(f"user {v!r} must be 'auto', 'UID' or 'UID:GID' (numeric)")
        return v

    @field_validator("publish_host")
    @classmethod
    def _publish_host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"publish_host {v!r} is not an IP address (e.g. 0.0.0.0 or 127.0.0.1)") from None
        return v

    @field_validator("extra_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = [k for k in v if k.startswith("fem.")]
        if reserved:
            raise ValueError(f"labels {reserved} use the reserved prefix 'fem.'")
        return v

    @model_validator(mode="after")
    def _host(self) -> DockerSettings:
        if self.network == "host" and not self.allow_host_network:
            raise ValueError("network 'host' needs allow_host_network: true")
        return self


class DockerExecutor(Executor):
    kind = "docker"
    runtimes = ("docker",)  # the daemon, reached through its API; the CLI is what doctor can look for
    template = "docker.sh.j2"
    Settings = DockerSettings
    settings: DockerSettings

    def __init__(self, name: str, settings: Any, site: Any):
        super().__init__(name, settings, site)
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stopper = Stopper(self.settings.stop_grace_seconds)  # why we stopped a container, its SIGKILL
        self._ended: dict[str, dict[str, Any]] = {}  # container id -> its State, inspected once
        self._leftovers: set[str] = set()  # containers whose removal failed; retried at each poll

    # -- the daemon -------------------------------------------------------------------------------
    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                import docker

                try:
                    if self.settings.base_url:
                        self._client_obj = docker.DockerClient(base_url=self.settings.base_url,
                                                               timeout=int(self.settings.api_timeout))
                    else:
                        self._client_obj = docker.from_env(timeout=int(self.settings.api_timeout))
                except Exception as exc:  # DockerException, or requests' connection errors
                    raise ExecutorError(f"cannot reach the docker daemon{self._where()}: {exc}") from None
            return self._client_obj

    def _where(self) -> str:
        return f" at {self.settings.base_url}" if self.settings.base_url else ""

    def close(self) -> None:
        self._stopper.close()  # pending SIGKILLs first: they need the client
        with self._client_lock:
            if self._client_obj is not None:
                try:
                    self._client_obj.close()
                except Exception:
                    pass
                self._client_obj = None

    # -- identity ---------------------------------------------------------------------------------
    def container_user(self) -> tuple[int, int]:
        if self.settings.user == "auto":
            uid, gid = os.geteuid(), os.getegid()
            return NOBODY if uid == 0 else (uid, gid)
        uid_s, _, gid_s = self.settings.user.partition(":")
        uid = int(uid_s)
        return uid, int(gid_s) if gid_s else uid

    def labels(self, job: Job) -> dict[str, str]:
        return {**self.settings.extra_labels, "fem.task_id": job.task.id, "fem.node": self.site.node,
                "fem.execution_id": job.task.execution, "fem.user_id": job.task.user_id,
                "fem.executor": self.name}

    # -- job script -------------------------------------------------------------------------------
    def template_context(self, job: Job) -> dict[str, Any]:
        ctx: dict[str, Any] = {"workdir": WORK_MOUNT, "rundir": job.container_rundir or in_container(job, job.rundir),
                               "fem_dir": f"{WORK_MOUNT}/{FEM_DIR}"}
        if job.task.volumes:
            volumes = volume_env(job.task, self.site, job.workdir, in_container=True)
            ctx["env_exports"] = sorted({**job.task.env, **volumes}.items())
        return ctx

    # -- stage-in ---------------------------------------------------------------------------------
    def stage_in(self, job: Job, progress: Any = None) -> None:
        task = job.task
        if not task.image:
            raise ExecutorError("the docker executor needs the task's image")
        if task.resources.gpus and not self.settings.gpus:
            raise ExecutorError(f"the task asks for {task.resources.gpus} GPU(s) but executor {self.name!r} "
                                "does not pass GPUs to containers (gpus: false)")
        if task.ports and self.settings.network in ("none", "host"):
            raise ExecutorError(f"the task publishes ports {', '.join(str(p.host_port) for p in task.ports)}, but "
                                f"executor {self.name!r} runs containers with network {self.settings.network!r}, "
                                "where nothing can be published (set executors.<name>.network to a bridge network)")
        try:
            ref = site_image(self.site, task.image)
            check_targets(resolve_volumes(task, self.site, job.workdir), WORK_MOUNT)
            ensure_image("docker", ref, self.settings.pull_policy, credentials=credentials_for(self.site, ref),
                         progress=progress, docker_client=self._client(), state_dir=self.site.state_dir,
                         base_url=self.settings.base_url)
        except StageError as exc:
            raise ExecutorError(str(exc)) from None
        self._hand_over_workdir(job)

    def _hand_over_workdir(self, job: Job) -> None:
        """Make the work dir the container user's (see the module docstring)."""
        uid, gid = self.container_user()
        if uid == os.geteuid():
            return
        if os.geteuid() != 0:
            raise ExecutorError(
                f"containers of executor {self.name!r} run as {uid}:{gid}, but this service runs as uid "
                f"{os.geteuid()} and cannot give them its work dir; set executors.{self.name}.user to 'auto'")
        _chown_tree(job.workdir, uid, gid)

    # -- submit -----------------------------------------------------------------------------------
    def _create_args(self, job: Job) -> dict[str, Any]:
        image = site_image(self.site, job.task.image or "").pull_ref
        return docker_create_args(job, image, resolve_volumes(job.task, self.site, job.workdir),
                                  name=container_name(job.task.id, self.site.node), labels=self.labels(job),
                                  user=self.container_user(), network=self.settings.network,
                                  init=self.settings.init, cap_add=self.settings.cap_add,
                                  publish_host=self.settings.publish_host)

    def submit(self, job: Job) -> str:
        import docker.errors

        client = self._client()
        uid, gid = self.container_user()
        if uid != os.geteuid() and os.geteuid() == 0:
            # The agent writes the job script (0700) after stage-in: give it to the container user too.
            for path in (job.fem_dir, job.script_path):
                os.lchown(path, uid, gid)
        try:
            args = self._create_args(job)
        except StageError as exc:
            raise ExecutorError(str(exc)) from None
        try:
            container = self._create(client, job, args)
            if container.status == "running":
                return str(container.id)  # re-adopted (see _create)
            container.start()
        except docker.errors.APIError as exc:
            self._remove_quietly(client, args["name"])
            raise ExecutorError(f"docker could not start the container: {docker_explanation(exc)}") from None
        except ExecutorError:
            raise
        except Exception as exc:  # connection errors
            raise ExecutorError(f"cannot reach the docker daemon{self._where()}: {exc}") from None
        log.debug("started container %s for %s", container.short_id, job.task.id,
                  extra={"task_id": job.task.id, "native_id": container.id})
        return str(container.id)

    def _create(self, client: Any, job: Job, args: dict[str, Any]) -> Any:
        import docker.errors

        try:
            return client.containers.create(**args)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # The name is taken: a container of an earlier attempt of this task. A running one is the
        # job itself (re-adopt it); anything else is stale and replaced.
        old = client.containers.get(args["name"])
        if old.labels.get("fem.task_id") != job.task.id or old.labels.get("fem.node") != self.site.node:
            raise ExecutorError(f"a container named {args['name']} exists and is not this task's")
        if old.status == "running":
            return old
        old.remove(force=True, v=True)
        return client.containers.create(**args)

    def _remove_quietly(self, client: Any, name_or_id: str) -> None:
        try:
            client.api.remove_container(name_or_id, force=True, v=True)
        except Exception:
            pass

    # -- tracking ---------------------------------------------------------------------------------
    def _list(self, label_filters: list[str]) -> list[dict[str, Any]]:
        client = self._client()
        try:
            found = client.containers.list(all=True, sparse=True, filters={"label": label_filters})
        except Exception as exc:
            raise ExecutorError(f"cannot list containers{self._where()}: {exc}") from None
        return [c.attrs for c in found]

    def _exit_state(self, native_id: str) -> dict[str, Any]:
        with self._lock:
            cached = self._ended.get(native_id)
        if cached is not None:
            return cached
        state = self._client().api.inspect_container(native_id).get("State", {})
        with self._lock:
            self._ended[native_id] = state
        return state

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        self._retry_leftovers()
        tracked = [j for j in jobs if j.native_id]
        if not tracked:
            return {}
        by_id = {c["Id"]: c for c in self._list([f"fem.node={self.site.node}"])}
        out: dict[str, NativeStatus] = {}
        for job in tracked:
            nid = job.native_id or ""
            verdict = self._stopper.verdict(nid)
            info = by_id.get(nid)
            if info is None or (info.get("Labels") or {}).get("fem.task_id") != job.task.id:
                if verdict is not None:
                    out[nid] = verdict
                continue
            state = info.get("State")
            if state in ("created", "running", "restarting", "paused"):
                if (timeout := self._stopper.walltime_verdict(job)) is not None:
                    self._stop(job, timeout)
                native = State.SUBMITTED if state == "created" else State.RUNNING
                out[nid] = NativeStatus(native_id=nid, state=native, job_name=job.job_name)
                continue
            # exited, dead, removing: it has ended.
            try:
                st = self._exit_state(nid)
            except Exception as exc:
                log.debug("inspect of ended container %s failed: %s", nid[:12], exc)
                continue  # the next cycle asks again; the marker usually decides first
            out[nid] = ended_status(job, st, verdict)
        return out

    def poll_interval(self, youngest_age: float) -> float:
        return 1.0 if youngest_age < 60 else 3.0

    # -- stopping ---------------------------------------------------------------------------------
    def _stop(self, job: Job, verdict: NativeStatus) -> None:
        """SIGTERM now, SIGKILL after the grace period if it still runs (what `docker stop` does,
        without holding the caller for the grace period)."""
        nid = job.native_id or ""
        self._stopper.stop(nid, verdict, lambda: _terminate(self._client(), nid, self._where()),
                           lambda: _kill_if_running(self._client(), nid))

    def cancel(self, job: Job) -> None:
        if job.native_id is None:
            return
        self._stop(job, NativeStatus(native_id=job.native_id, state=State.CANCELLED, message="cancelled",
                                     job_name=job.job_name))

    # -- restart and cleanup ----------------------------------------------------------------------
    def find_by_name(self, job: Job) -> str | None:
        found = self._list([f"fem.task_id={job.task.id}", f"fem.node={self.site.node}"])
        started = []
        for c in found:
            if c.get("State") == "created":
                # The submit was interrupted between create and start: nothing ran. Remove it, so
                # the agent submits the task again (with a freshly rendered script).
                self._remove_quietly(self._client(), str(c["Id"]))
            else:
                started.append(c)
        if not started:
            return None
        started.sort(key=lambda c: (c.get("State") == "running", c.get("Created", 0)), reverse=True)
        return str(started[0]["Id"])

    def after_final(self, job: Job) -> None:
        nid = job.native_id
        if not nid:
            return
        self._stopper.forget(nid)
        with self._lock:
            self._ended.pop(nid, None)
        client = self._client()
        if read_marker(job.marker_path) is None:
            _keep_container_output(client, job)
        try:
            client.api.remove_container(nid, force=True, v=True)
        except Exception as exc:
            if getattr(exc, "status_code", None) != 404:
                with self._lock:
                    self._leftovers.add(nid)
                raise ExecutorError(f"cannot remove container {nid[:12]} (retried later): {exc}") from None
        self._stopper.forget(nid, cancel_kill=True)  # force-removed: no SIGKILL left to send

    def _retry_leftovers(self) -> None:
        with self._lock:
            pending = list(self._leftovers)
        for nid in pending:
            try:
                self._client().api.remove_container(nid, force=True, v=True)
            except Exception as exc:
                if getattr(exc, "status_code", None) != 404:
                    continue
            with self._lock:
                self._leftovers.discard(nid)

    # -- doctor -----------------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        name = f"{self.name}: docker daemon"
        try:
            client = self._client()
            client.ping()
            version = client.version().get("Version", "?")
        except Exception as exc:
            return [Check(name=name, status="error", detail=f"no answer{self._where()}: {exc}",
                          fix="start dockerd, or set executors.<name>.base_url / DOCKER_HOST")]
        uid, gid = self.container_user()
        checks = [Check(name=name, status="ok",
                        detail=f"Docker {version}{self._where()}; containers run as {uid}:{gid}, "
                               f"network {self.settings.network}")]
        if uid != os.geteuid() and os.geteuid() != 0:
            checks.append(Check(name=f"{self.name}: container user", status="error",
                                detail=f"user {uid}:{gid} cannot be given the work dir by uid {os.geteuid()}",
                                fix=f"set executors.{self.name}.user to 'auto'"))
        return checks


def ended_status(job: Job, state: dict[str, Any], verdict: NativeStatus | None) -> NativeStatus:
    """The runtime's word on an ended container from its inspected State: our own verdict (cancel,
    walltime) with the exit code, else OOM, else the exit code."""
    nid = job.native_id or ""
    code = state.get("ExitCode")
    if verdict is not None:
        return verdict.model_copy(update={"exit_code": code})
    if state.get("OOMKilled"):
        return NativeStatus(native_id=nid, state=State.FAILED, reason=Reason.OUT_OF_MEMORY, exit_code=code,
                            job_name=job.job_name,
                            message=f"out of memory (limit {job.task.resources.memory or 'none'})")
    if code == 0:
        return NativeStatus(native_id=nid, state=State.COMPLETED, exit_code=0, job_name=job.job_name)
    why = f"container exited with code {code}"
    if state.get("Error"):
        why += f": {state['Error']}"
    return NativeStatus(native_id=nid, state=State.FAILED, reason=Reason.EXIT_CODE, exit_code=code, message=why,
                        job_name=job.job_name)


def _terminate(client: Any, nid: str, where: str) -> bool:
    """SIGTERM to the container; False when there is nothing to stop (gone, or never started: a
    created container is removed on the spot)."""
    import docker.errors

    try:
        client.api.kill(nid, signal="SIGTERM")
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: not running (created, or already ended)
            raise ExecutorError(f"cannot stop container {nid[:12]}: {docker_explanation(exc)}") from None
        try:
            if client.api.inspect_container(nid).get("State", {}).get("Status") == "created":
                client.api.remove_container(nid, force=True, v=True)  # never started: nothing to wait for
        except docker.errors.APIError:
            pass
        return False
    except Exception as exc:
        raise ExecutorError(f"cannot reach the docker daemon{where}: {exc}") from None
    return True


def _kill_if_running(client: Any, nid: str) -> None:
    if client.api.inspect_container(nid).get("State", {}).get("Running"):
        log.info("container %s still runs after the grace period since SIGTERM: SIGKILL", nid[:12])
        client.api.kill(nid, signal="SIGKILL")


def _keep_container_output(client: Any, job: Job) -> None:
    """No marker: whatever the container printed before the wrapper took over (e.g. `sh: can't
    open ...`) goes to the task's stderr, so the result says why."""
    try:
        raw = client.api.logs(job.native_id, stdout=True, stderr=True, tail=50)
    except Exception:
        return
    if raw:
        try:
            with open(job.fem_dir / "stderr", "ab") as f:
                f.write(b"--- fem-hpc: output of the container before the wrapper ran ---\n" + raw)
        except OSError:
            pass



def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """chown the work dir tree without following symlinks (a link must not redirect a chown)."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, entry), uid, gid)
