"""Q/DQ graph writer: one calibration -> two explicit-quantization graphs.

* **S8S8** for TensorRT: symmetric int8 activations (zero point 0, ±amax),
  per-channel symmetric int8 weights on the output-channel axis, Q/DQ only on
  the *inputs* of the quantized ops (TensorRT's explicit-quantization placement),
  fp32 weights behind Q/DQ so TensorRT 8.x folds them itself.
* **U8S8** for the onnxruntime CPU provider on x86 with VNNI and on Arm64: uint8
  activations with a zero point (affine) and int8 per-channel weights, in the QDQ layout
  onnxruntime fuses into integer kernels (VPDPBUSD on x86, SDOT/UDOT or widening
  multiplies on Arm), which accumulate in int32 exactly.
* **U8S7** for x86 without VNNI (AVX2, AVX-512 without VNNI): the U8S8 graph with 7-bit
  weights in [-64, 64] (onnxruntime's ``reduce_range``) on every layer whose kernel sums
  pairs of uint8 x int8 products in int16 (VPMADDUBSW: 255 * 127 * 2 overflows, 255 * 64 * 2
  does not); depthwise convolutions keep 8-bit weights, since their kernels widen to int16
  before multiplying. ``bench/int8_kernels.py`` measures which forms each CPU runs exactly.

Placement is model-aware: in transformers the linear projections (MatMul / Gemm with a
constant weight) are quantized, and in the S8S8 and U8S8 graphs the attention MatMuls
(activation x activation: query x key, probabilities x value) get symmetric int8 on both
inputs too, which onnxruntime (VNNI, Arm64) and OpenVINO run as integer kernels and TensorRT
as int8 batched MatMuls; softmax, LayerNorm and GELU stay in float. U8S7 leaves attention in
float: without VNNI onnxruntime's int8 x int8 kernels sum pairs in int16 and saturate.
Insertion of the projections' Q/DQ is onnxruntime's QDQ quantizer, fed our own ranges; the
attention pairs are written here.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from converters import ir
from converters.equalization import strip_bounds
from converters.ir import Graph

log = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
# Ops onnxruntime runs in int8 on the CPU between weighted ops, keeping chains quantized.
CPU_CNN_OPS = (*WEIGHTED_OPS, "Add", "Clip", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat")


#: Nodes named in this scope stay float in every int8 graph (an anomaly head's memory bank, say).
FLOAT_SCOPE = "float/"


class Variant(str, enum.Enum):
    S8S8 = "s8s8"  # TensorRT
    U8S8 = "u8s8"  # onnxruntime CPU: x86 with VNNI, Arm64
    U8S7 = "u8s7"  # onnxruntime CPU: x86 without VNNI


#: The graphs whose attention MatMuls take symmetric int8 on both inputs (see the module docstring).
ATTENTION_VARIANTS = (Variant.S8S8, Variant.U8S8)


REDUCED_WEIGHT_MAX = 64  # onnxruntime's reduce_range int8 weights: [-64, 64]


def is_depthwise(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and next((a.i for a in node.attribute if a.name == "group"), 1) > 1


def weight_max(variant: Variant) -> "Callable[[onnx.NodeProto], int]":
    """The largest weight level ``variant`` gives a node: 7-bit weights except depthwise convs in U8S7."""
    if variant is Variant.U8S7:
        return lambda node: 127 if is_depthwise(node) else REDUCED_WEIGHT_MAX
    return lambda node: 127


@dataclass(frozen=True)
class Placement:
    """Which nodes get quantized, and for which op types, in a model family."""

    family: str  # "transformer" or "cnn"
    nodes: tuple[str, ...]  # weighted layers (a constant weight)
    op_types: Mapping[Variant, tuple[str, ...]]
    attention: tuple[str, ...] = ()  # activation x activation MatMuls, int8 in ATTENTION_VARIANTS

    def layers(self, variant: Variant) -> tuple[str, ...]:
        """Every node ``variant`` quantizes: the weighted layers, then the attention MatMuls it takes."""
        return self.nodes + (self.attention if variant in ATTENTION_VARIANTS else ())

    def without(self, floats: "set[str] | frozenset[str]") -> "Placement":
        """The placement with ``floats`` (weighted or attention nodes) left in float."""
        return replace(self, nodes=tuple(n for n in self.nodes if n not in floats),
                       attention=tuple(n for n in self.attention if n not in floats))


def plan_placement(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> Placement:
    """Decide what to quantize: weighted ops with a constant weight, never float-sensitive paths."""
    graph = Graph(model)
    constants, family = graph.constants, graph.family
    nodes, attention = [], []
    for node in graph.nodes:
        if node.op_type not in WEIGHTED_OPS or node.name in exclude or node.name.startswith(FLOAT_SCOPE):
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight in constants:
            nodes.append(node.name)
        elif family == "transformer" and node.op_type == "MatMul" and node.input[0] not in constants:
            attention.append(node.name)  # query x key, probabilities x value
    op_types: dict[Variant, tuple[str, ...]]
    if family == "transformer":
        op_types = {Variant.S8S8: ("MatMul", "Gemm"), Variant.U8S8: ("MatMul", "Gemm"), Variant.U8S7: ("MatMul", "Gemm")}
    else:
        op_types = {Variant.S8S8: WEIGHTED_OPS, Variant.U8S8: CPU_CNN_OPS, Variant.U8S7: CPU_CNN_OPS}
    return Placement(family, tuple(nodes), op_types, tuple(attention))


def write_qdq(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    variant: Variant,
    placement: Placement,
    attention_amax: Mapping[str, float] | None = None,
) -> onnx.ModelProto:
    """Insert Q/DQ for ``variant`` using ``ranges`` (tensor -> (lo, hi); symmetric for S8S8), and on
    the attention MatMuls' inputs with ``attention_amax`` (tensor -> symmetric range; ``ranges``'
    largest magnitude where it is not given).

    A placement with no node left (mixed precision returned every layer to float) gives an
    unchanged copy of ``model``."""
    attention = placement.attention if variant in ATTENTION_VARIANTS else ()
    if not placement.nodes:
        out = ir.copy(model)
    else:
        model = strip_bounds(model, ranges, set(placement.nodes))
        if variant is Variant.U8S7:
            full = _quantize(model, ranges, Variant.U8S8, placement, reduce_range=False)
            reduced = _quantize(model, ranges, Variant.U8S7, placement, reduce_range=True)
            return _keep_depthwise_weights(reduced, full)
        out = _quantize(model, ranges, variant, placement, reduce_range=False)
    if attention:
        amax = dict(attention_amax or {})
        for name, (lo, hi) in ranges.items():
            amax.setdefault(name, max(abs(lo), abs(hi)))
        quantize_attention(out, amax, attention)
        onnx.checker.check_model(out)
    return out


def quantize_attention(model: onnx.ModelProto, amax: Mapping[str, float], nodes: Sequence[str]) -> onnx.ModelProto:
    """Give both inputs of each MatMul in ``nodes`` a symmetric int8 QuantizeLinear/DequantizeLinear
    pair (scale ``amax / 127``, zero point 0), in place: only these MatMuls read the dequantized
    tensors, every other reader keeps the float one. A node whose input has no range stays float."""
    chosen = set(nodes)
    wanted: dict[str, str] = {}  # float tensor -> its dequantized name
    for node in model.graph.node:
        if node.name in chosen and node.op_type == "MatMul" and all(t in amax for t in node.input[:2]):
            for k, tensor in enumerate(node.input[:2]):
                dq = wanted.setdefault(tensor, f"{tensor}_attention_dq")
                node.input[k] = dq
    if not wanted:
        return model
    inits = {i.name for i in model.graph.initializer}
    pairs: dict[str, list[onnx.NodeProto]] = {}
    for tensor, dq in wanted.items():
        scale, zero = f"{tensor}_attention_scale", f"{tensor}_attention_zero_point"
        if scale not in inits:
            model.graph.initializer.extend([
                onnx.numpy_helper.from_array(np.array(max(float(amax[tensor]), 1e-30) / 127.0, np.float32), scale),
                onnx.numpy_helper.from_array(np.array(0, np.int8), zero)])
        q = f"{tensor}_attention_q"
        pairs[tensor] = [onnx.helper.make_node("QuantizeLinear", [tensor, scale, zero], [q], name=f"{tensor}_attention_Q"),
                         onnx.helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=f"{tensor}_attention_DQ")]
    ordered = [q for name in (i.name for i in model.graph.input) if name in pairs for q in pairs.pop(name)]
    for node in model.graph.node:
        ordered.append(node)
        ordered.extend(q for out in node.output if out in pairs for q in pairs.pop(out))
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def _quantize(
    model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], variant: Variant, placement: Placement, *,
    reduce_range: bool,
) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    op_types = placement.op_types[variant]
    s8 = variant is Variant.S8S8
    data = {}
    for name, (lo, hi) in ranges.items():
        if s8:
            amax = max(abs(lo), abs(hi))
            lo, hi = -amax, amax
        data[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
    extra = {
        "ActivationSymmetric": s8,
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,
        "AddQDQPairToWeight": s8,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        "ForceQuantizeNoInputCheck": False,
        "QuantizeBias": not s8,  # TensorRT takes float biases; onnxruntime fuses int32 ones
    }
    if s8 or placement.family == "transformer":
        # Q/DQ only on inputs: TensorRT's placement, and in transformers the float attention path stays exact.
        extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
    nodes = list(placement.nodes)
    if not s8 and placement.family == "cnn":
        nodes = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in _excluded(model, placement)]
    quantizer = QDQQuantizer(
        model, per_channel=True, reduce_range=reduce_range, weight_qType=QuantType.QInt8,
        activation_qType=QuantType.QInt8 if s8 else QuantType.QUInt8,
        tensors_range=TensorsData(CalibrationMethod.MinMax, data), nodes_to_quantize=nodes, nodes_to_exclude=[],
        op_types_to_quantize=list(op_types), extra_options=extra,
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    out: onnx.ModelProto = quantizer.model.model
    if placement.family == "transformer":
        _float_readers_read_float(out, set(placement.nodes))
    onnx.checker.check_model(out)
    return out


def _float_sources(model: onnx.ModelProto) -> dict[str, str]:
    """DequantizeLinear output -> the float tensor its QuantizeLinear quantized."""
    producers = Graph(model).writers
    sources: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = producers.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            sources[node.output[0]] = q.input[0]
    return sources


def _keep_depthwise_weights(reduced: onnx.ModelProto, full: onnx.ModelProto) -> onnx.ModelProto:
    """``reduced`` with the 8-bit weights and biases of ``full`` on its depthwise convolutions.

    Both graphs come from the same quantizer on the same model and ranges, so they share node
    and initializer names; only the weight and bias values and scales differ."""
    graph = Graph(reduced)
    producers, inits, full_inits = graph.writers, graph.inits, Graph(full).inits
    for node in graph.nodes:
        if not is_depthwise(node):
            continue
        for name in node.input[1:]:
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            for init in dq.input:
                if init in inits and init in full_inits:
                    inits[init].CopyFrom(full_inits[init])
    return reduced


def _float_readers_read_float(model: onnx.ModelProto, quantized: set[str]) -> None:
    """Point every non-quantized reader of a dequantized activation back at the float tensor.

    onnxruntime's quantizer rewires *all* readers of a quantized tensor to its DequantizeLinear
    output, so residual Adds and LayerNorms would read int8-rounded values (and unfused DQ
    nodes would cost time). Only the quantized MatMul/Gemm nodes should see them.
    """
    float_source = _float_sources(model)
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_source:
                node.input[i] = float_source[name]
    ir.drop_dead(model)  # the DQ nodes nobody reads any more, the Q nodes that fed only those


def _excluded(model: onnx.ModelProto, placement: Placement) -> set[str]:
    """Weighted nodes the placement left in float (mixed precision, attention, non-constant weights)."""
    chosen = set(placement.nodes)
    return {n.name for n in model.graph.node
            if (n.op_type in WEIGHTED_OPS and n.name not in chosen) or n.name.startswith(FLOAT_SCOPE)}
