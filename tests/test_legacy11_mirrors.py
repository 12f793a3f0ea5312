"""Site image mirrors: the document's image is pulled from the site's own registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from femkit import FLCORE_STANDIN, flcore_image, flcore_mirrors

from fem_hpc.config import ConfigError, ImageMirror, config_from_dict
from fem_hpc.staging.images import DEFAULT_REGISTRY, ImageError, parse_image_ref
from fem_hpc.staging.mirrors import rewrite_image

DIGEST = "sha256:" + "ab" * 32


def m(**rules: str) -> dict[str, ImageMirror]:
    return {key: ImageMirror(mirror=value) for key, value in rules.items()}


def test_the_real_documents_image_goes_to_the_local_registry() -> None:
    rewrite = rewrite_image(flcore_image(), flcore_mirrors())
    assert rewrite.image == FLCORE_STANDIN
    assert rewrite.requested == flcore_image()
    assert rewrite.rule == parse_image_ref(flcore_image()).registry


def test_rules() -> None:
    hub = DEFAULT_REGISTRY  # the registry of references that name none
    rules = m(**{"reg.example.org": "127.0.0.1:5000", "reg.example.org/fl": "mirror.site.local/dt4h",
                 hub: "127.0.0.1:5001/hub"})
    cases = {
        "reg.example.org/fl/flcore:demo": ("mirror.site.local/dt4h/flcore:demo", "reg.example.org/fl"),
        "reg.example.org/fl/sub/x": ("mirror.site.local/dt4h/sub/x:latest", "reg.example.org/fl"),
        "reg.example.org/flcore2/x:1": ("127.0.0.1:5000/flcore2/x:1", "reg.example.org"),  # component-wise
        f"reg.example.org/a@{DIGEST}": (f"127.0.0.1:5000/a@{DIGEST}", "reg.example.org"),
        f"reg.example.org/a:1@{DIGEST}": (f"127.0.0.1:5000/a:1@{DIGEST}", "reg.example.org"),
        "debian:12": ("127.0.0.1:5001/hub/library/debian:12", hub),  # docker's own name rules
        "bitnami/redis:7": ("127.0.0.1:5001/hub/bitnami/redis:7", hub),
        "other.example.org/fl/flcore:demo": ("other.example.org/fl/flcore:demo", None),
        "127.0.0.1:5000/fem/busybox:1": ("127.0.0.1:5000/fem/busybox:1", None),
    }
    for ref, (image, rule) in cases.items():
        got = rewrite_image(ref, rules)
        assert (got.image, got.rule) == (image, rule), ref


def test_a_prefix_rule_needs_a_name_below_it() -> None:
    # "reg.example.org/fl" itself names no image under the prefix: left alone
    assert rewrite_image("reg.example.org/fl:1", m(**{"reg.example.org/fl": "127.0.0.1:5000"})).rule is None
    assert rewrite_image("debian", m(**{f"{DEFAULT_REGISTRY}/library": "127.0.0.1:5000/lib"})).image == \
        "127.0.0.1:5000/lib/debian:latest"


def test_invalid_references_are_errors() -> None:
    with pytest.raises(ImageError):
        rewrite_image("Not A Ref", m(**{"reg.example.org": "127.0.0.1:5000"}))


def test_image_mirrors_in_the_config(tmp_path: Path) -> None:
    base = {"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")}
    cfg = config_from_dict({**base, "image_mirrors": {"reg.example.org": {"mirror": "127.0.0.1:5000"},
                                                      "reg.example.org/fl": {"mirror": "localhost/x"}}})
    assert cfg.image_mirrors["reg.example.org"].mirror == "127.0.0.1:5000"
    for bad in ({"reg.example.org": {"mirror": "http://127.0.0.1:5000"}},
                {"reg.example.org": {"mirror": "127.0.0.1:5000/"}},
                {"reg.example.org": {"mirror": "127.0.0.1:5000/x:tag"}},
                {"reg.example.org": {"mirror": "noregistry/x"}},
                {"reg.example.org/": {"mirror": "127.0.0.1:5000"}},
                {"reg.example.org": {"mirror": "127.0.0.1:5000", "fallback": True}},
                {"reg.example.org": "127.0.0.1:5000"}):
        with pytest.raises(ConfigError, match="image_mirrors"):
            config_from_dict({**base, "image_mirrors": bad})
