"""Streaming signed histograms of tensors, for int8 range calibration.

Each tensor gets ``2 * num_bins`` equal bins over ``[-bound, +bound]``. The first
batch with finite values sets ``bound`` to its max ``|x|``; a later batch beyond
it doubles the bound (as often as needed) and merges neighbouring bins pairwise.
Because the new edges are a subset of the old ones the re-binning is exact, and
memory stays ``O(num_bins)`` per tensor: data are never kept. NaN and inf are
counted and left out of the histogram, so a bad batch never crashes calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_sdk.errors import CalibrationError

#: Smallest bound: an all-zero tensor still gets bins of positive width.
MIN_BOUND = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, eq=False)
class TensorHistogram:
    """Histogram of one tensor's finite values; ``min``/``max`` are NaN while ``count`` is 0."""

    name: str
    counts: np.ndarray
    bound: float
    min: float
    max: float
    count: int
    nan_count: int
    inf_count: int

    @property
    def num_bins(self) -> int:
        """Bins per sign: ``counts`` has twice as many, and ``abs_counts()`` as many."""
        return self.counts.size // 2

    @property
    def bin_width(self) -> float:
        return self.bound / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        """The ``2 * num_bins + 1`` edges of ``counts``, from ``-bound`` to ``+bound``."""
        return np.linspace(-self.bound, self.bound, self.counts.size + 1)

    @property
    def centres(self) -> np.ndarray:
        """Centres of the signed bins."""
        return (np.arange(self.counts.size) - self.num_bins + 0.5) * self.bin_width

    @property
    def max_abs(self) -> float:
        """Largest finite ``|x|`` seen (0.0 when none)."""
        return max(-self.min, self.max) if self.count else 0.0

    def abs_counts(self) -> np.ndarray:
        """The ``|x|`` histogram: ``num_bins`` bins over ``[0, bound]`` (what entropy calibration uses)."""
        n = self.num_bins
        return self.counts[n:] + self.counts[:n][::-1]

    def abs_centres(self) -> np.ndarray:
        """Centres of the ``abs_counts()`` bins."""
        return (np.arange(self.num_bins) + 0.5) * self.bin_width


#: Largest number of values binned per tensor per batch; bigger batches are binned on an evenly
#: strided subset (min, max and count stay exact). 2^20 values per batch is far more than a
#: 2048-bin histogram needs, and keeps calibration of large CNN activations fast.
MAX_BINNED_PER_BATCH = 1 << 20


def _sample(values: np.ndarray) -> np.ndarray:
    if values.size <= MAX_BINNED_PER_BATCH:
        return values
    stride = -(-values.size // MAX_BINNED_PER_BATCH) | 1  # odd, to avoid aliasing with even tensor widths
    return values.reshape(-1)[::stride]


class _Accumulator:
    """Mutable state of one tensor while batches stream in."""

    def __init__(self, num_bins: int) -> None:
        self.counts = np.zeros(2 * num_bins, dtype=np.int64)
        self.bound: float | None = None
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nan_count = 0
        self.inf_count = 0

    def add(self, name: str, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        if finite.all():  # the common case: skip the NaN/inf bookkeeping passes
            nans = infs = 0
        else:
            nans = int(np.count_nonzero(np.isnan(values)))
            infs = values.size - int(np.count_nonzero(finite)) - nans
        kept = values[finite] if nans or infs else values
        if kept.size:
            lo, hi = float(kept.min()), float(kept.max())
            largest = max(-lo, hi)
            if self.bound is None:
                self.bound = max(largest, MIN_BOUND)
            elif largest > self.bound:
                self.bound = self._grow(name, self.bound, largest)
            self._bin(_sample(kept), self.bound)
            self.min, self.max, self.count = min(self.min, lo), max(self.max, hi), self.count + kept.size
        self.nan_count, self.inf_count = self.nan_count + nans, self.inf_count + infs

    def _bin(self, values: np.ndarray, bound: float) -> None:
        n = self.counts.size // 2
        scaled = np.multiply(values, n / bound, dtype=np.float64 if values.dtype == np.float64 else np.float32)
        np.floor(scaled, out=scaled)
        np.clip(scaled, -n, n - 1, out=scaled)
        index = scaled.astype(np.intp)
        index += n
        self.counts += np.bincount(index.ravel(), minlength=2 * n)

    def _grow(self, name: str, bound: float, largest: float) -> float:
        """Double ``bound`` until it covers ``largest``, merging bin pairs each time; the new bound."""
        doublings = max(0, math.ceil(math.log2(largest) - math.log2(bound)))
        try:
            while math.ldexp(bound, doublings) < largest:
                doublings += 1
            grown = math.ldexp(bound, doublings)
        except OverflowError:
            raise CalibrationError(
                f"tensor {name!r} has values up to {largest:g}; the histogram bound overflows float64",
                hint="check the model or data for values beyond the float32 range",
            ) from None
        n = self.counts.size // 2
        # After ceil(log2(n)) + 1 merges all mass sits in the two centre bins, so stop there.
        for _ in range(min(doublings, math.ceil(math.log2(n)) + 1)):
            merged = np.zeros_like(self.counts)
            merged[n // 2 : n // 2 + n] = self.counts.reshape(n, 2).sum(axis=1)
            self.counts = merged
        return grown

    def freeze(self, name: str) -> TensorHistogram:
        counts = self.counts.copy()
        counts.setflags(write=False)
        seen = self.count > 0
        return TensorHistogram(
            name=name,
            counts=counts,
            bound=self.bound if self.bound is not None else MIN_BOUND,
            min=self.min if seen else math.nan,
            max=self.max if seen else math.nan,
            count=self.count,
            nan_count=self.nan_count,
            inf_count=self.inf_count,
        )


class HistogramCollector:
    """Collects one :class:`TensorHistogram` per tensor name from streamed batches."""

    def __init__(self, num_bins: int = 2048) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2 or num_bins % 2:
            raise CalibrationError(
                f"num_bins={num_bins!r} is not an even integer >= 2",
                hint="use the default 2048, or another even number of bins per sign",
            )
        self.num_bins = num_bins
        self._tensors: dict[str, _Accumulator] = {}

    def update(self, name: str, values: np.ndarray) -> None:
        """Add one batch of tensor ``name`` (any shape; float, int or bool values)."""
        array = np.asarray(values)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
            raise CalibrationError(
                f"tensor {name!r} has dtype {array.dtype}; expected real numbers",
                hint="pass the float (or integer) activations of the tensor",
            )
        accumulator = self._tensors.setdefault(name, _Accumulator(self.num_bins))
        accumulator.add(name, array.astype(np.float64, copy=False).ravel())

    def histograms(self) -> dict[str, TensorHistogram]:
        """A frozen snapshot of every tensor seen so far, in the order first seen."""
        return {name: acc.freeze(name) for name, acc in self._tensors.items()}
