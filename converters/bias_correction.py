"""Bias correction: undo the mean output shift that int8 weight rounding causes, without training.

Rounding a layer's weights to int8 (symmetric, per output channel, ``scale = max|w| / 127``,
as both TensorRT and onnxruntime do) moves its expected output by ``(W_q - W) E[x]``. With the
per-channel input means measured on the calibration data, that shift is subtracted from the
layer's bias before the Q/DQ graphs are written (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", 2019, empirical variant). It matters most for
depthwise convolutions, whose few weights per channel round coarsely.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from converters.calibration.schemes import dequantize, per_channel_weight_params, quantize

log = logging.getLogger(__name__)


@dataclass
class ChannelMeans:
    """Running per-channel means of activation tensors (channel axis 1 for Conv, last axis otherwise)."""

    axes: dict[str, int]
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str, value: np.ndarray) -> None:
        axis = self.axes.get(name)
        if axis is None:
            return
        axis %= value.ndim
        others = tuple(i for i in range(value.ndim) if i != axis)
        total = value.sum(axis=others, dtype=np.float64)
        if not np.isfinite(total).all():  # rare: drop NaN/inf rather than poison the mean
            total = np.where(np.isfinite(value), value, 0).sum(axis=others, dtype=np.float64)
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + value.size // value.shape[axis]

    def mean(self, name: str) -> np.ndarray | None:
        return self.sums[name] / self.counts[name] if name in self.sums else None


def input_nodes(model: onnx.ModelProto, nodes: Sequence[str]) -> list[tuple[str, str]]:
    """(node, activation input) of the Conv/Gemm layers among ``nodes`` that bias correction can treat."""
    chosen = set(nodes)
    return [(n.name, n.input[0]) for n in model.graph.node if n.name in chosen and n.op_type in ("Conv", "Gemm")]


def input_axes(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, int]:
    """The activation input of each node to correct, with its channel axis (1 for Conv, last for Gemm)."""
    ops = {n.name: n.op_type for n in model.graph.node}
    return {tensor: (1 if ops[node] == "Conv" else -1) for node, tensor in input_nodes(model, nodes)}


def _rounding_error(w: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    params = per_channel_weight_params(w, axis, qmax)
    return dequantize(quantize(w, params), params) - w


def _conv_shift(w: np.ndarray, group: int, mean: np.ndarray, qmax: int) -> np.ndarray:
    eps = _rounding_error(w, 0, qmax)  # [out, in/group, kh, kw]
    out_per_group, in_per_group = w.shape[0] // group, w.shape[1]
    shift = np.empty(w.shape[0])
    for o in range(w.shape[0]):
        g = o // out_per_group
        shift[o] = eps[o].sum(axis=(1, 2)) @ mean[g * in_per_group : (g + 1) * in_per_group]
    return shift


def _gemm_shift(node: onnx.NodeProto, w: np.ndarray, mean: np.ndarray, qmax: int) -> np.ndarray | None:
    attrs = {a.name: a for a in node.attribute}
    if attrs.get("transA") and attrs["transA"].i:
        return None
    trans_b = bool(attrs.get("transB") and attrs["transB"].i)
    eps = _rounding_error(w, 0 if trans_b else 1, qmax)
    return eps @ mean if trans_b else mean @ eps


def correct_biases(model: onnx.ModelProto, nodes: Sequence[str], means: ChannelMeans,
                   weight_max: Callable[[onnx.NodeProto], int] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose Conv/Gemm biases (of ``nodes`` only) absorb their int8 weight-rounding shift.

    ``weight_max(node)`` is the node's largest weight level (127 for int8, 63 for 7-bit weights)."""
    out = ir.copy(model)
    inits = {i.name: i for i in out.graph.initializer}
    corrected = []
    for node in out.graph.node:
        mean = means.mean(node.input[0]) if node.name in set(nodes) else None
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if mean is None or weight is None:
            continue
        w = numpy_helper.to_array(weight).astype(np.float64)
        qmax = weight_max(node) if weight_max else 127
        shift: np.ndarray | None
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            shift = _conv_shift(w, group, mean, qmax)
        else:
            shift = _gemm_shift(node, w, mean, qmax)
        if shift is None:
            continue
        _apply(out, node, inits, shift)
        corrected.append(node.name)
    log.debug("bias correction on %d layers", len(corrected))
    return out, corrected


def _apply(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], shift: np.ndarray) -> None:
    bias_index = 2
    if len(node.input) > bias_index and node.input[bias_index] in inits:
        bias = inits[node.input[bias_index]]
        value = numpy_helper.to_array(bias).astype(np.float64) - shift
        bias.CopyFrom(numpy_helper.from_array(value.astype(np.float32), bias.name))
        return
    name = f"{node.name}_corrected_bias"
    model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
    while len(node.input) < bias_index:
        node.input.append("")
    node.input.append(name)
