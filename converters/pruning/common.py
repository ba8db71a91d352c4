"""Small types and helpers shared by the pruning modules.

``weighted_nodes`` finds the layers pruning works on (a MatMul, Gemm or Conv whose weight is
an initializer) and says which weight axis is the *input* (reduction) dimension; ``input_norms``
measures the per-input-channel L2 norm of each such layer's activation on calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from converters.ir import attr, infer, node_key, probe
from edge_sdk.errors import PruningError

__all__ = ["PruneResult", "Feeds", "params", "nonzero_params", "weighted_nodes", "input_norms",
           "need_batches", "node_key", "refit_rows", "relative_error", "relative_mse"]

Feeds = dict[str, np.ndarray]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class PruneResult:
    """A pruned copy of a model and what was done to each layer."""

    model: onnx.ModelProto
    method: str  # "magnitude", "activation", "2:4", "structured", "layers"
    layers: tuple[dict[str, Any], ...]  # {"node", "op_type", "before", "after", "ratio", ...}
    notes: tuple[str, ...] = ()


def params(model: onnx.ModelProto) -> int:
    """Total number of initializer elements."""
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)


def nonzero_params(model: onnx.ModelProto) -> int:
    """Number of non-zero initializer elements."""
    return sum(int(np.count_nonzero(numpy_helper.to_array(init))) for init in model.graph.initializer)


def _input_axis(node: onnx.NodeProto, weight: onnx.TensorProto) -> int | None:
    """Input-dimension axis of ``weight`` for ``node``, or None when the layer is not handled."""
    if node.op_type == "MatMul" and len(weight.dims) == 2:
        return 0
    if node.op_type == "Gemm" and len(weight.dims) == 2 and attr(node, "transA", 0) == 0:
        return 1 if attr(node, "transB", 0) == 1 else 0
    if node.op_type == "Conv" and len(weight.dims) >= 3 and attr(node, "group", 1) == 1:
        return 1
    return None


def weighted_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto, int]]:
    """``(node, weight initializer, input-dim axis)`` for each prunable layer, in graph order.

    MatMul ``[K, N]`` -> axis 0; Gemm ``transB=1`` ``[N, K]`` -> axis 1, else ``[K, N]`` -> axis 0;
    Conv ``[O, I, kh, kw]`` -> axis 1. Gemm with ``transA=1`` and grouped Conv are left out
    (their activation channel axis does not line up with the weight's input axis), as are
    non-float weights.
    """
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or weight.data_type not in _FLOAT_TYPES:
            continue
        axis = _input_axis(node, weight)
        if axis is not None:
            found.append((node, weight, axis))
    return found


def input_norms(
    model: onnx.ModelProto, batches: Sequence[Feeds], nodes: Sequence[onnx.NodeProto],
) -> dict[str, np.ndarray]:
    """Per node name (``node_key``): L2 norm of its activation input per input channel, over all ``batches``.

    Runs onnxruntime on CPU with the activation inputs added as graph outputs. The channel
    axis is 1 for Conv (NCHW) and the last axis for MatMul/Gemm.
    """
    need_batches(batches, "input_norms")
    sums: dict[str, np.ndarray] = {}
    for _, values in probe(model, batches, sorted({n.input[0] for n in nodes}), error=PruningError):
        for node in nodes:
            x = np.asarray(values[node.input[0]], dtype=np.float64)
            axis = 1 if node.op_type == "Conv" else x.ndim - 1
            reduce = tuple(a for a in range(x.ndim) if a != axis)
            sq = np.sum(np.square(x), axis=reduce)
            sums[node_key(node)] = sums.get(node_key(node), 0.0) + sq
    return {name: np.sqrt(total) for name, total in sums.items()}


def macs_per_sample(model: onnx.ModelProto, feeds: Feeds) -> int:
    """Multiply-accumulates of Conv, MatMul and Gemm per sample, at the shapes of ``feeds``.

    Shapes come from ONNX shape inference with the graph inputs fixed to the feed shapes; an
    op whose shapes cannot be inferred (data-dependent) counts as 0 and the total is a floor.
    """
    fixed = ir.copy(model)
    for value in fixed.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    graph = infer(fixed, strict=True).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*graph.input, *graph.value_info, *graph.output)}
    shapes.update({i.name: list(i.dims) for i in graph.initializer})
    total = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        out, a = shapes.get(node.output[0]), shapes.get(node.input[0])
        b = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not out or not a or not b or 0 in out or 0 in a or 0 in b:
            continue
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(b[1:]))
        elif node.op_type == "MatMul":
            total += int(np.prod(out)) * a[-1]
        elif node.op_type == "Gemm":
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            total += int(np.prod(out)) * (a[0] if trans_a else a[-1])
    batch = len(next(iter(feeds.values())))
    return total // max(batch, 1)


#: Kept channel / neuron counts are rounded to a multiple of this when the layer is wide enough
#: (to 8 on narrower ones): onnxruntime's blocked (NCHWc) convolutions work in blocks of 16
#: channels with AVX-512 (8 with AVX2), VNNI/dot-product int8 kernels and TensorRT's int8 tensor
#: cores in blocks of 16-32, and a ragged count falls off the fast path (measured: a 0.1-ratio
#: EfficientNet-Lite0 ran at 0.57x fp32 with ragged channel counts; one budget allocation ran its
#: int8 graph at 2.30x fp32 with multiples of 8 and 2.70x with multiples of 16, fp32 1.23x/1.24x).
CHANNEL_MULTIPLE = 16


def units_to_drop(ratio: float, total: int, multiple: int | None = None) -> int:
    """How many of ``total`` channels to remove for ``ratio``: at least one kept, and for layers
    of at least ``4 * multiple`` channels (a multiple of it; else 8 on layers of at least 32) the
    kept count rounded to the nearest multiple, ties towards keeping more, so widths stay
    kernel-friendly."""
    drop = min(int(round(ratio * total)), total - 1)
    for m in dict.fromkeys((multiple or CHANNEL_MULTIPLE, 8)):
        if total % m == 0 and total >= 4 * m:
            keep = max(m, int((total - drop) / m + 0.5) * m)
            return max(total - keep, 0)
    return max(drop, 0)


def relative_error(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """``sum ||a - b||^2 / sum ||b||^2`` over paired arrays (``ir.outputs_on`` of two models)."""
    num = sum(float(np.sum(np.square(a - b))) for a, b in zip(outputs, reference))
    den = sum(float(np.sum(np.square(b))) for b in reference)
    return num / den if den > 0 else float(num > 0)


def relative_mse(pred: np.ndarray, target: np.ndarray) -> float:
    """``||pred - target||^2 / ||target||^2`` of one pair of arrays."""
    num = float(np.sum(np.square(pred - target)))
    den = float(np.sum(np.square(target)))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def refit_rows(h: np.ndarray, target: np.ndarray, with_bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares ``h @ W + c ~= target``; ``c`` is zero unless ``with_bias`` (not regularised)."""
    n, f = h.shape
    x = np.hstack([h, np.ones((n, 1))]) if with_bias else h
    ridge = 1e-3 * float(np.mean(np.sum(np.square(h), axis=0)))
    penalty = np.zeros((f, x.shape[1]))
    penalty[:, :f] = np.sqrt(max(ridge, 1e-12)) * np.eye(f)
    theta = np.linalg.lstsq(np.vstack([x, penalty]), np.vstack([target, np.zeros((f, target.shape[1]))]),
                            rcond=None)[0]
    shift = theta[f] if with_bias else np.zeros(target.shape[1])
    return theta[:f], shift



def need_batches(batches: Sequence[Feeds], what: str) -> None:
    """``what`` measures activations: refuse an empty calibration set with the way to give one."""
    if not batches:
        raise PruningError(f"{what} got no calibration batches; expected at least one feed dict",
                           hint="pass batches=[{input_name: array}, ...] from your calibration data")


def check_ratios(ratio: float, ratios: Mapping[str, float] | None, what: str) -> None:
    """``ratio`` (and every per-unit override) is a fraction of ``what`` to remove: in (0, 1), or
    [0, 1) when per-unit ``ratios`` are given (units not named are then left whole)."""
    for r in (ratio, *(ratios or {}).values()):
        numeric = isinstance(r, (int, float)) and not isinstance(r, bool)
        if not numeric or not (0.0 <= r < 1.0) or (r == 0.0 and not ratios):
            expected = "0 <= ratio < 1" if ratios else "0 < ratio < 1"
            raise PruningError(f"ratio is {r!r}; expected {expected}",
                               hint=f"a ratio is the fraction of {what} to remove, e.g. 0.25")


def unknown_units(ratios: Mapping[str, float], units: Sequence[str], what: str) -> None:
    unknown = sorted(set(ratios) - set(units))
    if unknown:
        raise PruningError(f"ratios name {unknown}, which are not prunable {what}",
                           hint=f"prunable {what}: {', '.join(units) or 'none'}")
