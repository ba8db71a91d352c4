"""Range methods: pure functions from a :class:`TensorHistogram` to a clipping range.

Symmetric (``LINEAR``) methods return ``amax``; affine ones a ``(lo, hi)`` range with
``lo <= 0 <= hi``. Every result is clipped to the values actually seen and is
positive (at least one bin width), so an all-zero tensor still gets usable
parameters. :func:`choose_range` applies a :class:`CalibrationMethod`, and ``AUTO``
keeps whichever method gives the least expected quantize-dequantize error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

from converters.calibration.histogram import TensorHistogram
from converters.calibration.schemes import (
    INT8_MAX,
    UINT8_MAX,
    QuantParams,
    Scheme,
    affine_params,
    affine_scale_zero_point,
    parse_choice,
    symmetric_params,
    symmetric_scale,
)
from edge_sdk.errors import CalibrationError

DEFAULT_PERCENTILE = 99.99
DEFAULT_QUANT_BINS = 128
#: Weight of the uniform distribution mixed into Q so that KL(P || Q) stays finite.
_KL_SMOOTHING = 1e-4
#: Points of the coarse MSE grid, and of the finer grid around its best point.
_SEARCH_POINTS = 128


class CalibrationMethod(str, Enum):
    """How a tensor's clipping range is chosen from its histogram."""

    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MSE = "mse"
    MINMAX = "minmax"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: CalibrationMethod | str) -> CalibrationMethod:
        """The method named ``value``; a clear error for an unknown name."""
        return parse_choice(cls, value, "calibration method", "'entropy' is TensorRT's default; 'auto' tries them all")


#: AUTO's candidates; on equal error the earlier (simpler) one wins.
_AUTO_ORDER = (
    CalibrationMethod.MINMAX,
    CalibrationMethod.PERCENTILE,
    CalibrationMethod.ENTROPY,
    CalibrationMethod.MSE,
)


@dataclass(frozen=True)
class TensorRange:
    """The chosen range of one tensor: ``lo == -amax`` and ``hi == amax`` for ``LINEAR``."""

    lo: float
    hi: float
    scheme: Scheme
    method: CalibrationMethod
    error: float

    @property
    def amax(self) -> float:
        """The symmetric threshold (for ``AFFINE``, the larger of ``-lo`` and ``hi``)."""
        return max(-self.lo, self.hi)

    def params(self) -> QuantParams:
        """Per-tensor quantization parameters of this range."""
        return symmetric_params(self.amax) if self.scheme is Scheme.LINEAR else affine_params(self.lo, self.hi)


def _require_data(h: TensorHistogram) -> None:
    if h.count == 0:
        raise CalibrationError(
            f"tensor {h.name!r} had no finite values ({h.nan_count} NaN, {h.inf_count} inf)",
            hint="check the calibration data, and the model for overflow before this tensor",
        )


def _clip(h: TensorHistogram, amax: float) -> float:
    """``amax`` no larger than the largest ``|x|`` seen and at least one bin width."""
    return float(max(min(amax, h.max_abs), h.bin_width))


def amax_minmax(h: TensorHistogram) -> float:
    """The largest ``|x|`` seen."""
    _require_data(h)
    return _clip(h, h.max_abs)


def _quantile(counts: np.ndarray, start: float, width: float, fraction: float) -> float:
    """The ``fraction`` quantile of a histogram, interpolated linearly inside its bin."""
    cumulative = np.cumsum(counts)
    target = fraction * float(cumulative[-1])
    k = min(int(np.searchsorted(cumulative, target, side="left" if target > 0 else "right")), counts.size - 1)
    before = float(cumulative[k - 1]) if k else 0.0
    inside = (target - before) / counts[k] if counts[k] else 0.0
    return start + (k + min(inside, 1.0)) * width


def _check_percentile(percentile: float) -> None:
    if isinstance(percentile, bool) or not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise CalibrationError(f"percentile {percentile!r} is not in (0, 100]", hint="e.g. 99.99")


def amax_percentile(h: TensorHistogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The ``percentile``-th percentile of ``|x|``."""
    _check_percentile(percentile)
    _require_data(h)
    return _clip(h, _quantile(h.abs_counts(), 0.0, h.bin_width, percentile / 100))


#: Largest fraction of values the entropy threshold may clip (guards KL's degenerate minimum).
MAX_ENTROPY_CLIPPED = 0.01


def _xlogx(x: np.ndarray) -> np.ndarray:
    return x * np.log(np.where(x > 0, x, 1.0))


def _entropy_bins(hist: np.ndarray, num_quant_bins: int) -> int:
    """How many leading bins of ``hist`` (a ``|x|`` histogram) the KL-optimal threshold keeps.

    For every candidate ``i`` in ``[num_quant_bins, len(hist)]``: P is ``hist[:i]`` with the
    clipped outliers added to its last bin; Q merges ``hist[:i]`` into ``num_quant_bins``
    contiguous groups (sizes differ by at most one bin) and spreads each group's mass evenly
    over the bins where P is non-zero. Within a group Q is constant on those bins, so
    ``sum P log Q`` reduces to one term per group and all candidates are evaluated at once
    from cumulative sums (no loop). Q is mixed with a uniform distribution of weight
    ``_KL_SMOOTHING``: finite even where P > 0 = Q, and no negative bins (unlike onnxruntime's
    ``smooth_distribution``); P needs no smoothing since ``0 log 0 = 0``.
    """
    h = hist.astype(np.float64)
    if h.size <= num_quant_bins:
        return h.size
    kept = np.arange(num_quant_bins, h.size + 1)
    mass = np.concatenate(([0.0], np.cumsum(h)))
    nonzero = np.concatenate(([0], np.cumsum(h > 0)))
    total = mass[-1]
    outliers = total - mass[kept]
    last = h[kept - 1]
    p_log_p = np.concatenate(([0.0], np.cumsum(_xlogx(h))))[kept - 1] + _xlogx(last + outliers)
    edges = (np.arange(num_quant_bins + 1) * kept[:, None] + num_quant_bins - 1) // num_quant_bins
    group_mass = np.diff(mass[edges], axis=1)
    group_nonzero = np.diff(nonzero[edges], axis=1).astype(np.float64)
    group_nonzero[:, -1] += (last == 0) & (outliers > 0)
    denominator = group_nonzero * mass[kept][:, None]
    q = np.divide(group_mass, denominator, out=np.zeros_like(group_mass), where=denominator > 0)
    q = (1 - _KL_SMOOTHING) * q + _KL_SMOOTHING / kept[:, None]
    group_mass[:, -1] += outliers
    divergence = (p_log_p - np.sum(group_mass * np.log(q), axis=1)) / total - np.log(total)
    # KL collapses when the mass sits far from zero (e.g. after pooling): clipping everything into
    # the last bin makes P and Q the same spike. Never clip more than MAX_ENTROPY_CLIPPED of the values.
    divergence[outliers > MAX_ENTROPY_CLIPPED * total] = np.inf
    return int(kept[np.argmin(divergence)])


def _check_quant_bins(num_quant_bins: int) -> None:
    if isinstance(num_quant_bins, bool) or not isinstance(num_quant_bins, int) or num_quant_bins < 2:
        raise CalibrationError(f"num_quant_bins={num_quant_bins!r} is not an integer >= 2", hint="int8 uses 128")


def amax_entropy(h: TensorHistogram, num_quant_bins: int = DEFAULT_QUANT_BINS) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q) over the ``|x|`` histogram.

    As in Migacz, "8-bit Inference with TensorRT" (GTC 2017) and onnxruntime's
    ``get_entropy_threshold``, except that the merged groups are balanced (not a remainder
    dumped into the last one) and the smoothing described in :func:`_entropy_bins`. Every bin
    count from ``num_quant_bins`` to ``num_bins`` is a candidate (no stride needed), so the
    threshold, the upper edge of the last kept bin, is at least ``num_quant_bins`` bins wide.
    """
    _check_quant_bins(num_quant_bins)
    _require_data(h)
    return _clip(h, _entropy_bins(h.abs_counts(), num_quant_bins) * h.bin_width)


def _symmetric_errors(h: TensorHistogram, scales: np.ndarray) -> np.ndarray:
    """Mean squared int8 quantize-dequantize error at each scale, over the ``|x|`` bin centres.

    Both signs clip at 127 steps; ONNX lets values below ``-amax`` reach -128, a difference of
    one step on already-clipped outliers that the estimate ignores.
    """
    counts = h.abs_counts()
    used = counts > 0
    centres, weights = h.abs_centres()[used], counts[used].astype(np.float64)
    scale = scales.astype(np.float64)[:, None]
    restored = np.minimum(np.rint(centres / scale), INT8_MAX) * scale
    return ((centres - restored) ** 2 @ weights) / weights.sum()


def _affine_errors(h: TensorHistogram, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Mean squared uint8 quantize-dequantize error for each range, over the signed bin centres."""
    used = h.counts > 0
    centres, weights = h.centres[used], h.counts[used].astype(np.float64)
    scale32, zero_point = affine_scale_zero_point(lo, hi)
    scale, zero_point = scale32.astype(np.float64)[:, None], zero_point[:, None]
    restored = (np.clip(np.rint(centres / scale) + zero_point, 0, UINT8_MAX) - zero_point) * scale
    return ((centres - restored) ** 2 @ weights) / weights.sum()


def _search(errors: Callable[[np.ndarray], np.ndarray], upper: float) -> float:
    """The candidate in ``(0, upper]`` of least error: a coarse grid, then a fine grid around its best."""
    step = upper / _SEARCH_POINTS
    coarse = step * np.arange(1, _SEARCH_POINTS + 1)
    best = coarse[np.argmin(errors(coarse))]
    fine = np.concatenate(([best], np.linspace(max(best - step, step / 2), min(best + step, upper), _SEARCH_POINTS)))
    return float(fine[np.argmin(errors(fine))])


def amax_mse(h: TensorHistogram) -> float:
    """The symmetric threshold minimising the expected squared int8 quantize-dequantize error.

    Searched on a grid of ``_SEARCH_POINTS`` thresholds over ``(0, max |x|]``, refined once.
    """
    _require_data(h)
    if h.max_abs == 0:
        return _clip(h, 0.0)
    return _clip(h, _search(lambda amax: _symmetric_errors(h, symmetric_scale(amax)), h.max_abs))


def _affine_mse(h: TensorHistogram, lo: float, hi: float) -> tuple[float, float]:
    """Coordinate descent from ``[lo, hi]``: search ``hi`` with ``lo`` fixed, then ``lo``; twice."""
    lowest, highest = lo, hi
    for _ in range(2):
        if highest > 0:
            hi = _search(lambda c: _affine_errors(h, np.full_like(c, lo), c), highest)
        if lowest < 0:
            lo = -_search(lambda c: _affine_errors(h, -c, np.full_like(c, hi)), -lowest)
    return lo, hi


def range_affine(
    h: TensorHistogram,
    method: CalibrationMethod | str,
    percentile: float = DEFAULT_PERCENTILE,
    num_quant_bins: int = DEFAULT_QUANT_BINS,
) -> tuple[float, float]:
    """A uint8 range ``lo <= 0 <= hi`` by ``method`` (not AUTO: see :func:`choose_range`).

    PERCENTILE clips ``(100 - percentile)`` % off each tail. ENTROPY runs the KL search on
    each side's one-sided histogram separately (each as if it had ``num_quant_bins`` levels,
    ignoring the other side). MSE is a coordinate descent on the two ends.
    """
    _require_data(h)
    method = CalibrationMethod.parse(method)
    lowest, highest = min(h.min, 0.0), max(h.max, 0.0)
    lo, hi = lowest, highest
    if method is CalibrationMethod.PERCENTILE:
        _check_percentile(percentile)
        tail = (100 - percentile) / 100
        lo = _quantile(h.counts, -h.bound, h.bin_width, tail)
        hi = _quantile(h.counts, -h.bound, h.bin_width, 1 - tail)
    elif method is CalibrationMethod.ENTROPY:
        _check_quant_bins(num_quant_bins)
        n = h.num_bins
        hi = _entropy_bins(h.counts[n:], num_quant_bins) * h.bin_width if highest > 0 else 0.0
        lo = -_entropy_bins(h.counts[:n][::-1], num_quant_bins) * h.bin_width if lowest < 0 else 0.0
    elif method is CalibrationMethod.MSE:
        lo, hi = _affine_mse(h, lowest, highest)
    elif method is CalibrationMethod.AUTO:
        raise CalibrationError("range_affine does not take AUTO", hint="use choose_range(h, 'auto', 'affine')")
    lo, hi = float(min(max(lo, lowest), 0.0)), float(max(min(hi, highest), 0.0))
    return (lo, hi) if hi > lo else (lo, lo + h.bin_width)


def quantization_error(
    h: TensorHistogram, amax_or_range: float | tuple[float, float], scheme: Scheme | str
) -> float:
    """Expected squared quantize-dequantize error per value, over the histogram's bin centres."""
    _require_data(h)
    scheme = Scheme.parse(scheme)
    if scheme is Scheme.LINEAR and not isinstance(amax_or_range, tuple):
        params = symmetric_params(amax_or_range)
        return float(_symmetric_errors(h, params.scale.reshape(1))[0])
    if scheme is Scheme.AFFINE and isinstance(amax_or_range, tuple):
        lo, hi = amax_or_range
        affine_params(lo, hi)  # validates the range
        return float(_affine_errors(h, np.array([lo]), np.array([hi]))[0])
    raise CalibrationError(
        f"{amax_or_range!r} does not fit scheme {scheme.value!r}",
        hint="pass an amax for 'linear' and a (lo, hi) tuple for 'affine'",
    )


def choose_range(
    h: TensorHistogram,
    method: CalibrationMethod | str,
    scheme: Scheme | str,
    percentile: float = DEFAULT_PERCENTILE,
    num_quant_bins: int = DEFAULT_QUANT_BINS,
) -> TensorRange:
    """The range of ``h`` by ``method`` under ``scheme``, with its expected error."""
    method, scheme = CalibrationMethod.parse(method), Scheme.parse(scheme)
    if method is CalibrationMethod.AUTO:
        tried = [choose_range(h, m, scheme, percentile, num_quant_bins) for m in _AUTO_ORDER]
        return min(tried, key=lambda r: r.error)
    if scheme is Scheme.AFFINE:
        lo, hi = range_affine(h, method, percentile, num_quant_bins)
        return TensorRange(lo, hi, scheme, method, quantization_error(h, (lo, hi), scheme))
    if method is CalibrationMethod.ENTROPY:
        amax = amax_entropy(h, num_quant_bins)
    elif method is CalibrationMethod.PERCENTILE:
        amax = amax_percentile(h, percentile)
    elif method is CalibrationMethod.MSE:
        amax = amax_mse(h)
    else:
        amax = amax_minmax(h)
    return TensorRange(-amax, amax, scheme, method, quantization_error(h, amax, scheme))
