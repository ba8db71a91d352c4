"""What a TensorRT engine is bound to: GPU architecture, TensorRT version, CUDA, L4T, DLA core.

A serialized TensorRT engine deserializes only with the exact TensorRT version that built it,
and runs only on the compute capability (``sm``) it was built for, on the DLA core or the GPU
it targets. A ``Fingerprint`` records those facts for one device (or one built engine), names
engine files by a filesystem-safe :attr:`Fingerprint.key`, and says whether an engine fits.

Decision: :meth:`Fingerprint.matches` and :attr:`Fingerprint.key` decide on TensorRT version
(exact), compute capability and DLA core only. CUDA and L4T differences are reported but do not
refuse an engine: TensorRT's own deserialization check is on its version and the device's
architecture, and the same TensorRT build runs across CUDA minor releases. So a JetPack patch
update that keeps TensorRT (6.1 -> 6.2: L4T 36.4.0 -> 36.4.3, TensorRT 10.3.0 both) keeps every
engine built or carried for the device.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from edge_sdk.errors import DeviceError

from .probe import DeviceInfo

__all__ = ["Fingerprint", "fingerprint"]

_log = logging.getLogger(__name__)

_LEADING_NUMBERS = re.compile(r"^\s*v?(\d+(?:\.\d+)*)", re.ASCII)
_PATTERNS: dict[str, re.Pattern[str]] = {
    "gpu": re.compile(r"^\d+\.\d+$", re.ASCII),  # compute capability "8.7"
    "tensorrt": re.compile(r"^\d+(?:\.\d+){0,2}$", re.ASCII),  # "10.3.0"
    "cuda": re.compile(r"^\d+(?:\.\d+)?$", re.ASCII),  # "12.2"
    "l4t": re.compile(r"^\d+(?:\.\d+)*$", re.ASCII),  # "36.3.0"
}
_EXAMPLES = {"gpu": "'8.7'", "tensorrt": "'10.3.0'", "cuda": "'12.2'", "l4t": "'36.3.0'"}
_HINT = "rebuild the engine (or the package) with this edge-sdk; fingerprints come from fingerprint(detect())"


@dataclass(frozen=True)
class Fingerprint:
    """The facts a TensorRT engine depends on. ``None`` means "absent" (no GPU, no TensorRT, ...)."""

    gpu: str | None = None  # compute capability, "8.7"
    gpu_name: str | None = None  # informative only; not part of the key or of matching
    tensorrt: str | None = None  # major.minor.patch, "10.3.0"
    cuda: str | None = None  # major.minor, "12.2"
    l4t: str | None = None  # "36.3.0"; None off Jetson
    dla_core: int | None = None  # the DLA core an engine targets; None = the GPU

    def __post_init__(self) -> None:
        for name, pattern in _PATTERNS.items():
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
                raise DeviceError(f"fingerprint {name} is {value!r}; expected None or a version like {_EXAMPLES[name]}",
                                  hint=_HINT)
        if self.gpu_name is not None and not isinstance(self.gpu_name, str):
            raise DeviceError(f"fingerprint gpu_name is {self.gpu_name!r}; expected a string or None", hint=_HINT)
        dla = self.dla_core
        if dla is not None and (isinstance(dla, bool) or not isinstance(dla, int) or dla < 0):
            raise DeviceError(f"fingerprint dla_core is {dla!r}; expected None (the GPU) or a core number >= 0",
                              hint=_HINT)

    @property
    def key(self) -> str:
        """Stable, filesystem-safe name of what decides, e.g. ``sm87-trt10.3.0`` (``-dla0`` for DLA)."""
        sm = self.gpu.replace(".", "") if self.gpu else "none"
        parts = [f"sm{sm}", f"trt{self.tensorrt or 'none'}"]
        if self.dla_core is not None:
            parts.append(f"dla{self.dla_core}")
        return "-".join(parts)

    @property
    def can_build(self) -> bool:
        """TensorRT and a GPU with a known compute capability are present."""
        return self.tensorrt is not None and self.gpu is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_dict`. Every field must be present; keys a newer writer adds are ignored."""
        if not isinstance(data, Mapping):
            raise DeviceError(f"fingerprint is a {type(data).__name__}; expected an object", hint=_HINT)
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise DeviceError(f"fingerprint {dict(data)!r} has no {', '.join(missing)}", hint=_HINT)
        return cls(**{name: data[name] for name in names})

    def matches(self, other: Fingerprint) -> tuple[bool, str]:
        """Whether an engine built with ``self`` runs on a device described by ``other``, and why.

        Only compute capability, TensorRT version and DLA core decide (see the module docstring);
        CUDA and L4T differences are named in the reason. The reason is "" when all fields agree.
        """
        decisive = [n for n in ("tensorrt", "gpu", "dla_core") if getattr(self, n) != getattr(other, n)]
        advisory = [n for n in ("cuda", "l4t") if getattr(self, n) != getattr(other, n)]
        if not decisive and not advisory:
            return True, ""
        differing = decisive + advisory
        reason = f"engine built for {self._describe(differing)}; this device has {other._describe(differing)}"
        if decisive:
            return False, reason
        return True, f"{reason} (compatible: TensorRT and sm match; CUDA and L4T do not decide)"

    def _describe(self, names: list[str]) -> str:
        words = {
            "tensorrt": f"TensorRT {self.tensorrt or 'none'}",
            "gpu": f"sm{self.gpu.replace('.', '')}" if self.gpu else "no GPU",
            "dla_core": f"DLA core {self.dla_core}" if self.dla_core is not None else "the GPU (no DLA core)",
            "cuda": f"CUDA {self.cuda or 'none'}",
            "l4t": f"L4T {self.l4t or 'none'}",
        }
        main = " on ".join(words[n] for n in names if n in ("tensorrt", "gpu", "dla_core"))
        rest = [words[n] for n in names if n in ("cuda", "l4t")]
        return ", ".join([main, *rest] if main else rest)


def _leading_version(value: str | None, parts: int | None, what: str) -> str | None:
    """The first ``parts`` numeric components of ``value`` ("10.3.0.26+cuda12" -> "10.3.0")."""
    if value is None:
        return None
    match = _LEADING_NUMBERS.match(value)
    if match is None:
        _log.warning("%s version %r has no leading number; fingerprinting it as absent", what, value)
        return None
    return ".".join(match.group(1).split(".")[:parts])


def _compute_capability(value: str | None) -> str | None:
    if value is None:
        return None
    normalised = _leading_version(value, 2, "compute capability")
    if normalised is None or "." not in normalised:
        _log.warning("compute capability %r is not major.minor; fingerprinting it as absent", value)
        return None
    return normalised


def fingerprint(info: DeviceInfo, dla_core: int | None = None) -> Fingerprint:
    """The fingerprint of an engine built on (or for) the device ``info`` describes.

    Versions are cut to what matters: TensorRT to major.minor.patch, CUDA to major.minor
    (``"12.2.20230823"`` -> ``"12.2"``). ``dla_core`` must be one the device has.
    """
    result = Fingerprint(
        gpu=_compute_capability(info.gpu_compute_capability),
        gpu_name=info.gpu_name,
        tensorrt=_leading_version(info.tensorrt_version, 3, "TensorRT"),
        cuda=_leading_version(info.cuda_version, 2, "CUDA"),
        l4t=_leading_version(info.l4t_release, None, "L4T"),
        dla_core=dla_core,
    )
    if dla_core is not None and info.dla_cores is not None and dla_core >= info.dla_cores:
        raise DeviceError(
            f"DLA core {dla_core} requested; this device has {info.dla_cores} DLA core(s)",
            hint="pass dla_core=None to target the GPU" if info.dla_cores == 0
            else f"choose a core in 0..{info.dla_cores - 1}, or None for the GPU",
        )
    return result
