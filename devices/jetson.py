"""Jetson facts: the L4T release line, and NVIDIA's published tables keyed by module.

Everything here is a pure function of a string. The tables hold only entries read off
NVIDIA's JetPack archive and module data sheets; a release or module not listed maps to
None rather than to a guess.
"""

from __future__ import annotations

import re

__all__ = [
    "JETPACK_FOR_L4T",
    "is_jetson_model",
    "jetpack_for_l4t",
    "jetson_family",
    "module_dla_cores",
    "module_gpu",
    "parse_l4t_release",
]

_L4T_LINE = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
"""First line of ``/etc/nv_tegra_release``: ``# R36 (release), REVISION: 3.0, GCID: ...``."""

JETPACK_FOR_L4T: dict[str, str] = {
    # JetPack 6 (Orin)
    "36.4.4": "6.2.1",
    "36.4.3": "6.2",
    "36.4.0": "6.1",
    "36.3.0": "6.0",
    # JetPack 5 (Orin, Xavier)
    "35.6.0": "5.1.4",
    "35.5.0": "5.1.3",
    "35.4.1": "5.1.2",
    "35.3.1": "5.1.1",
    "35.2.1": "5.1",
    "35.1.0": "5.0.2",
    # JetPack 4 (Xavier, Nano, TX1, TX2)
    "32.7.6": "4.6.6",
    "32.7.5": "4.6.5",
    "32.7.4": "4.6.4",
    "32.7.3": "4.6.3",
    "32.7.2": "4.6.2",
    "32.7.1": "4.6.1",
    "32.6.1": "4.6",
    "32.5.1": "4.5.1",
    "32.5.0": "4.5",
    "32.4.4": "4.4.1",
    "32.4.3": "4.4",
}
"""Exact L4T release -> JetPack release (GA releases only, from NVIDIA's JetPack archive).

Developer previews (34.x, 36.2) and releases whose pairing public sources disagree on
(e.g. JetPack 5.1.5) are left out on purpose: they map to None.
"""

_DLA_CORES: dict[str, int] = {
    "orin-agx": 2,
    "orin-nano": 0,
    "xavier-agx": 2,
    "xavier-nx": 2,
    "nano": 0,
    "tx1": 0,
    "tx2": 0,
}
"""DLA engines per module family, from the module data sheets. Orin NX is absent on purpose:
the 16 GB module has 2 and the 8 GB module has 1, and the model string does not say which."""

_GPU: dict[str, tuple[str, str]] = {
    "orin": ("Orin", "8.7"),
    "xavier": ("Xavier", "7.2"),
    "tx2": ("NVIDIA Tegra X2", "6.2"),
    "tx1": ("NVIDIA Tegra X1", "5.3"),
    "nano": ("NVIDIA Tegra X1", "5.3"),
}
"""SoC -> (the iGPU's CUDA device name, compute capability). Thor is absent: its compute
capability is numbered differently across CUDA 12 and 13."""


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 3.0, ...`` -> ``"36.3.0"``; None if the line is not that."""
    lines = text.strip().splitlines()
    match = _L4T_LINE.match(lines[0].strip()) if lines else None
    if match is None:
        return None
    parts = [match.group(1), *match.group(2).split(".")]
    parts.extend(["0"] * (3 - len(parts)))
    return ".".join(parts)


def jetpack_for_l4t(l4t_release: str) -> str | None:
    """The JetPack release that shipped this exact L4T release, or None if not in the table."""
    parts = l4t_release.split(".")
    parts.extend(["0"] * (3 - len(parts)))
    return JETPACK_FOR_L4T.get(".".join(parts))


def is_jetson_model(model: str) -> bool:
    """True when a device-tree model string names an NVIDIA Jetson board."""
    lowered = model.lower()
    return "jetson" in lowered or "nvidia" in lowered


def jetson_family(model: str) -> str | None:
    """Device-tree model -> ``orin-agx|orin-nx|orin-nano|xavier-agx|xavier-nx|nano|tx1|tx2|thor``.

    None when the string names no family we know (it is still a Jetson, just unclassified).
    """
    m = model.lower()
    if "thor" in m:
        return "thor"
    if "orin" in m:
        for variant in ("nano", "nx", "agx"):
            if variant in m:
                return f"orin-{variant}"
        return None
    if "xavier" in m:
        return "xavier-nx" if "nx" in m else "xavier-agx"
    if "tx2" in m:
        return "tx2"
    if "tx1" in m:
        return "tx1"
    if "nano" in m:
        return "nano"
    if "agx" in m:  # L4T 32 names the AGX Xavier devkit just "Jetson-AGX"
        return "xavier-agx"
    return None


def module_dla_cores(family: str) -> int | None:
    """DLA engines for a module family, from the data-sheet table; None if unknown."""
    return _DLA_CORES.get(family)


def module_gpu(family: str) -> tuple[str, str] | None:
    """(iGPU name, compute capability) for a module family, from the table; None if unknown."""
    return _GPU.get(family.split("-")[0])
