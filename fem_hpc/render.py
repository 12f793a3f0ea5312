"""Job scripts from Jinja templates.

The environment is sandboxed with StrictUndefined. Task values only ever enter as context data,
never as template source, so `{{ 7*7 }}` in a task stays literal text; in the script they pass
through `shell_quote`, so the shell never interprets them either.
"""

from __future__ import annotations

import shlex
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

if TYPE_CHECKING:
    from .config import SiteConfig
    from .executors.base import Executor, Job

def _builtin_templates() -> Path:
    """The templates shipped with fem-hpc: inside the installed package (pyproject maps the
    top-level templates/ there), or the top-level templates/ of a source checkout."""
    installed = Path(str(files("fem_hpc") / "templates"))
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "templates"


BUILTIN_TEMPLATES = _builtin_templates()


def shell_quote(value: Any) -> str:
    """Quote one value as a single shell word (POSIX sh)."""
    return shlex.quote(str(value))


def make_environment(templates_dir: Path | None = None) -> SandboxedEnvironment:
    loaders = []
    if templates_dir is not None:  # a site override is searched first
        loaders.append(FileSystemLoader(str(templates_dir)))
    loaders.append(FileSystemLoader(str(BUILTIN_TEMPLATES)))
    env = SandboxedEnvironment(
        loader=ChoiceLoader(loaders),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shell_quote"] = shell_quote
    return env


_ENVIRONMENTS: dict[Path | None, SandboxedEnvironment] = {}


def environment(site: SiteConfig) -> SandboxedEnvironment:
    key = site.templates_dir
    if key not in _ENVIRONMENTS:
        _ENVIRONMENTS[key] = make_environment(key)
    return _ENVIRONMENTS[key]


def base_context(job: Job) -> dict[str, Any]:
    task = job.task
    return {
        "task_id": task.id,
        "job_name": job.job_name,
        "workdir": str(job.workdir),
        "rundir": str(job.rundir),
        "fem_dir": str(job.fem_dir),
        "argv": list(task.command),
        "env_exports": sorted(task.env.items()),
        "launch": [],
        "resources": task.resources,
        "queue": task.queue,
        "account": task.account,
    }


def render_job(executor: Executor, job: Job) -> str:
    context = base_context(job)
    context.update(executor.template_context(job))
    return environment(executor.site).get_template(executor.template).render(**context)
