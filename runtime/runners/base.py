"""The runner interface every backend implements.

A runner runs one graph. ``activate()`` acquires what it needs (sessions,
CUDA streams, buffers), ``infer(feeds)`` checks the feeds against the declared
inputs and runs, ``deactivate()`` frees. Subclasses implement the ``*_impl``
hooks only; checking lives here, once, for every backend.
"""

from __future__ import annotations

import abc
import logging
from types import TracebackType
from typing import Mapping, Sequence

import numpy as np

from edge_sdk.errors import BackendUnavailableError, InferenceError, InputMismatchError
from runtime.manifest import TensorSpec

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]
#: Rows a pipeline runs at a time unless told otherwise (``predict_batch``); also the batch bound a
#: runner may compile for (OpenVINO), running larger batches in chunks of this many.
DEFAULT_MAX_BATCH = 32


class Runner(abc.ABC):
    """Base class of every backend. Use as a context manager, or call activate/deactivate."""

    backend: str = "abstract"

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.is_active = False

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
            log.debug("%s activated", self.backend)
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds`` (name -> array) and return every declared output by name."""
        if not self.is_active:
            raise InferenceError(f"runner {self.backend} is not active", hint="call activate() or use it in a with-block")
        check_feeds(feeds, self.inputs)
        return self._infer_impl(feeds)

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...


def check_threads(threads: int | None) -> int | None:
    """``threads`` for a CPU runner: a positive int, or None for every core."""
    if threads is not None and threads < 1:
        raise BackendUnavailableError(f"threads is {threads}; expected a positive int or None for all cores")
    return threads


def check_feeds(feeds: Feeds, specs: Sequence[TensorSpec]) -> None:
    """Raise :class:`InputMismatchError` unless ``feeds`` match ``specs`` by name, dtype, rank and fixed dims."""
    expected = {s.name for s in specs}
    missing, unknown = sorted(expected - set(feeds)), sorted(set(feeds) - expected)
    if missing or unknown:
        raise InputMismatchError(
            f"feeds {sorted(feeds)} do not match the model's inputs {sorted(expected)}"
            + (f"; missing {missing}" if missing else "") + (f"; unexpected {unknown}" if unknown else ""),
            hint="pass exactly the declared input names",
        )
    axes: dict[str, int] = {}
    for spec in specs:
        _check_one(spec, feeds[spec.name], axes)


def _check_one(spec: TensorSpec, value: np.ndarray, axes: dict[str, int]) -> None:
    if not isinstance(value, np.ndarray):
        raise InputMismatchError(f"input '{spec.name}' is a {type(value).__name__}; expected a numpy array")
    if value.dtype != np.dtype(spec.dtype):
        raise InputMismatchError(
            f"input '{spec.name}' has dtype {value.dtype}; expected {spec.dtype}",
            hint=f"convert it with array.astype(numpy.{spec.dtype})",
        )
    if value.ndim != len(spec.shape):
        raise InputMismatchError(
            f"input '{spec.name}' has rank {value.ndim} (shape {list(value.shape)}); expected rank {len(spec.shape)} "
            f"with shape {list(spec.shape)}"
        )
    for axis, (dim, want) in enumerate(zip(value.shape, spec.shape)):
        if isinstance(want, int) and dim != want:
            raise InputMismatchError(
                f"input '{spec.name}' has size {dim} on axis {axis} (shape {list(value.shape)}); expected {want}"
            )
        if isinstance(want, str) and axes.setdefault(want, dim) != dim:
            raise InputMismatchError(
                f"input '{spec.name}' has {want}={dim} on axis {axis}, but another input has {want}={axes[want]}",
                hint="all inputs must agree on shared dynamic axes",
            )
