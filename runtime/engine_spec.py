"""What one TensorRT engine is, from build to cache to selection to parity.

An :class:`EngineSpec` names the device it was built for (the fingerprint key of what TensorRT
checks on load: compute capability and TensorRT version), the package graph it was built from,
the precision it computes in and the DLA core it runs on. ``edge-sdk engine build`` makes one,
the engine cache and the package's ``engines`` entries are keyed by it, selection looks engines
up by it, and parity judges the engine with its precision's tolerance. So an fp16 engine built
from the fp32 graph is found as such, served as fp16 and judged as fp16, and a DLA engine is
never mistaken for a GPU one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from edge_sdk.errors import PackageError

__all__ = ["EngineSpec", "ENGINE_PRECISIONS", "engine_candidates", "served_label"]

ENGINE_PRECISIONS = ("int8", "fp16", "fp32")
ENGINE_GRAPHS = ("s8s8", "fp32")
_DEVICE_RE = re.compile(r"sm[a-z0-9]+-trt[a-z0-9.]+", re.ASCII)


@dataclass(frozen=True)
class EngineSpec:
    """One engine: ``device`` is a fingerprint key without its DLA part (``sm87-trt10.3.0``).

    int8 engines come from the S8S8 Q/DQ graph (explicit quantization), except on DLA, which
    runs int8 only by implicit quantization: the fp32 graph with the package's calibration cache.
    """

    device: str
    graph: str
    precision: str
    dla_core: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            problems.append(f"device {self.device!r} is not a fingerprint key such as 'sm87-trt10.3.0'")
        if self.graph not in ENGINE_GRAPHS:
            problems.append(f"graph {self.graph!r} is not one of {list(ENGINE_GRAPHS)}")
        if self.precision not in ENGINE_PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {list(ENGINE_PRECISIONS)}")
        if self.graph == "s8s8" and self.precision != "int8":
            problems.append(f"the s8s8 graph builds only int8 engines, not {self.precision}")
        if self.graph == "fp32" and self.precision == "int8" and self.dla_core is None:
            problems.append("int8 from the fp32 graph (implicit, calibration cache) is built only for DLA; "
                            "on the GPU int8 comes from the s8s8 graph")
        dla = self.dla_core
        if dla is not None and (isinstance(dla, bool) or not isinstance(dla, int) or dla < 0):
            problems.append(f"dla_core {dla!r} is not None or a core number >= 0")
        elif dla is not None and self.graph == "s8s8":
            problems.append("DLA does not run explicit (Q/DQ) int8: build DLA int8 from the fp32 graph "
                            "with the calibration cache")
        if problems:
            raise PackageError(f"engine spec is invalid: {'; '.join(problems)}",
                               hint="build engines with `edge-sdk engine build`")

    @property
    def key(self) -> str:
        """The device fingerprint key, with ``-dla<N>`` for a DLA engine (``devices.Fingerprint.key``)."""
        return self.device if self.dla_core is None else f"{self.device}-dla{self.dla_core}"

    @property
    def name(self) -> str:
        """File stem: ``s8s8-int8-sm87-trt10.3.0``, ``fp32-fp16-sm87-trt10.3.0-dla0``."""
        return f"{self.graph}-{self.precision}-{self.key}"

    @property
    def label(self) -> str:
        """What predictions served by it report (see :func:`served_label`)."""
        return served_label(self.graph, self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "graph": self.graph, "precision": self.precision, "dla_core": self.dla_core}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> EngineSpec:
        """From a manifest ``engines`` entry or a cache sidecar. Entries written before engines had a
        precision are read as what `engine build` made then: int8 from s8s8, fp16 from fp32."""
        key, graph = entry.get("key"), entry.get("graph", "s8s8")
        if not isinstance(key, str):
            raise PackageError(f"engine entry {dict(entry)!r} has no 'key'", hint="rebuild it with `edge-sdk engine build`")
        device, _, dla = key.partition("-dla")
        precision = entry.get("precision") or ("int8" if graph == "s8s8" else "fp16")
        dla_core = entry.get("dla_core", int(dla) if dla.isdigit() else None)
        return cls(re.sub(r"-cuda[^-]*|-l4t[^-]*", "", device), graph, precision, dla_core)


def served_label(graph: str, precision: str) -> str:
    """``fp32``, ``fp16``, ``int8-<graph>`` (``int8-s8s8``, ``int8-u8s8``), or ``int8-implicit`` for an
    engine calibrated from the fp32 graph (DLA)."""
    if precision != "int8":
        return precision
    return "int8-implicit" if graph == "fp32" else f"int8-{graph}"


def engine_candidates(device: str, graphs: set[str] | frozenset[str], precision: str, has_calibration: bool,
                      dla_core: int | None = None) -> list[EngineSpec]:
    """The engines that serve ``precision`` ("auto", "int8", "fp16", "fp32") for a package with
    ``graphs`` (its int8 graph names), best first: int8, then fp16, then fp32 for "auto"."""
    wanted = ENGINE_PRECISIONS if precision == "auto" else (precision,)
    found = []
    for want in wanted:
        if want == "int8" and dla_core is None:
            if "s8s8" in graphs:
                found.append(EngineSpec(device, "s8s8", "int8"))
        elif want == "int8":
            if has_calibration:
                found.append(EngineSpec(device, "fp32", "int8", dla_core))
        elif not (want == "fp32" and dla_core is not None):  # DLA computes fp16 or int8 only
            found.append(EngineSpec(device, "fp32", want, dla_core))
    return found
