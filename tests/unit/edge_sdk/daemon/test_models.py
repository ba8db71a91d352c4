"""Where a hot swap may take a package from (no package is loaded here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.daemon.config import ModelConfig
from edge_sdk.daemon.models import ModelRegistry, PackageNotAllowed


def test_reload_paths_must_lie_in_a_model_directory_or_model_dirs(tmp_path: Path) -> None:
    root, extra, other = tmp_path / "deploy", tmp_path / "staging", tmp_path / "other"
    for d in (root / "versions" / "abc", extra, other):
        d.mkdir(parents=True)
    (root / "current").symlink_to(root / "versions" / "abc")
    registry = ModelRegistry({"m": ModelConfig("m", root / "current")}, model_dirs=[extra])
    for ok in (root / "versions" / "abc", root / "next.edgepkg", extra / "m.edgepkg"):
        assert registry.allowed(ok) == ok
    (root / "escape").symlink_to(other)
    for bad in (other / "m.edgepkg", root / "escape" / "m.edgepkg", root / ".." / "other" / "m.edgepkg"):
        with pytest.raises(PackageNotAllowed, match="outside the directories models are served from"):
            registry.allowed(bad)
    with pytest.raises(PackageNotAllowed, match="relative path"):
        registry.allowed(Path("m.edgepkg"))
