"""2:4 semi-structured sparsity for TensorRT sparse tensor cores (Ampere and later, Orin).

In every group of 4 consecutive weights along the layer's *input* (reduction) dimension, two
are kept and two are zeroed: MatMul ``[K, N]`` along K for each column, Gemm ``transB=1``
``[N, K]`` along K, Conv ``[O, I, kh, kw]`` along I for each ``(o, kh, kw)``. Layers whose input
dimension is not a multiple of 4 are left dense. The pruned model lists its 2:4 layers in the
metadata entry ``METADATA_KEY`` so that :func:`check_2_4` can verify the claim later; the
package report takes :func:`sparsity_record`, and the engine builder turns on sparse tactics
when its pattern is ``"2:4"``.

Without fine-tuning, 2:4 costs accuracy on most networks; measure it before shipping.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from edge_sdk.errors import PruningError

from .common import Feeds, PruneResult, input_norms, node_key
from .weights import WeightLayer, check_method, importance, store, weight_layers

__all__ = ["prune_2_4", "check_2_4", "sparsity_record", "METADATA_KEY"]

log = logging.getLogger(__name__)

#: Model metadata entry holding the comma-separated names of the layers pruned to 2:4.
METADATA_KEY = "edge_sdk.pruning.2:4"


def _groups(array: np.ndarray, axis: int) -> np.ndarray:
    """View ``array`` as ``[..., K // 4, 4]`` with the input axis last."""
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // 4, 4))


def _ungroup(grouped: np.ndarray, axis: int) -> np.ndarray:
    flat = grouped.reshape(grouped.shape[:-2] + (grouped.shape[-2] * 4,))
    return np.moveaxis(flat, -1, axis)


def _mask_2_4(weight: np.ndarray, score: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` with the two lowest-scoring entries of every group of 4 zeroed."""
    grouped = _groups(weight, axis).copy()
    lowest = np.argsort(_groups(score, axis), axis=-1, kind="stable")[..., :2]
    np.put_along_axis(grouped, lowest, 0, axis=-1)
    return _ungroup(grouped, axis)


def _claim(model: onnx.ModelProto, names: Sequence[str]) -> None:
    for entry in list(model.metadata_props):
        if entry.key == METADATA_KEY:
            model.metadata_props.remove(entry)
    if names:
        model.metadata_props.add(key=METADATA_KEY, value=",".join(names))


def prune_2_4(
    model: onnx.ModelProto,
    *,
    batches: Sequence[Feeds] | None = None,
    method: str = "magnitude",
    min_params: int = 1024,
) -> PruneResult:
    """A copy of ``model`` with its MatMul/Gemm/Conv weights pruned to 2:4 along the input dimension.

    ``method="activation"`` scores ``|w| * ||x_k||`` from ``batches`` (see ``weights``); layers
    under ``min_params`` weights or with an input dimension not divisible by 4 stay dense and
    are noted. The input model is not modified.
    """
    check_method(method, batches)
    out = ir.copy(model)
    notes = [f"2:4 sparsity ({method}) along the input dimension; TensorRT sparse tactics apply."]
    layers: list[WeightLayer] = []
    for layer in weight_layers(out):
        k = layer.init.dims[layer.axis]
        if layer.size < min_params:
            notes.append(f"{layer.name}: skipped, {layer.size} weights < min_params={min_params}.")
        elif k % 4:
            notes.append(f"{layer.name}: skipped, input dimension {k} is not divisible by 4.")
        else:
            layers.append(layer)
    norms = input_norms(model, batches or (), [n for lay in layers for n in lay.nodes]) \
        if method == "activation" and layers else {}
    records = []
    for layer in layers:
        weight = numpy_helper.to_array(layer.init)
        channel = norms.get(layer.name)
        if channel is not None and channel.shape != (weight.shape[layer.axis],):
            channel = None
        pruned = _mask_2_4(weight, importance(weight, layer.axis, "l1", channel), layer.axis)
        store(layer.init, pruned)
        records.append(layer.record(pruned, pattern="2:4"))
    _claim(out, [r["node"] for r in records])
    log.info("pruned %d layers to 2:4", len(records))
    return PruneResult(out, "2:4", tuple(records), tuple(notes))


def _claimed(model: onnx.ModelProto) -> list[str] | None:
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return [n for n in entry.value.split(",") if n]
    return None


def _violation(layer: WeightLayer) -> str | None:
    weight = numpy_helper.to_array(layer.init)
    k = weight.shape[layer.axis]
    if k % 4:
        return f"{layer.name}: input dimension {k} is not divisible by 4, so it cannot be 2:4."
    counts = np.count_nonzero(_groups(weight, layer.axis), axis=-1).ravel()
    bad = np.flatnonzero(counts > 2)
    if bad.size == 0:
        return None
    first = int(bad[0])
    column, group = divmod(first, k // 4)
    return (f"{layer.name}: group {first} (input indices {4 * group}..{4 * group + 3} at position {column} of "
            f"weight {layer.init.name!r}) has {counts[first]} non-zeros; expected at most 2 of every 4.")


def check_2_4(model: onnx.ModelProto, nodes: Sequence[str] | None = None) -> list[str]:
    """Violations of 2:4 sparsity, one message per layer; empty when every checked layer is valid.

    Checks ``nodes`` when given, else the layers the model's metadata claims (from
    :func:`prune_2_4`), else every prunable layer.
    """
    by_name = {layer.name: layer for layer in weight_layers(model)}
    by_name.update({node_key(n): layer for layer in by_name.values() for n in layer.nodes})
    names = list(nodes) if nodes is not None else _claimed(model)
    if names is None:
        names = [layer.name for layer in weight_layers(model)]
    problems = []
    for name in names:
        layer = by_name.get(name)
        if layer is None:
            problems.append(f"{name}: no MatMul/Gemm/Conv with a constant weight has this name.")
            continue
        problem = _violation(layer)
        if problem:
            problems.append(problem)
    return problems


def sparsity_record(result: PruneResult) -> dict[str, Any]:
    """The ``reports["pruning"]`` entry of a package: ``{"pattern": "2:4", "layers": [...]}``."""
    if result.method != "2:4":
        raise PruningError(f"sparsity_record needs a 2:4 result; got method={result.method!r}.",
                           hint="Pass the result of prune_2_4.")
    return {"pattern": "2:4", "layers": [layer["node"] for layer in result.layers]}
