"""Int8 quantization schemes, their parameters, and reference quantize/dequantize.

``LINEAR`` is symmetric int8 with zero point 0 and ``scale = amax / 127``, so that
``[-amax, amax]`` maps onto ``[-127, 127]``: TensorRT uses ±127, keeping the grid
symmetric around zero. ``AFFINE`` is uint8 ``[0, 255]`` with an integer zero point,
so that 0.0 is exactly representable (the seed code called it "bilinear").

:func:`quantize` and :func:`dequantize` follow ONNX QuantizeLinear/DequantizeLinear
bit for bit: float32 arithmetic, round half to even, per-axis broadcasting, and
saturation to the full type range. For int8 that is ``[-128, 127]``: only values
below ``-amax`` (already clipped) can reach -128, exactly as in onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import numpy as np

from edge_sdk.errors import CalibrationError

#: Smallest scale: the smallest normal float32, so that ``1 / scale`` stays finite.
MIN_SCALE = float(np.finfo(np.float32).tiny)
INT8_MAX = 127
UINT8_MAX = 255
_LIMITS = {"int8": (-128, INT8_MAX), "uint8": (0, UINT8_MAX)}  # ONNX saturation bounds


E = TypeVar("E", bound=Enum)


def parse_choice(cls: type[E], value: E | str, what: str, hint: str) -> E:
    """The member of ``cls`` named ``value``; a clear error naming ``what`` and the valid names."""
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise CalibrationError(f"{what} {value!r} is unknown; expected one of {valid}", hint=hint) from None


class Scheme(str, Enum):
    """How a float range maps onto 8-bit integers."""

    LINEAR = "linear"
    AFFINE = "affine"

    @classmethod
    def parse(cls, value: Scheme | str) -> Scheme:
        """The scheme named ``value``; a clear error for an unknown name."""
        return parse_choice(cls, value, "quantization scheme",
                            "'linear' is symmetric int8 (TensorRT), 'affine' is uint8 with a zero point")


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale and zero point (scalars, or 1-D along ``axis`` for per-channel), and the integer type."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _LIMITS:
            raise CalibrationError(f"dtype {self.dtype!r} is not one of {sorted(_LIMITS)}")
        scale = np.array(self.scale, dtype=np.float32)  # copies: freezing must not touch the caller's array
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise CalibrationError(f"scale {scale} is not finite and positive", hint="derive it from a range")
        lo, hi = _LIMITS[self.dtype]
        raw = np.asarray(self.zero_point)
        if not (np.issubdtype(raw.dtype, np.integer) and np.all((raw >= lo) & (raw <= hi))):
            raise CalibrationError(f"zero point {raw} is not an integer in [{lo}, {hi}] for {self.dtype}")
        zero_point = raw.astype(self.dtype)
        expected_ndim = 0 if self.axis is None else 1
        if scale.ndim != expected_ndim or zero_point.shape != scale.shape:
            raise CalibrationError(
                f"scale shape {scale.shape} and zero point shape {zero_point.shape} do not fit axis={self.axis}",
                hint="use scalars for per-tensor and equal 1-D arrays for per-axis parameters",
            )
        for array in (scale, zero_point):
            array.setflags(write=False)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)


def _float32_scale(value: np.ndarray | float) -> np.ndarray:
    return np.maximum(np.asarray(value, dtype=np.float64), MIN_SCALE).astype(np.float32)


def symmetric_scale(amax: np.ndarray | float) -> np.ndarray:
    """Vectorised int8 scale ``amax / 127`` as float32, at least :data:`MIN_SCALE`."""
    return _float32_scale(np.asarray(amax, np.float64) / INT8_MAX)


def symmetric_params(amax: float) -> QuantParams:
    """int8 parameters for ``[-amax, amax]`` (``scale = amax / 127``, zero point 0)."""
    if not (np.isfinite(amax) and amax > 0):
        raise CalibrationError(f"amax {amax!r} is not finite and positive", hint="calibrate on finite data")
    return QuantParams(symmetric_scale(amax), np.zeros((), np.int8), "int8")


def affine_scale_zero_point(lo: np.ndarray | float, hi: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised uint8 scale (float32) and integer zero point (float64) for ranges ``lo <= 0 <= hi``."""
    scale = _float32_scale((np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / UINT8_MAX)
    zero_point = np.clip(np.rint(-np.asarray(lo, np.float64) / scale), 0, UINT8_MAX)
    return scale, zero_point


def affine_params(lo: float, hi: float) -> QuantParams:
    """uint8 parameters covering ``[lo, hi]``; the zero point makes 0.0 exact."""
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi and hi > lo):
        raise CalibrationError(
            f"range [{lo!r}, {hi!r}] is not finite with lo <= 0 <= hi and hi > lo",
            hint="extend the range to include 0 (affine quantization must represent 0 exactly)",
        )
    scale, zero_point = affine_scale_zero_point(lo, hi)
    return QuantParams(scale, zero_point.astype(np.uint8), "uint8")


def per_channel_weight_params(weight: np.ndarray, axis: int, qmax: int = INT8_MAX) -> QuantParams:
    """Symmetric int8 parameters per slice along ``axis`` (amax = max ``|w|`` of each channel).

    ``qmax`` 64 gives onnxruntime's ``reduce_range`` weights in ``[-64, 64]``, whose products with
    uint8 activations x86 kernels without VNNI can pair-sum in int16 without saturating."""
    w = np.asarray(weight)
    if not -w.ndim <= axis < w.ndim:
        raise CalibrationError(f"axis {axis} is out of range for a weight of shape {w.shape}")
    axis %= w.ndim
    if w.size == 0 or not np.all(np.isfinite(w)):
        raise CalibrationError(
            f"weight of shape {w.shape} is empty or holds NaN/inf", hint="check the model's initializers"
        )
    amax = np.max(np.abs(w.astype(np.float64)), axis=tuple(i for i in range(w.ndim) if i != axis))
    # An all-zero channel gets MIN_SCALE: every weight then quantizes to 0, exactly.
    scale = _float32_scale(amax / qmax)
    return QuantParams(scale, np.zeros(amax.shape, np.int8), "int8", axis)


def _along_axis(values: np.ndarray, ndim: int, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Reshape per-axis parameters so that they broadcast against an array of ``shape``."""
    if axis is None:
        return values
    if not -ndim <= axis < ndim or shape[axis] != values.size:
        raise CalibrationError(
            f"per-axis parameters of length {values.size} on axis {axis} do not fit an array of shape {shape}",
            hint="quantize along the axis the parameters were computed for",
        )
    layout = [1] * ndim
    layout[axis] = values.size
    return values.reshape(layout)


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``; NaN maps to the zero point."""
    x32 = np.asarray(x, dtype=np.float32)
    scale = _along_axis(params.scale, x32.ndim, x32.shape, params.axis)
    zero_point = _along_axis(params.zero_point, x32.ndim, x32.shape, params.axis).astype(np.float32)
    lo, hi = _LIMITS[params.dtype]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.clip(np.rint(x32 / scale) + zero_point, lo, hi)
    q = np.where(np.isnan(q), zero_point, q)
    return q.astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    q_int = np.asarray(q).astype(np.int32)
    scale = _along_axis(params.scale, q_int.ndim, q_int.shape, params.axis)
    zero_point = _along_axis(params.zero_point, q_int.ndim, q_int.shape, params.axis).astype(np.int32)
    return ((q_int - zero_point).astype(np.float32) * scale).astype(np.float32)
