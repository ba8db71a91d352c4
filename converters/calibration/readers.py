"""Calibration data readers: the user's data as batches of model feeds.

A reader is any re-iterable of ``{input_name: np.ndarray}``. Images and texts go
through the package's own preprocessing (the same code the device runs), so the
calibrated ranges are those the model sees in the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from converters.data import image_samples, text_lines
from edge_sdk.errors import CalibrationError
from runtime.manifest import IMAGE_TASKS, TensorSpec

Feeds = dict[str, np.ndarray]
Encoder = Callable[[Sequence[Any]], Feeds]


@dataclass(frozen=True)
class EncodedReader:
    """Raw inputs (image paths or texts) encoded batch by batch with the package's preprocessing."""

    items: tuple[Any, ...]
    encode: Encoder
    batch_size: int = 8

    def __iter__(self) -> Iterator[Feeds]:
        for start in range(0, len(self.items), self.batch_size):
            yield self.encode(self.items[start : start + self.batch_size])

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class ArrayReader:
    """Pre-made tensors ``{input: [N, ...]}`` split into batches along the first axis."""

    arrays: Mapping[str, np.ndarray]
    batch_size: int = 8

    def __iter__(self) -> Iterator[Feeds]:
        for start in range(0, len(self), self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in self.arrays.items()}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


def _load_arrays(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"calibration file {str(path)!r} cannot be read: {exc}") from None
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(f"{path.name} holds one array but the model has inputs {[t.name for t in inputs]}",
                                   hint="use an .npz with one array per input name")
        return {inputs[0].name: loaded}
    with loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    names = {t.name for t in inputs}
    if set(arrays) != names:
        raise CalibrationError(f"{path.name} holds arrays {sorted(arrays)}; expected exactly the inputs {sorted(names)}")
    return arrays


def _check_arrays(arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> None:
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise CalibrationError(f"calibration arrays have sample counts {sizes}; expected the same non-zero count")
    for spec in inputs:
        value = arrays[spec.name]
        if value.dtype != np.dtype(spec.dtype) or value.ndim != len(spec.shape):
            raise CalibrationError(
                f"calibration array '{spec.name}' is {value.dtype} with shape {list(value.shape)}; "
                f"expected {spec.dtype} with rank {len(spec.shape)} ({list(spec.shape)})")


def calibration_reader(
    source: str | os.PathLike[str], *, task: str, inputs: Sequence[TensorSpec], encode: Encoder,
    batch_size: int = 8, limit: int | None = None,
) -> EncodedReader | ArrayReader:
    """A reader for what ``convert(calibration=...)`` accepts: an image folder, a text file, or .npy/.npz."""
    path = Path(source)
    if path.suffix in (".npy", ".npz"):
        arrays = _load_arrays(path, inputs)
        _check_arrays(arrays, inputs)
        if limit:
            picked = spread(len(next(iter(arrays.values()))), limit)
            arrays = {k: v[picked] for k, v in arrays.items()}
        return ArrayReader(arrays, batch_size)
    samples = image_samples(path) if task in IMAGE_TASKS else text_lines(path)
    items = tuple(s.item for s in samples)
    if limit:
        items = tuple(items[i] for i in spread(len(items), limit))
    return EncodedReader(items, encode, batch_size)


def spread(total: int, limit: int) -> np.ndarray:
    """``min(limit, total)`` indices evenly spaced over ``range(total)``, in order. Sources are sorted (an
    image folder by class sub-folder), so the first ``limit`` would calibrate on a few classes only."""
    if limit >= total:
        return np.arange(total)
    return (np.arange(limit) * total) // limit
