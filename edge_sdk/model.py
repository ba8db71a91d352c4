"""``edge_sdk.load``: open a package and predict with the best backend this machine has."""

from __future__ import annotations

import os
from typing import Any, Sequence

from runtime.closing import Closing
from runtime.pipeline import DEFAULT_MAX_BATCH, Pipeline
from runtime.runners.base import Runner
from runtime.prediction import Prediction


class Model(Closing):
    """A loaded, verified package with an active backend. Use as a context manager or call close()."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    @property
    def backend(self) -> str:
        """The backend that runs this model (e.g. ``onnxruntime-cpu``)."""
        return self._pipeline.backend

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline behind this model, for measuring its stages apart: ``pipeline.encode(items)``
        (preprocessing or tokenization) -> feeds, ``pipeline.infer(feeds)`` (the model alone) -> outputs."""
        return self._pipeline

    @property
    def runner(self) -> Runner:
        """The active runner of the selected backend (``runner.infer(feeds)``: the graph, input checks included)."""
        return self._pipeline.selection.runner

    @property
    def labels(self) -> tuple[str, ...]:
        return self._pipeline.manifest.postprocess.labels

    @property
    def info(self) -> dict[str, Any]:
        """The manifest summary plus which backend runs it, why others were skipped, and the parity check."""
        parity = self._pipeline.parity
        return {
            **self._pipeline.manifest.summary(),
            "path": str(self._pipeline.package.path) if self._pipeline.package else None,
            "backend": self.backend,
            "graph": self._pipeline.selection.graph,
            "precision_served": self._pipeline.selection.precision_label,
            "graph_reason": self._pipeline.selection.graph_reason,
            "engine": engine.name if (engine := self._pipeline.selection.served.engine) else None,
            "skipped_backends": [{"backend": s.backend, "reason": s.reason} for s in self._pipeline.skipped],
            "parity": None if parity is None else {
                "samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "tolerance": parity.tolerance,
            },
            "reports": dict(self._pipeline.manifest.reports),
        }

    def predict(self, x: Any) -> Prediction:
        """Predict one input: an image (path, bytes, BGR array) or a text, as the package's task says."""
        return self._pipeline.predict(x)

    def predict_batch(self, xs: Sequence[Any], *, max_batch: int = DEFAULT_MAX_BATCH) -> list[Prediction]:
        """Predict many inputs, batched ``max_batch`` at a time."""
        return self._pipeline.predict_batch(xs, max_batch=max_batch)

    def close(self) -> None:
        self._pipeline.close()

    def __repr__(self) -> str:
        m = self._pipeline.manifest
        return f"Model({m.name!r}, task={m.task!r}, backend={self.backend!r})"


def load(
    path: str | os.PathLike[str],
    backend: str | Sequence[str] = "auto",
    *,
    threads: int | None = None,
    precision: str = "auto",
    verify: bool = True,
) -> Model:
    """Open and verify the package at ``path`` and activate a backend.

    ``backend`` is ``"auto"`` (``runtime.select.DEFAULT_POLICY``: a TensorRT engine, then
    onnxruntime's TensorRT provider, then its CUDA provider, then its CPU provider), one backend
    name, or an ordered list. ``precision`` is "auto" (int8 when the package carries it), "fp32",
    "fp16" (TensorRT) or "int8". With ``verify`` the backend must reproduce the package's golden
    outputs before the model is returned.
    """
    return Model(Pipeline.from_package(path, backend, threads=threads, precision=precision, verify=verify))
