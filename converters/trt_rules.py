"""Rules a Q/DQ ONNX graph must follow for TensorRT explicit quantization, checked without TensorRT.

Sources, per rule:

- TensorRT Python API, ``IQuantizeLayer``/``IDequantizeLayer`` docstrings (NVIDIA/TensorRT,
  python/docstrings/infer/pyGraphDoc.h): zeroPt "must be tensorrt.int8" and "must only contain
  zero-valued coefficients, because only symmetric quantization is supported"; "the subgraph which
  terminates with the scale tensor must be a build-time constant. The same restrictions apply to
  the zeroPt"; scale is a scalar (per-tensor) or 1-D (per-axis) whose size matches the axis.
- onnx-tensorrt ``QuantDequantLinearHelper`` (onnx/onnx-tensorrt, builtin_op_importers.cpp):
  UINT8 Q/DQ is refused; "This version of TensorRT requires 3 inputs" (TensorRT 8.x); "Scale
  coefficients must all be positive"; "TRT only supports symmetric quantization - zeroPt must be
  all zeros"; per-channel is "weight-quantization with dimensions KCRS (K is # output channels).
  Activations-quantization does not support per-axis quantization."
- TensorRT developer guide, "Working with Quantized Types" / "Explicit Quantization": symmetric
  int8, per-tensor activations, per-channel weights; ONNX QAT exports a QuantizeLinear followed by
  a DequantizeLinear for every fake-quantization.
- ConvTranspose weights are per-channel on axis 0 (ONNX layout [C_in, C_out/group, k...]), not on
  the output-channel axis 1: NVIDIA/TensorRT issues #1694 and #2380 ("the kernels assume
  per-input-channel quant for ConvTranspose"; "We don't support per-output-channel quant for
  ConvTranspose"); pytorch-quantization's ConvTranspose default moved to axis 0 accordingly.
- ONNX operators QuantizeLinear/DequantizeLinear-13: ``y_zero_point`` defaults to uint8; per-axis
  quantization needs opset 13.

Only the main graph is checked (not If/Loop bodies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from converters.ir import WEIGHTED, Graph

from edge_sdk.errors import ConversionError

__all__ = ["Violation", "RULES", "check_trt_qdq", "assert_trt_compatible"]

RULES: dict[str, str] = {
    "zero-point": "Q/DQ zero points are constant int8 zeros (symmetric int8; uint8 is refused)",
    "scale": "Q/DQ scales are positive, finite build-time constants",
    "axis": "activations are per-tensor; per-channel only for weights, on the axis TensorRT expects",
    "pair": "every QuantizeLinear feeds only DequantizeLinear nodes with the same scale, zero point and axis",
    "opset": "the default-domain opset is >= 13 (per-axis Q/DQ)",
    "weight": "quantized weights of Conv/ConvTranspose/Gemm/MatMul are int8 constants or Q/DQ of a constant",
}
MIN_OPSET = 13
Q, DQ = "QuantizeLinear", "DequantizeLinear"


@dataclass(frozen=True)
class Violation:
    """One broken rule: the node (or ``<model>``), the rule id from :data:`RULES`, and what to change."""

    node: str
    rule: str
    message: str


def _label(index: Graph, node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}#{index.order[id(node)]}"


def _weight(index: Graph, dq: onnx.NodeProto) -> np.ndarray | None:
    """The constant behind a DequantizeLinear: its int8 input, or the float input of its Q."""
    x = index.const(dq.input[0], identity=False)
    if x is not None:
        return x
    q = index.writers.get(dq.input[0])
    return index.const(q.input[0], identity=False) if q is not None and q.op_type == Q else None


def check_trt_qdq(model: onnx.ModelProto) -> list[Violation]:
    """Every way ``model`` breaks TensorRT's explicit-quantization rules, in graph order."""
    index = Graph(model)
    qdq = [n for n in index.nodes if n.op_type in (Q, DQ) and _is_onnx(n)]
    found = _check_opset(model) if qdq else []
    for node in qdq:
        found += _check_zero_point(index, node) + _check_scale(index, node)
        found += _check_pair(index, node) if node.op_type == Q else _check_axis(index, node)
    for node in index.nodes:
        if node.op_type in WEIGHTED and _is_onnx(node) and len(node.input) > 1:
            found += _check_weight(index, node)
    return found


def assert_trt_compatible(model: onnx.ModelProto) -> None:
    """Raise :class:`ConversionError` listing every violation, if there is any."""
    found = check_trt_qdq(model)
    if found:
        lines = "\n".join(f"  - [{v.rule}] {v.node}: {v.message}" for v in found)
        raise ConversionError(f"the Q/DQ graph breaks {len(found)} TensorRT explicit-quantization rule(s):\n{lines}",
                              hint="fix the quantizer's Q/DQ placement; rules are listed in converters.trt_rules.RULES")


def _check_opset(model: onnx.ModelProto) -> list[Violation]:
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= MIN_OPSET:
        return []
    return [Violation("<model>", "opset", f"the model imports ONNX opset {opset}; Q/DQ for TensorRT needs opset "
                      f">= {MIN_OPSET} (per-axis QuantizeLinear/DequantizeLinear): re-export with opset >= 13")]


def _check_zero_point(index: Graph, node: onnx.NodeProto) -> list[Violation]:
    label = _label(index, node)
    if len(node.input) < 3 or not node.input[2]:
        why = ("so ONNX makes its output uint8 (the QuantizeLinear default)" if node.op_type == Q
               else "and TensorRT 8.x's ONNX parser requires all three Q/DQ inputs")
        return [Violation(label, "zero-point", f"{node.op_type} has no zero point, {why}; "
                          "add an int8 zero point of 0 (TensorRT quantization is symmetric int8)")]
    zero = index.const(node.input[2], identity=False)
    if zero is None:
        return [Violation(label, "zero-point", f"zero point {node.input[2]!r} is computed at run time; "
                          "TensorRT needs a build-time constant: store an int8 initializer of 0")]
    if zero.dtype != np.int8:
        return [Violation(label, "zero-point", f"zero point {node.input[2]!r} is {zero.dtype}; TensorRT accepts only "
                          "int8 (uint8 is refused): re-quantize symmetrically to int8 with zero point 0")]
    if np.any(zero != 0):
        return [Violation(label, "zero-point", f"zero point {node.input[2]!r} holds {zero.ravel()[:4].tolist()}; "
                          "TensorRT supports only symmetric quantization: use 0 and a symmetric range (amax)")]
    return []


def _check_scale(index: Graph, node: onnx.NodeProto) -> list[Violation]:
    label, name = _label(index, node), node.input[1]
    scale = index.const(name, identity=False)
    if scale is None:
        return [Violation(label, "scale", f"scale {name!r} is computed at run time; TensorRT needs build-time "
                          "constant scales: store the calibrated scale as an initializer")]
    values = scale.astype(np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        bad = [v for v in values.tolist() if not (np.isfinite(v) and v > 0)][:4]
        return [Violation(label, "scale", f"scale {name!r} holds {bad or 'no values'}; TensorRT needs every scale "
                          "finite and > 0: re-calibrate, or leave an all-zero tensor in float")]
    return []


def _check_pair(index: Graph, q: onnx.NodeProto) -> list[Violation]:
    label, out = _label(index, q), q.output[0]
    users = index.reads(out)
    if not users or out in index.outputs:
        return [Violation(label, "pair", f"QuantizeLinear output {out!r} is not dequantized; TensorRT expects "
                          "each QuantizeLinear to be followed by a DequantizeLinear")]
    found = []
    for user, k in users:
        if user.op_type != DQ or k != 0:
            found.append(Violation(label, "pair", f"QuantizeLinear output {out!r} feeds {user.op_type} "
                                   f"{_label(index, user)!r}; it may feed only DequantizeLinear nodes"))
        elif not _same_params(index, q, user):
            found.append(Violation(label, "pair", f"QuantizeLinear and DequantizeLinear {_label(index, user)!r} "
                                   "differ in scale, zero point or axis; use the same parameters for both"))
    return found


def _check_axis(index: Graph, dq: onnx.NodeProto) -> list[Violation]:
    label, scale = _label(index, dq), index.const(dq.input[1], identity=False)
    if scale is None or scale.size <= 1:
        return []  # per-tensor (or a run-time scale, reported by the scale rule)
    weight = _weight(index, dq)
    if scale.ndim > 1:
        return [Violation(label, "axis", f"scale {dq.input[1]!r} has shape {list(scale.shape)}; TensorRT int8 takes "
                          "a scalar (per-tensor) or 1-D (per-channel) scale")]
    if weight is None or weight.ndim == 0:
        return [Violation(label, "axis", f"per-channel scale {dq.input[1]!r} on an activation; TensorRT quantizes "
                          "activations per-tensor: use a scalar scale")]
    axis = _attr(dq, "axis", 1)
    if not -weight.ndim <= axis < weight.ndim:
        return [Violation(label, "axis", f"axis {axis} is outside the weight's rank {weight.ndim}")]
    axis %= weight.ndim
    found = []
    for user, k in index.reads(dq.output[0]):
        expected = _weight_axis(user, k, weight.ndim)
        if expected is None:
            found.append(Violation(label, "axis", f"per-channel weight feeds input {k} of {user.op_type} "
                                   f"{_label(index, user)!r}; TensorRT takes per-channel only for the weight of "
                                   f"{', '.join(WEIGHTED)}: use a scalar scale"))
        elif axis != expected:
            found.append(Violation(label, "axis", f"weight of {user.op_type} {_label(index, user)!r} is quantized "
                                   f"on axis {axis}; TensorRT expects axis {expected}: re-quantize per channel "
                                   f"on axis {expected}"))
    if scale.size != weight.shape[axis]:
        found.append(Violation(label, "axis", f"{scale.size} scales for {weight.shape[axis]} channels on axis "
                               f"{axis} of the weight; give one scale per channel"))
    return found


def _check_weight(index: Graph, node: onnx.NodeProto) -> list[Violation]:
    dq = index.writers.get(node.input[1])
    if dq is None or dq.op_type != DQ:
        return []
    x = index.const(dq.input[0], identity=False)
    source = index.writers.get(dq.input[0])
    label, what = _label(index, node), f"weight of {node.op_type}"
    if x is not None and x.dtype != np.int8:
        return [Violation(label, "weight", f"{what} is dequantized from {x.dtype} constant {dq.input[0]!r}; "
                          "TensorRT needs int8 weights: quantize the float weight to int8")]
    # MatMul's B may be a quantized activation (attention), so only the others need a constant behind the DQ.
    if x is None and (source is None or source.op_type != Q) and node.op_type != "MatMul":
        return [Violation(label, "weight", f"{what} is dequantized from {dq.input[0]!r}, computed at run time; "
                          "dequantize an int8 initializer, or Q/DQ the float constant directly")]
    return []


def _weight_axis(node: onnx.NodeProto, k: int, rank: int) -> int | None:
    """The per-channel axis TensorRT expects for input ``k`` of ``node``; None where per-channel is refused."""
    if k != 1 or node.op_type not in WEIGHTED:
        return None
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    if node.op_type == "MatMul":
        return rank - 1  # B is [..., K, N]
    return 0  # Conv [K, C, ...]; ConvTranspose [C, K/group, ...] on axis 0 too (see module docstring)


def _same_params(index: Graph, q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
    for i in (1, 2):
        a = q.input[i] if len(q.input) > i else ""
        b = dq.input[i] if len(dq.input) > i else ""
        if a == b:
            continue
        va, vb = index.const(a, identity=False), index.const(b, identity=False)
        if va is None or vb is None or va.dtype != vb.dtype or not np.array_equal(va.ravel(), vb.ravel()):
            return False
    scale = index.const(q.input[1], identity=False)
    per_channel = scale is not None and scale.size > 1
    return not per_channel or _attr(q, "axis", 1) == _attr(dq, "axis", 1)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _is_onnx(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")
