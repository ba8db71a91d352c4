"""Unstructured weight pruning: zero the least important weights of MatMul/Gemm/Conv layers.

Masking weights gives **no speedup on a dense CPU or GPU kernel**: the zeros are still
multiplied. Use it for accuracy and compression experiments (zeros compress well), and as the
input of :func:`converters.pruning.sparse24.prune_2_4`, whose 2:4 pattern TensorRT's sparse
tensor cores do accelerate.

Importance scores:

- ``method="magnitude"``: ``|w|`` (``norm="l1"``) or ``w**2`` (``norm="l2"``).
- ``method="activation"`` (Wanda, Sun et al. 2023): ``|w| * ||x_k||`` where ``||x_k||`` is the
  L2 norm of the layer's input channel ``k`` over the calibration batches; squared for ``"l2"``.

``scope="layer"`` prunes every layer to the same sparsity. ``scope="global"`` ranks all weights
together by their *normalized* score, ``score / mean(score of its layer)``, so that layers whose
weights live on different scales compete fairly, and applies one threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from edge_sdk.errors import PruningError

from .common import Feeds, PruneResult, input_norms, node_key, weighted_nodes

__all__ = ["prune_weights", "WeightLayer", "weight_layers", "importance", "check_method"]

log = logging.getLogger(__name__)

_METHODS = ("magnitude", "activation")
_NORMS = ("l1", "l2")
_SCOPES = ("layer", "global")


@dataclass(frozen=True)
class WeightLayer:
    """One weight initializer and the nodes that read it (a shared weight is pruned once)."""

    nodes: tuple[onnx.NodeProto, ...]
    init: onnx.TensorProto
    axis: int

    @property
    def name(self) -> str:
        return node_key(self.nodes[0])

    @property
    def size(self) -> int:
        return int(np.prod(self.init.dims, dtype=np.int64))

    def record(self, weight: np.ndarray, **extra: Any) -> dict[str, Any]:
        kept = int(np.count_nonzero(weight))
        return {"node": self.name, "op_type": self.nodes[0].op_type, "weight": self.init.name,
                "nodes": [node_key(n) for n in self.nodes], "before": self.size, "after": kept,
                "ratio": kept / self.size if self.size else 1.0, **extra}


def weight_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """Prunable weights of ``model`` in graph order, each with every node that reads it."""
    grouped: dict[str, list[tuple[onnx.NodeProto, onnx.TensorProto, int]]] = {}
    for node, init, axis in weighted_nodes(model):
        grouped.setdefault(init.name, []).append((node, init, axis))
    layers = []
    for uses in grouped.values():
        axis = uses[0][2]
        # A weight read along different axes (e.g. by MatMul and by Gemm transB=1) keeps the first.
        nodes = tuple(n for n, _, a in uses if a == axis)
        layers.append(WeightLayer(nodes, uses[0][1], axis))
    return layers


def check_method(method: str, batches: Sequence[Feeds] | None, allowed: Sequence[str] = _METHODS) -> None:
    """Refuse an unknown method, or ``"activation"`` without calibration batches."""
    if method not in allowed:
        raise PruningError(f"Unknown pruning method {method!r}; expected one of {', '.join(allowed)}.",
                           hint="Use method='magnitude' unless you have calibration batches.")
    if method == "activation" and not batches:
        raise PruningError("method='activation' needs calibration batches to measure input norms; got none.",
                           hint="Pass batches=[{input_name: array}, ...] or use method='magnitude'.")


def importance(weight: np.ndarray, axis: int, norm: str = "l1", channel_norm: np.ndarray | None = None) -> np.ndarray:
    """Score of every weight: ``|w|`` (times the input channel norm when given), squared for ``"l2"``."""
    score = np.abs(weight.astype(np.float64))
    if channel_norm is not None:
        shape = [1] * weight.ndim
        shape[axis] = weight.shape[axis]
        score = score * np.asarray(channel_norm, dtype=np.float64).reshape(shape)
    return np.square(score) if norm == "l2" else score


def _channel_norm(layer: WeightLayer, norms: dict[str, np.ndarray]) -> np.ndarray | None:
    """Input norm for a layer; a shared weight takes the root-sum-square over its readers."""
    found = [norms[node_key(n)] for n in layer.nodes if node_key(n) in norms]
    found = [f for f in found if f.shape == (layer.init.dims[layer.axis],)]
    if not found:
        return None
    return np.sqrt(np.sum(np.square(found), axis=0))


def store(init: onnx.TensorProto, weight: np.ndarray) -> None:
    """Overwrite an initializer's data with ``weight``, keeping its name and dtype."""
    original = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(weight.astype(original.dtype), init.name))


def _check_args(sparsity: float, norm: str, scope: str) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity={sparsity!r} is out of range; expected a fraction in [0, 1).",
                           hint="Pass e.g. sparsity=0.5 to zero half of each layer's weights.")
    if norm not in _NORMS:
        raise PruningError(f"Unknown norm {norm!r}; expected one of {', '.join(_NORMS)}.", hint="Use norm='l1'.")
    if scope not in _SCOPES:
        raise PruningError(f"Unknown scope {scope!r}; expected one of {', '.join(_SCOPES)}.",
                           hint="Use scope='layer' for the same sparsity everywhere, 'global' for one threshold.")


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` smallest entries of a flat array."""
    mask = np.zeros(scores.size, dtype=bool)
    if count > 0:
        mask[np.argpartition(scores, count - 1)[:count]] = True
    return mask


def _masks(scores: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """Per layer, a mask of the weights to zero."""
    if scope == "layer":
        return [_smallest(s.ravel(), int(round(sparsity * s.size))).reshape(s.shape) for s in scores]
    normalized = [s.ravel() / s.mean() if s.mean() > 0 else s.ravel() for s in scores]
    flat = np.concatenate(normalized) if normalized else np.zeros(0)
    mask = _smallest(flat, int(round(sparsity * flat.size)))
    bounds = np.cumsum([0] + [s.size for s in scores])
    return [mask[a:b].reshape(s.shape) for a, b, s in zip(bounds[:-1], bounds[1:], scores)]


def prune_weights(
    model: onnx.ModelProto,
    sparsity: float,
    *,
    method: str = "magnitude",
    norm: str = "l1",
    scope: str = "layer",
    batches: Sequence[Feeds] | None = None,
    min_params: int = 1024,
) -> PruneResult:
    """A copy of ``model`` with the fraction ``sparsity`` of its MatMul/Gemm/Conv weights zeroed.

    Weights with fewer than ``min_params`` elements are left dense and noted. The input model
    is not modified. Each layer record's ``ratio`` is the kept (non-zero) fraction and
    ``sparsity`` the zero fraction.
    """
    _check_args(sparsity, norm, scope)
    check_method(method, batches)
    out = ir.copy(model)
    notes = [f"{method} pruning ({norm}, {scope} scope) to sparsity {sparsity:g}; zeroed weights "
             "do not speed up dense kernels."]
    layers = []
    for layer in weight_layers(out):
        if layer.size < min_params:
            notes.append(f"{layer.name}: skipped, {layer.size} weights < min_params={min_params}.")
        else:
            layers.append(layer)
    norms = input_norms(model, batches or (), [n for lay in layers for n in lay.nodes]) \
        if method == "activation" and layers else {}
    weights = [numpy_helper.to_array(lay.init) for lay in layers]
    scores = []
    for layer, weight in zip(layers, weights):
        channel = _channel_norm(layer, norms) if method == "activation" else None
        if method == "activation" and channel is None:
            notes.append(f"{layer.name}: no input norm measured; scored by magnitude.")
        scores.append(importance(weight, layer.axis, norm, channel))
    records = []
    for layer, weight, mask in zip(layers, weights, _masks(scores, sparsity, scope)):
        pruned = np.where(mask, np.zeros_like(weight), weight)
        store(layer.init, pruned)
        record = layer.record(pruned)
        record["sparsity"] = 1.0 - record["ratio"]
        records.append(record)
    log.info("pruned %d layers to %.3g sparsity (%s, %s)", len(records), sparsity, method, scope)
    return PruneResult(out, method, tuple(records), tuple(notes))
