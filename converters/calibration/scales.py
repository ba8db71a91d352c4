"""The portable scale file (tensor -> amax) and its rendering to a TensorRT calibration cache.

The scale file is the calibration's durable record: one symmetric threshold ``amax`` per tensor
(plus the affine range where one was measured), the method that chose it, and sha256 hashes of the
calibration data and of the fp32 graph, so a scale file is never applied to a graph it was not
made for. ``to_trt_cache`` renders it in the text format that TensorRT's ``IInt8EntropyCalibrator2``
writes and that trtexec ``--calib`` and DeepStream's ``int8-calib-file`` read::

    TRT-8601-EntropyCalibration2
    input: 3c010204

one ``name: hex`` line per tensor, the hex being the big-endian IEEE-754 float32 bits of
``scale = amax / 127`` (as read back by onnxruntime's TensorRT provider, ``ReadDynamicRange``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Union

import numpy as np

from edge_sdk.errors import CalibrationError

__all__ = [
    "TensorScale", "ScaleFile", "parse_trt_cache", "trt_version_code",
    "graph_hash", "data_hash", "check_matches",
]

SCALE_FILE_VERSION = 1
INT8_MAX = 127.0  # TensorRT's symmetric int8 range is [-127, 127] for the scale: scale = amax / 127
METHODS = ("entropy", "percentile", "mse", "minmax")
SCHEMES = ("linear", "affine")
HISTOGRAM_KEYS = frozenset({"min", "max", "count", "nan_count", "inf_count", "bins", "bound"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEADER = re.compile(r"TRT-\d+-\w+")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")

Batch = Union[np.ndarray, Mapping[str, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class TensorScale:
    """The range chosen for one tensor: ``amax`` is the symmetric threshold TensorRT uses."""

    name: str
    amax: float
    method: str
    scheme: str = "linear"
    lo: float | None = None
    hi: float | None = None
    histogram: dict[str, float] | None = None
    error: float | None = None

    def __post_init__(self) -> None:
        where = f"tensor {self.name!r}"
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "\r\n"):
            raise CalibrationError(f"tensor name {self.name!r} is empty or spans lines", hint="name a graph tensor")
        if not _is_number(self.amax) or not math.isfinite(self.amax) or self.amax <= 0:
            raise CalibrationError(f"{where} has amax {self.amax!r}; expected a finite number > 0",
                                   hint="re-calibrate, or leave this tensor in float")
        _check_choice(where, "method", self.method, METHODS)
        _check_choice(where, "scheme", self.scheme, SCHEMES)
        if self.scheme == "affine" and not _ordered(self.lo, self.hi):
            raise CalibrationError(f"{where} is affine with range lo={self.lo!r}, hi={self.hi!r}; "
                                   "expected finite lo < hi", hint="record the measured range")
        if self.histogram is not None:
            _check_histogram(where, self.histogram)
        if self.error is not None and not _finite(self.error):
            raise CalibrationError(f"{where} has error {self.error!r}; expected a finite number or None")

    @property
    def scale(self) -> float:
        """TensorRT's int8 scale for this tensor."""
        return self.amax / INT8_MAX


@dataclass(frozen=True, kw_only=True)
class ScaleFile:
    """Scales for a whole graph, tied to the graph and the data they were measured on."""

    version: int = SCALE_FILE_VERSION
    tensors: dict[str, TensorScale]
    calibration_hash: str
    graph_hash: str
    samples: int
    method: str
    created_by: str

    def __post_init__(self) -> None:
        _check_version(self.version)
        for key in ("calibration_hash", "graph_hash"):
            if not isinstance(getattr(self, key), str) or not _SHA256.fullmatch(getattr(self, key)):
                raise CalibrationError(f"scale file {key} {getattr(self, key)!r} is not a sha256 hex digest",
                                       hint="compute it with graph_hash() / data_hash()")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise CalibrationError(f"scale file samples is {self.samples!r}; expected an integer >= 1")
        _check_choice("scale file", "method", self.method, (*METHODS, "auto"))
        for key, scale in self.tensors.items():
            if not isinstance(scale, TensorScale) or scale.name != key:
                raise CalibrationError(f"scale file entry {key!r} holds {scale!r}; "
                                       f"expected a TensorScale named {key!r}")

    def to_json(self) -> str:
        """A stable JSON text (sorted keys, one trailing newline)."""
        data = asdict(self)
        data["tensors"] = {name: {k: v for k, v in t.items() if k != "name"} for name, t in data["tensors"].items()}
        return json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ScaleFile:
        """Parse and validate a scale file written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"scale file is not valid JSON ({exc})", hint="re-calibrate") from None
        if not isinstance(data, dict):
            raise CalibrationError(f"scale file holds a {type(data).__name__}; expected a JSON object")
        _check_version(data.get("version"))  # before anything else: another version may lay out tensors differently
        tensors = data.get("tensors")
        if not isinstance(tensors, dict):
            raise CalibrationError("scale file has no 'tensors' object", hint="re-calibrate")
        fields = {k: v for k, v in data.items() if k != "tensors"}
        return _build(cls, "scale file", tensors={n: _tensor(n, t) for n, t in tensors.items()}, **fields)

    def to_trt_cache(self, trt_version: str) -> str:
        """Render TensorRT's calibration cache text: header, then ``name: hex`` lines sorted by name.

        ``trt_version`` is the reading TensorRT's: it ignores a cache whose header names another."""
        lines = [f"TRT-{trt_version_code(trt_version)}-EntropyCalibration2"]
        lines += [f"{name}: {struct.pack('>f', self.tensors[name].scale).hex()}" for name in sorted(self.tensors)]
        return "\n".join(lines) + "\n"


def trt_version_code(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` for "major.minor[.patch[.build]]", as used in the cache header.

    TensorRT 8.x defines it as major*1000 + minor*100 + patch ("8.6.1" -> 8601, "8.5.2" -> 8502);
    TensorRT 10+ as major*10000 + minor*100 + patch ("10.3.0" -> 100300). The build number is ignored.
    """
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)?", str(version).strip())
    if not match:
        raise CalibrationError(f"TensorRT version {version!r} is not 'major.minor[.patch]'", hint="e.g. '8.6.1'")
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    if major >= 10 and minor < 100 and patch < 100:
        return major * 10000 + minor * 100 + patch
    if major < 10 and minor < 10 and patch < 100:
        return major * 1000 + minor * 100 + patch
    raise CalibrationError(f"TensorRT version {version!r} has no cache header code", hint="e.g. '8.6.1' or '10.3.0'")


def parse_trt_cache(text: str) -> tuple[str, dict[str, float]]:
    """Read a TensorRT calibration cache into (header, tensor name -> scale)."""
    lines = text.splitlines()
    if not lines or not _HEADER.fullmatch(lines[0].strip()):
        first = lines[0] if lines else ""
        raise CalibrationError(f"calibration cache line 1 is {first!r}; expected a header like "
                               "'TRT-8601-EntropyCalibration2'", hint="pass a cache written by TensorRT")
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, hexbits = line.rstrip().rpartition(": ")
        if not sep or not name or not _HEX.fullmatch(hexbits):
            raise CalibrationError(f"calibration cache line {number} is {line!r}; expected 'tensor: 8 hex digits'")
        if name in scales:
            raise CalibrationError(f"calibration cache line {number} repeats tensor {name!r}")
        scale = struct.unpack(">f", int(hexbits, 16).to_bytes(4, "big"))[0]
        if not math.isfinite(scale) or scale < 0:
            raise CalibrationError(f"calibration cache line {number} gives {name!r} scale {scale}; "
                                   "expected a finite number >= 0")
        scales[name] = scale
    return lines[0].strip(), scales


def graph_hash(graph_bytes: bytes) -> str:
    """sha256 of the serialized fp32 ONNX graph."""
    return hashlib.sha256(graph_bytes).hexdigest()


def data_hash(batches: Iterable[Batch]) -> str:
    """sha256 over the calibration data: each array's dtype, shape and bytes (and input name, if a dict)."""
    digest = hashlib.sha256()
    for index, batch in enumerate(batches):
        items = sorted(batch.items()) if isinstance(batch, Mapping) else [("", batch)]
        digest.update(f"batch {index} {len(items)}\n".encode())
        for name, value in items:
            array = np.ascontiguousarray(value)
            if array.dtype.hasobject:
                raise CalibrationError(f"calibration batch {index} input {name!r} has dtype object; "
                                       "expected a numeric array")
            digest.update(f"{name!r} {array.dtype.str} {array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def check_matches(scale_file: ScaleFile, graph_bytes: bytes) -> None:
    """Refuse a scale file made for another graph, instead of silently misapplying it."""
    actual = graph_hash(graph_bytes)
    if actual != scale_file.graph_hash:
        raise CalibrationError(
            f"scale file is for graph sha256 {scale_file.graph_hash[:12]}..., but this graph is "
            f"{actual[:12]}...: calibration was made for another graph; re-calibrate",
            hint="run calibration again on this exact fp32 model")


def _tensor(name: str, data: Any) -> TensorScale:
    if not isinstance(data, dict):
        raise CalibrationError(f"scale file tensor {name!r} holds a {type(data).__name__}; expected an object")
    return _build(TensorScale, f"scale file tensor {name!r}", name=name, **data)


def _build(cls: Any, where: str, **fields: Any) -> Any:
    try:
        return cls(**fields)
    except TypeError as exc:  # unknown or missing fields
        raise CalibrationError(f"{where} has wrong fields ({exc})", hint="re-calibrate") from None


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or version != SCALE_FILE_VERSION:
        raise CalibrationError(f"scale file version {version!r} is not supported; this SDK reads "
                               f"version {SCALE_FILE_VERSION}", hint="upgrade edge-sdk or re-calibrate")


def _check_histogram(where: str, histogram: Any) -> None:
    if not isinstance(histogram, dict) or not set(histogram) <= HISTOGRAM_KEYS:
        raise CalibrationError(f"{where} has histogram {histogram!r}; expected a summary with keys among "
                               f"{sorted(HISTOGRAM_KEYS)}", hint="keep a summary, not the bins")
    bad = sorted(k for k, v in histogram.items() if not _finite(v))
    if bad:
        raise CalibrationError(f"{where} has non-numeric or non-finite histogram values for {bad}")


def _check_choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CalibrationError(f"{where} has {key} {value!r}; expected one of {', '.join(choices)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _ordered(lo: Any, hi: Any) -> bool:
    return _finite(lo) and _finite(hi) and lo < hi
