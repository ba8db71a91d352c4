"""Run the fp32 graph over the calibration data and histogram the tensors that get quantized.

The graph is augmented with the chosen intermediate tensors as extra outputs and
run once per batch on onnxruntime CPU; each tensor streams into the histogram
collector, so memory stays O(bins) per tensor whatever the data size.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from converters import ir
from converters.ir import Graph
from converters.calibration.histogram import HistogramCollector, TensorHistogram
from edge_sdk.errors import CalibrationError

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Progress = Callable[[int], None]
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def float_tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor in the graph (after shape inference)."""
    return {name: v.type.tensor_type.elem_type for name, v in Graph(model).value_info.items()}


def tensors_around(model: onnx.ModelProto, op_types: Sequence[str]) -> list[str]:
    """Float activation tensors read or written by nodes of ``op_types`` (initializers excluded)."""
    graph = Graph(model)
    types = {name: v.type.tensor_type.elem_type for name, v in graph.value_info.items()}
    constants = graph.constants
    names: dict[str, None] = {}
    for node in graph.nodes:
        if node.op_type in op_types:
            for name in (*node.input, *node.output):
                if name and name not in constants and types.get(name) in FLOAT_TYPES:
                    names[name] = None
    return list(names)


def collect_histograms(
    model: onnx.ModelProto, batches: Iterable[Feeds], tensors: Sequence[str], *,
    num_bins: int = 2048, threads: int | None = None, progress: Progress | None = None,
    observe: Callable[[str, np.ndarray], None] | None = None, mask: str | None = None,
) -> dict[str, TensorHistogram]:
    """Histogram ``tensors`` over every calibration batch; ``observe(name, value)`` sees each value too.

    ``mask`` names a ``[batch, sequence]`` attention-mask input: ``[batch, sequence, hidden]``
    tensors are then histogrammed over real tokens only, since padding positions are not data
    (at sequence 128 most positions of short reports are padding).
    """
    # Every calibrated tensor is a graph output here, and onnxruntime never fuses a node away
    # whose output is a graph output, so full optimization keeps them all.
    collector = HistogramCollector(num_bins)
    seen = 0
    for feeds, found in ir.probe(model, batches, tensors, optimize=True, threads=threads, error=CalibrationError):
        values = [found[name] for name in tensors]
        keep = feeds[mask].astype(bool) if mask and mask in feeds else None
        for name, value in zip(tensors, values):
            if keep is not None and value.ndim == 3 and value.shape[:2] == keep.shape:
                value = value[keep]
            collector.update(name, value)
            if observe:
                observe(name, value)
        seen += 1
        if progress:
            progress(len(next(iter(feeds.values()))))
    if seen == 0:
        raise CalibrationError("the calibration data gave no batches", hint="pass a non-empty calibration set")
    log.info("calibrated %d tensors over %d batches", len(tensors), seen)
    return collector.histograms()
