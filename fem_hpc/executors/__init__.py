"""Executor registry: executors are found through the entry-point group ``fem_hpc.executors``.

The built-ins are registered in pyproject.toml like any plugin, so a site's own executor is a
package with one entry point. A plugin that fails to import is listed with its error; the
others keep working.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import ConfigError, SiteConfig, config_from_dict, format_errors, load_config
from .base import Executor

GROUP = "fem_hpc.executors"


@dataclass
class PluginInfo:
    name: str
    module: str
    cls: type[Executor] | None = None
    error: str | None = None
    runtime: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "ok" if self.cls is not None else f"error: {self.error}"

    def runtime_found(self, configured: str | None = None) -> tuple[bool, str]:
        """Whether one of the binaries this executor needs is on PATH (True when it needs none), or
        the one its settings name (`binary`: a path or a name on PATH)."""
        if configured:
            path = shutil.which(configured)
            return (True, path) if path else (False, f"{configured!r} (its binary setting) is not an executable")
        if not self.runtime:
            return True, "-"
        for binary in self.runtime:
            path = shutil.which(binary)
            if path:
                return True, path
        return False, " or ".join(self.runtime) + " not on PATH"


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plugins: dict[str, PluginInfo] | None = None

    def plugins(self) -> dict[str, PluginInfo]:
        with self._lock:
            if self._plugins is None:
                self._plugins = self._load()
            return self._plugins

    @staticmethod
    def _load() -> dict[str, PluginInfo]:
        found: dict[str, PluginInfo] = {}
        for ep in entry_points(group=GROUP):
            if ep.name in found:  # first registration wins; duplicates come from stale installs
                continue
            info = PluginInfo(name=ep.name, module=ep.value)
            try:
                cls = ep.load()
                info.cls = cls
                info.runtime = list(getattr(cls, "runtimes", ()))
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"{type(exc).__name__}: {exc}"
            found[ep.name] = info
        return found

    def get(self, kind: str) -> type[Executor]:
        info = self.plugins().get(kind)
        if info is None:
            raise KeyError(f"no executor named {kind!r} (installed: {sorted(self.plugins())})")
        if info.cls is None:
            raise KeyError(f"executor {kind!r} failed to load: {info.error}")
        return info.cls

    def validate_settings(self, kind: str, settings: Any) -> list[str]:
        """Problems with one executor's settings, as 'key: message' strings."""
        try:
            cls = self.get(kind)
        except KeyError as exc:
            return [f"type: {exc.args[0]}"]
        if not isinstance(settings, dict):
            return [": must be a mapping"]
        try:
            cls.Settings.model_validate({k: v for k, v in settings.items() if k != "type"})
        except ValidationError as exc:
            return format_errors(exc)
        return []

    def settings(self, name: str, site: SiteConfig) -> Any:
        """The settings of the executor named `name`, parsed by its own model (nothing started)."""
        cls = self.get(site.executor_type(name))
        return cls.Settings.model_validate({k: v for k, v in site.executors.get(name, {}).items() if k != "type"})

    def create(self, name: str, site: SiteConfig) -> Executor:
        cls = self.get(site.executor_type(name))
        return cls(name, self.settings(name, site), site)


registry = Registry()


def site_from_dict(raw: Any, source: str = "<config>", check_paths: bool = True) -> SiteConfig:
    """The site config with every executor section checked by its executor's own settings model."""
    return config_from_dict(raw, source, check_paths, executor_check=registry.validate_settings)


def load_site(path: str | Path) -> SiteConfig:
    """`load_config` with the executor sections checked (what the CLI and doctor load)."""
    return load_config(path, executor_check=registry.validate_settings)


__all__ = ["ConfigError", "PluginInfo", "Registry", "load_site", "registry", "site_from_dict"]
