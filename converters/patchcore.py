"""Defect detection from good parts only: a PatchCore-class anomaly head built onto any CNN ONNX.

After Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022):

1. **Features.** Two mid-level feature maps of the backbone - by default the outputs of its
   stride-8 and stride-16 stages (``feature_layers``), or tensors named by the caller - are
   averaged over each position's 3x3 neighbourhood (*locally aware* patch features), the coarser
   one upsampled to the finer grid, and concatenated: one ``C``-vector per patch.
2. **Memory bank.** The patch features of the good images, reduced by greedy coreset
   subsampling (k-center on a random projection, ``greedy_coreset``) to ``ratio`` of them, so the
   bank covers every kind of good surface with a fraction of the vectors.
3. **Scores.** A patch's score is its distance to the nearest bank vector; the image score is the
   largest patch score, and the anomaly map is the patch scores upsampled and smoothed.

Everything after the backbone is ONNX in the same graph (``head_graph``): AveragePool, Resize,
Concat, then ``||x||^2 + min_k(||m_k||^2 - 2 x.m_k)`` as MatMul + ReduceMin, which TensorRT and
onnxruntime both run, so a device computes exactly what the fit measured. The head's nodes live in
the ``float/`` scope: the int8 pass quantizes the backbone and leaves the bank in float.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters import ir
from converters.qdq import FLOAT_SCOPE
from edge_sdk.errors import ConversionError

__all__ = ["FeatureLayer", "SCORE", "MAP", "PATCHES", "feature_layers", "patch_graph", "head_graph",
           "greedy_coreset", "layer_weights", "auroc", "f1_at"]

log = logging.getLogger(__name__)

SCORE, MAP, PATCHES = "anomaly_score", "anomaly_map", "patch_features"
SCOPE = f"{FLOAT_SCOPE}anomaly/"
#: The stages whose outputs the patches come from by default. PatchCore takes a ResNet's layer2 + layer3
#: (strides 8 and 16); on the demo surfaces with EfficientNet-Lite0 the last two stages (16 and 32)
#: measured image AUROC 0.946 against 0.896 for 8 + 16 (1% coreset; see the README), so those.
STRIDES = (16, 32)
MAP_UPSAMPLE = 2  # the anomaly map is the patch grid upsampled twice (56x56 for a 224 input)
MAP_SIGMA = 1.0  # Gaussian smoothing of the map, in map pixels
_RESIDUAL_OUTPUTS = ("Add", "Relu", "Clip", "HardSwish", "Sigmoid", "Mul")


@dataclass(frozen=True)
class FeatureLayer:
    """A backbone tensor the patch features are read from."""

    name: str
    stride: int
    channels: int
    height: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stride": self.stride, "channels": self.channels,
                "grid": [self.height, self.width]}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _fixed(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    """A copy whose image input is [1, C, H, W], so shape inference gives every feature map's grid."""
    out = ir.copy(model)
    graph = ir.Graph(out)
    value = next(v for v in out.graph.input if v.name in graph.inputs)
    dims = value.type.tensor_type.shape.dim
    for dim, size_ in zip(dims, (1, None, *size)):
        if size_ is not None:
            dim.Clear()
            dim.dim_value = int(size_)
    return out


def _stride(size: tuple[int, int], h: int, w: int) -> int | None:
    """The power-of-two stride of an [h, w] grid over a ``size`` input (strided convolutions round up:
    a 260 input gives 130, 65, 33, 17, 9), or None when the grid is not such a downsampling."""
    if not (0 < h < size[0] and 0 < w <= size[1]):
        return None
    stride = 2 ** round(math.log2(size[0] / h))
    return stride if -(-size[0] // stride) == h and -(-size[1] // stride) == w else None


def _maps(model: onnx.ModelProto, size: tuple[int, int]) -> tuple[ir.Graph, list[FeatureLayer]]:
    """Every 4-D float tensor on a power-of-two downsampled grid of the input, with its stride, in graph order."""
    g = ir.Graph(_fixed(model, size))
    found: list[FeatureLayer] = []
    for node in g.nodes:
        for out in node.output:
            shape = g.shapes.get(out)
            if shape is None or len(shape) != 4 or None in shape or out in g.constants:
                continue
            _, c, h, w = (int(d) for d in shape)  # type: ignore[arg-type]
            stride = _stride(size, h, w)
            if stride is not None and stride > 1:
                found.append(FeatureLayer(out, stride, c, h, w))
    return g, found


def feature_layers(model: onnx.ModelProto, size: tuple[int, int],
                   names: Sequence[str] | None = None) -> list[FeatureLayer]:
    """The feature maps the patches are read from: ``names`` when given (any 4-D tensors of the
    graph), else the output of the stage at each of ``STRIDES`` - the last tensor at that stride
    written by a residual ``Add`` (or an activation of one), else the last at that stride."""
    g, maps = _maps(model, size)
    by_name = {m.name: m for m in maps}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConversionError(f"feature layers {missing} are not 4-D feature maps of the backbone at "
                                  f"{size[0]}x{size[1]}", hint=f"feature maps: {', '.join(list(by_name)[:12])} ...")
        layers = [by_name[n] for n in names]
    else:
        layers = []
        for stride in STRIDES:
            at = [m for m in maps if m.stride == stride]
            if not at:
                raise ConversionError(f"the backbone has no feature map at stride {stride} for a {size[0]}x{size[1]} "
                                      "input", hint="name the feature tensors: feature_layers=[...]")
            stage = [m for m in at if _stage_output(g, m.name)]
            layers.append((stage or at)[-1])
    fine = min(layers, key=lambda m: m.stride)
    for layer in layers:
        if layer.stride % fine.stride:
            raise ConversionError(f"feature layer {layer.name!r} has stride {layer.stride}, not a multiple of "
                                  f"{fine.stride} ({fine.name!r})", hint="pick layers whose strides divide each other")
    return sorted(layers, key=lambda m: m.stride)


def _stage_output(g: ir.Graph, tensor: str) -> bool:
    node = g.writers.get(tensor)
    if node is None:
        return False
    if node.op_type == "Add" and all(i not in g.constants for i in node.input):
        return True
    source = g.writers.get(node.input[0]) if node.input else None
    return node.op_type in _RESIDUAL_OUTPUTS[1:] and source is not None and source.op_type == "Add" \
        and all(i not in g.constants for i in source.input)


def _reduce(op: str, x: str, axis: int, out: str, keepdims: int, opset: int, name: str) -> list[onnx.NodeProto]:
    """ReduceMin/ReduceMax/ReduceSumSquare over one axis, in the form ``opset`` wants (axes became an
    input in opset 18)."""
    if opset >= 18:
        axes = f"{name}_axes"
        return [helper.make_node("Constant", [], [axes], name=f"{name}_axes_const",
                                 value=numpy_helper.from_array(np.array([axis], np.int64))),
                helper.make_node(op, [x, axes], [out], name=name, keepdims=keepdims)]
    return [helper.make_node(op, [x], [out], name=name, axes=[axis], keepdims=keepdims)]


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name))


def grid_layer(layers: Sequence[FeatureLayer]) -> FeatureLayer:
    """The layer whose grid the patches live on: the finest; coarser layers are upsampled onto it."""
    return min(layers, key=lambda m: m.stride)


def patch_graph(model: onnx.ModelProto, layers: Sequence[FeatureLayer],
                weights: Sequence[float] | None = None, neighbourhood: int = 3) -> onnx.ModelProto:
    """The backbone with one output, ``patch_features`` [batch, patches, C]: each layer's map averaged
    over 3x3 neighbourhoods, scaled by its weight (``layer_weights``: every layer counts alike in a
    distance), brought onto the grid of ``grid_layer`` and concatenated (the classifier head and
    anything else past the layers dropped)."""
    grid = grid_layer(layers)
    s = SCOPE
    nodes: list[onnx.NodeProto] = []
    pooled = []
    for k, layer in enumerate(layers):
        p = f"{s}pool{k}"
        half = neighbourhood // 2
        nodes.append(helper.make_node("AveragePool", [layer.name], [p], name=p, kernel_shape=[neighbourhood] * 2,
                                      strides=[1, 1], pads=[half] * 4, count_include_pad=1))
        if weights is not None and weights[k] != 1.0:
            w, scaled = f"{s}weight{k}", f"{s}scaled{k}"
            nodes += [_const(w, np.array(weights[k], np.float32)),
                      helper.make_node("Mul", [p, w], [scaled], name=scaled)]
            p = scaled
        if layer.stride > grid.stride:  # onto the finest grid: sizes, since strided grids round up (9 -> 17)
            sizes, up = f"{s}sizes{k}", f"{s}up{k}"
            nodes += [helper.make_node("Shape", [layer.name], [f"{s}shape{k}"], name=f"{s}shape{k}"),
                      _const(f"{s}first{k}", np.array([0], np.int64)),
                      helper.make_node("Gather", [f"{s}shape{k}", f"{s}first{k}"], [f"{s}batch{k}"],
                                       name=f"{s}batch{k}", axis=0),
                      _const(f"{s}grid{k}", np.array([layer.channels, grid.height, grid.width], np.int64)),
                      helper.make_node("Concat", [f"{s}batch{k}", f"{s}grid{k}"], [sizes], name=sizes, axis=0),
                      helper.make_node("Resize", [p, "", "", sizes], [up], name=up, mode="linear",
                                       coordinate_transformation_mode="half_pixel")]
            p = up
        pooled.append(p)
    channels = sum(m.channels for m in layers)
    patches = grid.height * grid.width
    nodes += [
        helper.make_node("Concat", pooled, [f"{s}features"], name=f"{s}concat", axis=1),
        helper.make_node("Transpose", [f"{s}features"], [f"{s}nhwc"], name=f"{s}nhwc", perm=[0, 2, 3, 1]),
        _const(f"{s}patch_shape", np.array([-1, patches, channels], np.int64)),
        helper.make_node("Reshape", [f"{s}nhwc", f"{s}patch_shape"], [PATCHES], name=f"{s}patches"),
    ]
    out = ir.copy(model)
    out.graph.node.extend(nodes)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(PATCHES, TensorProto.FLOAT, ["batch", patches, channels]))
    ir.drop_dead(out)
    ir.forget_shapes(out, [v.name for v in out.graph.value_info])
    return ir.check(out, "anomaly feature")


def layer_weights(features: np.ndarray, layers: Sequence[FeatureLayer]) -> list[float]:
    """Per layer, ``1 / sqrt(mean ||f||^2)`` of its slice of unweighted patch features [..., C]: scaled so
    every layer's patch vectors have unit mean square norm, and a wide layer cannot drown a narrow one
    in the distance (PatchCore pools every layer to one width for the same reason)."""
    flat = np.asarray(features, dtype=np.float64).reshape(-1, features.shape[-1])
    out, start = [], 0
    for layer in layers:
        part = flat[:, start:start + layer.channels]
        start += layer.channels
        mean_sq = float(np.mean(np.sum(part ** 2, axis=1)))
        out.append(1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0)
    return out


def _gaussian(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    k2 = np.outer(k, k)
    return (k2 / k2.sum()).astype(np.float32)[None, None]


def head_graph(patches: onnx.ModelProto, layers: Sequence[FeatureLayer], bank: np.ndarray) -> onnx.ModelProto:
    """``patch_graph`` plus the distance to ``bank`` [K, C]: outputs ``anomaly_score`` [batch] (the largest
    patch distance) and ``anomaly_map`` [batch, H', W'] (patch distances upsampled and smoothed)."""
    fine = grid_layer(layers)
    s = SCOPE
    opset = _opset(patches)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    minus_2mt = (-2.0 * bank.T).astype(np.float32)
    norms = np.sum(bank.astype(np.float64) ** 2, axis=1).astype(np.float32)
    kernel = _gaussian(MAP_SIGMA)
    pad = kernel.shape[-1] // 2
    hm, wm = fine.height * MAP_UPSAMPLE, fine.width * MAP_UPSAMPLE
    out = ir.copy(patches)
    out.graph.initializer.extend([numpy_helper.from_array(minus_2mt, f"{s}bank_t_x_minus2"),
                                  numpy_helper.from_array(norms, f"{s}bank_norms"),
                                  numpy_helper.from_array(kernel, f"{s}smooth_kernel")])
    nodes = [
        helper.make_node("MatMul", [PATCHES, f"{s}bank_t_x_minus2"], [f"{s}cross"], name=f"{s}cross"),
        helper.make_node("Add", [f"{s}cross", f"{s}bank_norms"], [f"{s}partial"], name=f"{s}partial"),
        *_reduce("ReduceMin", f"{s}partial", 2, f"{s}nearest", 0, opset, f"{s}nearest"),
        *_reduce("ReduceSumSquare", PATCHES, 2, f"{s}self", 0, opset, f"{s}self"),
        helper.make_node("Add", [f"{s}nearest", f"{s}self"], [f"{s}d2"], name=f"{s}d2"),
        helper.make_node("Relu", [f"{s}d2"], [f"{s}d2_pos"], name=f"{s}d2_pos"),  # rounding can dip below 0
        helper.make_node("Sqrt", [f"{s}d2_pos"], [f"{s}distance"], name=f"{s}distance"),
        *_reduce("ReduceMax", f"{s}distance", 1, SCORE, 0, opset, f"{s}score"),
        _const(f"{s}grid_shape", np.array([-1, 1, fine.height, fine.width], np.int64)),
        helper.make_node("Reshape", [f"{s}distance", f"{s}grid_shape"], [f"{s}grid"], name=f"{s}grid"),
        _const(f"{s}map_scales", np.array([1, 1, MAP_UPSAMPLE, MAP_UPSAMPLE], np.float32)),
        helper.make_node("Resize", [f"{s}grid", "", f"{s}map_scales"], [f"{s}map_up"], name=f"{s}map_up",
                         mode="linear", coordinate_transformation_mode="half_pixel"),
        helper.make_node("Conv", [f"{s}map_up", f"{s}smooth_kernel"], [f"{s}map_smooth"], name=f"{s}map_smooth",
                         pads=[pad] * 4),
        _const(f"{s}map_shape", np.array([-1, hm, wm], np.int64)),
        helper.make_node("Reshape", [f"{s}map_smooth", f"{s}map_shape"], [MAP], name=f"{s}map"),
    ]
    out.graph.node.extend(nodes)
    del out.graph.output[:]
    out.graph.output.extend([helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["batch"]),
                             helper.make_tensor_value_info(MAP, TensorProto.FLOAT, ["batch", hm, wm])])
    return ir.check(out, "anomaly")


def greedy_coreset(features: np.ndarray, count: int, *, seed: int = 0, projection: int = 128) -> np.ndarray:
    """Indices of ``count`` rows of ``features`` [N, C] chosen by greedy k-center (each next row the one
    farthest from those chosen), on a Johnson-Lindenstrauss projection to ``projection`` dims when C
    is larger (as PatchCore does); the first row is drawn at random with ``seed``."""
    n = len(features)
    if not 1 <= count <= n:
        raise ConversionError(f"coreset size {count} for {n} patch features; expected 1..{n}")
    rng = np.random.default_rng(seed)
    z = np.asarray(features, dtype=np.float32)
    if z.shape[1] > projection:
        z = z @ (rng.standard_normal((z.shape[1], projection)).astype(np.float32) / np.sqrt(projection))
    sq = np.einsum("ij,ij->i", z, z)
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    nearest = sq - 2 * (z @ z[chosen[0]]) + sq[chosen[0]]
    for i in range(1, count):
        chosen[i] = int(np.argmax(nearest))
        np.minimum(nearest, sq - 2 * (z @ z[chosen[i]]) + sq[chosen[i]], out=nearest)
    return chosen


def auroc(scores: Iterable[float], is_defect: Iterable[bool]) -> float:
    """Area under the ROC curve: the chance a defect scores above a good part (ties count half)."""
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(is_defect), dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        raise ConversionError(f"AUROC needs good and defect samples; got {len(neg)} good and {len(pos)} defect")
    order = np.argsort(np.concatenate([neg, pos]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    values = np.concatenate([neg, pos])[order]
    ranks[order] = _average_ranks(values)
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, len(sorted_values) + 1, dtype=np.float64)
    start = 0
    for end in range(1, len(sorted_values) + 1):
        if end == len(sorted_values) or sorted_values[end] != sorted_values[start]:
            ranks[start:end] = (start + 1 + end) / 2
            start = end
    return ranks


def f1_at(scores: Iterable[float], is_defect: Iterable[bool], threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of ``score >= threshold`` as the defect decision."""
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(is_defect), dtype=bool)
    predicted = s >= threshold
    tp = int(np.sum(predicted & y))
    precision = tp / max(int(predicted.sum()), 1)
    recall = tp / max(int(y.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
