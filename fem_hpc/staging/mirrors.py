"""Image mirrors: pull an image a task names from the site's own registry instead.

``image_mirrors`` in the site config maps a registry, or a repository prefix in it, to a mirror::

    image_mirrors:
      registry.example.org: {mirror: 127.0.0.1:5000}             # every image of that registry
      registry.example.org/fl: {mirror: mirror.site.local/dt4h}   # only those under fl/, re-rooted

A reference is split the way docker does (:func:`~fem_hpc.staging.images.parse_image_ref`: Docker Hub
under any of its names, ``library/`` for official images), the longest matching prefix wins (component
by component: ``.../fl`` matches ``.../fl/flcore``, not ``.../flcore2``), and the matched prefix is
replaced by the mirror; the rest of the path, the tag and the digest are kept. There is no fallback to
the original registry: a site that needs a mirror usually cannot reach the original at all, and a pull
that silently went elsewhere would run an image the site did not vet. Site policy (``policy.images``)
is checked against the reference the task asked for; the mirror is the site's own choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from ..config import ImageMirror
from .images import DEFAULT_REGISTRY, ImageError, ImageRef, parse_image_ref

if TYPE_CHECKING:
    from ..config import SiteConfig

__all__ = ["ImageRewrite", "rewrite_image", "site_image"]


class ImageRewrite(BaseModel):
    """``requested`` as the task named it, ``image`` what to pull and run, ``rule`` the image_mirrors key
    that matched (None: no rule, ``image`` is the normalized ``requested``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requested: str
    image: str
    rule: str | None = None


def _split_prefix(prefix: str) -> tuple[str, list[str]]:
    """``host[:port][/a/b]`` -> (registry as parse_image_ref names it, ['a', 'b'])."""
    probe = parse_image_ref(f"{prefix}/x")  # reuse docker's rules for the registry part (hub aliases)
    parts = probe.repository.split("/")[:-1]
    if probe.registry == DEFAULT_REGISTRY and parts[:1] == ["library"] and "/library" not in prefix:
        parts = parts[1:]  # "<hub>/x" became library/x; the prefix itself named no path
    return probe.registry, parts


def rewrite_image(reference: str, mirrors: Mapping[str, ImageMirror]) -> ImageRewrite:
    """Apply the longest matching ``image_mirrors`` rule to ``reference``. Raises ImageError for a
    reference that is not valid, or a rule whose result is not."""
    ref = parse_image_ref(reference)
    repo = ref.repository.split("/")
    best: tuple[int, str, list[str]] | None = None
    for key in mirrors:
        registry, parts = _split_prefix(key)
        if registry == ref.registry and repo[: len(parts)] == parts and len(parts) < len(repo):
            if best is None or len(parts) > best[0]:
                best = (len(parts), key, parts)
    if best is None:
        return ImageRewrite(requested=reference, image=ref.normalized)
    _, key, parts = best
    mirror = mirrors[key].mirror
    host, _, path = mirror.partition("/")
    new_repo = "/".join([*([path] if path else []), *repo[len(parts):]])
    rewritten = ImageRef(registry=host, repository=new_repo, tag=ref.tag, digest=ref.digest)
    try:
        checked = parse_image_ref(str(rewritten))
    except ImageError as exc:
        raise ImageError(f"image_mirrors.{key}: rewriting {reference!r} gives an invalid reference: {exc}") from None
    return ImageRewrite(requested=reference, image=checked.normalized, rule=key)


def site_image(site: SiteConfig, image: str) -> ImageRef:
    """What this site pulls and runs for a task's `image`: its `image_mirrors` applied (the one place
    the executors ask). Raises ImageError for an invalid reference."""
    return parse_image_ref(rewrite_image(image, site.image_mirrors).image)
