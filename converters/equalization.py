"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019), without training.

For two convolutions ``A -> [Relu] -> B`` where A's output reaches nothing but B, scaling
A's output channel ``i`` by ``1/s_i`` and B's matching input channel by ``s_i`` leaves the
function unchanged (ReLU is positive-homogeneous) while evening out the per-channel weight
ranges that per-tensor and depthwise int8 kernels struggle with. ``s_i = sqrt(r1_i / r2_i)``
equalizes both ranges to ``sqrt(r1_i * r2_i)``.

Pairs joined by ``Clip`` (ReLU6, as in EfficientNet-Lite and MobileNet) are skipped and
reported: clipping at a fixed 6 is not positive-homogeneous, and a per-channel bound would
need extra ops that break onnxruntime's int8 chains.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from converters.ir import Graph, attr

log = logging.getLogger(__name__)


def _group(node: onnx.NodeProto) -> int:
    return int(attr(node, "group", 1))


def _channels(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    return int(inits[node.input[1]].dims[0])


def find_pairs(model: onnx.ModelProto) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Equalizable (A, B) Conv pairs, and why other Conv -> Conv links were left alone."""
    g = Graph(model)
    consumers, outputs, inits = g.readers, g.outputs, g.inits
    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for a in g.nodes:
        if a.op_type != "Conv" or a.input[1] not in inits:
            continue
        link = consumers.get(a.output[0], [])
        if len(link) == 1 and link[0].op_type in ("Relu", "Clip"):
            act = link[0]
            if act.op_type == "Clip":
                skipped[a.name] = "followed by Clip (ReLU6), which is not positive-homogeneous"
                continue
            tensor, link = act.output[0], consumers.get(act.output[0], [])
        else:
            tensor = a.output[0]
        if len(link) != 1 or tensor in outputs:
            if any(n.op_type == "Conv" for n in link):
                skipped[a.name] = "its output also feeds another path (e.g. a residual Add)"
            continue
        b = link[0]
        if b.op_type == "Conv" and b.input[1] in inits and b.input[0] == tensor and _group(b) in (1, _channels(b, inits)):
            pairs.append((a.name, b.name))
    return pairs, skipped


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]], dict[str, str]]:
    """A copy of ``model`` with every equalizable Conv pair rescaled; the pairs and the skips."""
    out = ir.copy(model)
    pairs, skipped = find_pairs(out)
    g = Graph(out)
    inits, nodes = g.inits, g.by_key
    for a_name, b_name in pairs:
        a, b = nodes[a_name], nodes[b_name]
        w1 = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
        w2 = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
        depthwise = _group(b) > 1  # find_pairs admits only plain (group 1) or depthwise consumers
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
        r2 = (np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise
              else np.abs(w2).max(axis=(0, 2, 3)))
        s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
        _set(inits[a.input[1]], w1 / s[:, None, None, None])
        if len(a.input) > 2 and a.input[2] in inits:
            _set(inits[a.input[2]], numpy_helper.to_array(inits[a.input[2]]) / s)
        _set(inits[b.input[1]], w2 * (s[:, None, None, None] if depthwise else s[None, :, None, None]))
    log.info("cross-layer equalization: %d pairs, %d skipped", len(pairs), len(skipped))
    return out, pairs, skipped


def _set(init: onnx.TensorProto, value: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
