"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019), without training.

For two convolutions ``A -> [Relu] -> B`` where A's output reaches nothing but B, scaling
A's output channel ``i`` by ``1/s_i`` and B's matching input channel by ``s_i`` leaves the
function unchanged (ReLU is positive-homogeneous) while evening out the per-channel weight
ranges that per-tensor and depthwise int8 kernels struggle with. ``s_i = sqrt(r1_i / r2_i)``
equalizes both ranges to ``sqrt(r1_i * r2_i)``.

Pairs joined by ``Clip(0, hi)`` (ReLU6, as in EfficientNet-Lite and MobileNet) are equalized
from calibration data: clipping is not positive-homogeneous, but ``g * clip(x, 0, hi) =
clip(g * x, 0, g * hi)`` for ``g > 0``, so the prepared fp32 graph computes the same function
with a ``Relu`` and a per-channel bound (``Min`` with ``g * hi``, node name in the ``BOUND``
scope). Here ``g`` scales A's output channel up (B's input weights down) so that every channel
of the activation between them uses the whole per-tensor int8 range: ``g_i = T / m_i`` with
``m_i`` channel ``i``'s calibrated maximum and ``T`` the largest, when B is depthwise (its
per-channel weight scales absorb ``1/g`` exactly); ``g_i = sqrt(w_i / m_i)`` balancing the
activation against B's input-channel weight range otherwise. Every bound is kept at or above
the activation's calibrated maximum, so in the int8 graphs the quantizer's own saturation
(at most that maximum) already applies it: ``strip_bounds`` removes the ``Min`` nodes there,
which keeps Conv + Relu + QuantizeLinear fused on every runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters import ir
from converters.ir import Graph, attr

log = logging.getLogger(__name__)

#: Node-name scope of the per-channel bounds that equalizing a ReLU6 pair leaves in the fp32 graph.
BOUND = "equalize/bound/"
#: Largest per-channel factor for a clipped pair (a nearly dead channel is not blown up further).
MAX_GAIN = 64.0

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClipPair:
    """``a -> Clip(0, hi) -> b``: equalizable with calibration data."""

    a: str
    clip: str
    b: str
    hi: float
    tensor: str  # the Clip's output, the activation between the two convolutions


def _group(node: onnx.NodeProto) -> int:
    return int(attr(node, "group", 1))


def _channels(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    return int(inits[node.input[1]].dims[0])


def _clip_bounds(g: Graph, clip: onnx.NodeProto) -> tuple[float, float] | None:
    """``(lo, hi)`` of a Clip whose bounds are constants (opset 11+ inputs or opset 6 attributes)."""
    if len(clip.input) > 1 or not clip.attribute:
        names = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
        values = [g.const(n) if n else None for n in names]
        lo, hi = values
        if lo is None or hi is None or lo.size != 1 or hi.size != 1:
            return None
        return float(lo.reshape(())), float(hi.reshape(()))
    return float(attr(clip, "min", -np.inf)), float(attr(clip, "max", np.inf))


def _consumer(g: Graph, a: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]]:
    """The tensor A's output reaches B through (after a single Relu or Clip), and its readers."""
    link = g.readers.get(a.output[0], [])
    if len(link) == 1 and link[0].op_type in ("Relu", "Clip") and a.output[0] not in g.outputs:
        return link[0].output[0], g.readers.get(link[0].output[0], [])
    return a.output[0], link


def find_pairs(model: onnx.ModelProto) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Equalizable (A, B) Conv pairs joined by ReLU or nothing, and why other Conv -> Conv links
    were left alone (pairs joined by ReLU6 are ``find_clip_pairs``'s)."""
    pairs, clipped, skipped = _scan(model)
    skipped.update({p.a: "followed by Clip (ReLU6): equalized only with calibration data" for p in clipped})
    return pairs, skipped


def find_clip_pairs(model: onnx.ModelProto) -> list[ClipPair]:
    """The (A, Clip(0, hi), B) Conv pairs ``equalize`` rescales when it has calibration data."""
    return _scan(model)[1]


def _scan(model: onnx.ModelProto) -> tuple[list[tuple[str, str]], list[ClipPair], dict[str, str]]:
    g = Graph(model)
    inits = g.inits
    pairs: list[tuple[str, str]] = []
    clipped: list[ClipPair] = []
    skipped: dict[str, str] = {}
    for a in g.nodes:
        if a.op_type != "Conv" or a.input[1] not in inits:
            continue
        tensor, link = _consumer(g, a)
        act = g.writers[tensor] if tensor != a.output[0] else None
        if len(link) != 1 or tensor in g.outputs:
            if any(n.op_type == "Conv" for n in link):
                skipped[a.name] = "its output also feeds another path (e.g. a residual Add)"
            continue
        b = link[0]
        if not (b.op_type == "Conv" and b.input[1] in inits and b.input[0] == tensor
                and _group(b) in (1, _channels(b, inits))):
            continue
        if act is None or act.op_type == "Relu":
            pairs.append((a.name, b.name))
            continue
        bounds = _clip_bounds(g, act)
        if bounds is None or bounds[0] != 0.0 or not 0.0 < bounds[1] < np.inf:
            skipped[a.name] = f"followed by a Clip with bounds {bounds} (only Clip(0, hi) is equalized)"
            continue
        clipped.append(ClipPair(a.name, act.name, b.name, bounds[1], tensor))
    return pairs, clipped, skipped


def equalize(
    model: onnx.ModelProto, batches: Sequence[Feeds] | None = None,
) -> tuple[onnx.ModelProto, list[tuple[str, str]], dict[str, str]]:
    """A copy of ``model`` with every equalizable Conv pair rescaled; the pairs and the skips.

    With ``batches`` (calibration feeds), pairs joined by ReLU6 are equalized too (see the module
    docstring); without, they are skipped and reported."""
    out = ir.copy(model)
    pairs, clipped, skipped = _scan(out)
    g = Graph(out)
    for a_name, b_name in pairs:
        _rescale(g, g.by_key[a_name], g.by_key[b_name], 1.0 / _weight_balance(g, g.by_key[a_name], g.by_key[b_name]))
    done = list(pairs)
    if clipped and batches:
        maxima = channel_maxima(out, batches, [p.tensor for p in clipped])
        for pair in clipped:
            gain = _clip_gain(g, pair, maxima[pair.tensor])
            _rescale(g, g.by_key[pair.a], g.by_key[pair.b], gain)
            _bound(out, g.by_key[pair.clip], pair, gain)
            done.append((pair.a, pair.b))
    else:
        skipped.update({p.a: "followed by Clip (ReLU6): equalized only with calibration data" for p in clipped})
    ir.drop_dead(out)
    log.info("cross-layer equalization: %d pairs (%d joined by ReLU6), %d skipped", len(done), len(done) - len(pairs),
             len(skipped))
    return out, done, skipped


def _weights(g: Graph, node: onnx.NodeProto) -> np.ndarray:
    return numpy_helper.to_array(g.inits[node.input[1]]).astype(np.float64)


def _weight_balance(g: Graph, a: onnx.NodeProto, b: onnx.NodeProto) -> np.ndarray:
    """``s_i = sqrt(r1_i / r2_i)``: A's output-channel range against B's input-channel range."""
    w1, w2 = _weights(g, a), _weights(g, b)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = _input_ranges(b, w2)
    return np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)


def _input_ranges(b: onnx.NodeProto, w2: np.ndarray) -> np.ndarray:
    """B's weight range per input channel (its output channel when depthwise)."""
    if _group(b) > 1:
        return np.abs(w2).reshape(w2.shape[0], -1).max(axis=1)
    return np.abs(w2).max(axis=(0, 2, 3))


def _clip_gain(g: Graph, pair: ClipPair, m: np.ndarray) -> np.ndarray:
    """Per-channel factors ``g`` for a ReLU6 pair from the activation's channel maxima ``m``, with
    every bound ``g * hi`` at or above the scaled activation's largest value."""
    b = g.by_key[pair.b]
    live = m > m.max() * 1e-6
    if _group(b) > 1:
        gain = np.where(live, m.max() / np.where(live, m, 1.0), 1.0)
    else:
        w = _input_ranges(b, _weights(g, b))
        gain = np.where(live & (w > 0), np.sqrt(w / np.where(live, m, 1.0)), 1.0)
        gain = gain / gain[live].max() if live.any() else gain
    gain = np.clip(gain, 1.0 / MAX_GAIN, MAX_GAIN)
    peak = float((m * gain).max())
    return np.maximum(gain, peak / pair.hi)  # never raises the peak: m <= hi, so m * peak / hi <= peak


def _rescale(g: Graph, a: onnx.NodeProto, b: onnx.NodeProto, gain: np.ndarray) -> None:
    """A's output channel ``i`` times ``gain_i``, B's matching input channel divided by it."""
    w1, w2 = _weights(g, a), _weights(g, b)
    _set(g.inits[a.input[1]], w1 * gain[:, None, None, None])
    if len(a.input) > 2 and a.input[2] in g.inits:
        _set(g.inits[a.input[2]], numpy_helper.to_array(g.inits[a.input[2]]) * gain)
    inverse = 1.0 / gain
    _set(g.inits[b.input[1]], w2 * (inverse[:, None, None, None] if _group(b) > 1 else inverse[None, :, None, None]))


def _bound(model: onnx.ModelProto, clip: onnx.NodeProto, pair: ClipPair, gain: np.ndarray) -> None:
    """Replace ``clip`` by ``Relu`` then ``Min`` with the per-channel bounds ``gain * hi``."""
    tag = f"{BOUND}{pair.a}"
    bound = (gain * pair.hi).astype(np.float32).reshape(1, -1, 1, 1)
    model.graph.initializer.append(numpy_helper.from_array(bound, f"{tag}/hi"))
    relu = helper.make_node("Relu", [clip.input[0]], [f"{tag}/relu"], name=f"{tag}/Relu")
    low = helper.make_node("Min", [f"{tag}/relu", f"{tag}/hi"], [pair.tensor], name=f"{tag}/Min")
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == clip.name)  # names are unique (ir.name_nodes)
    nodes[at:at + 1] = [relu, low]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def channel_maxima(model: onnx.ModelProto, batches: Iterable[Feeds], tensors: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) maxima of ``tensors`` over ``batches``."""
    peaks: dict[str, np.ndarray] = {}
    for _, found in ir.probe(model, batches, tensors, optimize=True):
        for name in tensors:
            value = found[name]
            peak = value.max(axis=tuple(i for i in range(value.ndim) if i != 1)).astype(np.float64)
            peaks[name] = np.maximum(peaks.get(name, peak), peak)
    return peaks


def strip_bounds(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], quantized: set[str],
                 ) -> onnx.ModelProto:
    """``model`` without the per-channel bounds of equalized ReLU6 pairs whose readers are all
    ``quantized`` with a range that saturates within every bound; a bound read by a float layer, or
    that the range could exceed, stays."""
    g = Graph(model)
    rename: dict[str, str] = {}
    for node in g.nodes:
        if not (node.op_type == "Min" and node.name.startswith(BOUND)):
            continue
        if any(r.name not in quantized for r in g.readers.get(node.output[0], [])) or node.output[0] in g.outputs:
            continue
        hi = ranges.get(node.output[0], (0.0, np.inf))[1]
        bound = g.const(node.input[1])
        if bound is None or hi > float(bound.min()) * (1 + 1e-5):
            log.warning("equalization bound %s kept: the int8 range %.4g exceeds its smallest bound", node.name, hi)
            continue
        rename[node.input[0]] = node.output[0]
    if not rename:
        return model
    out = ir.copy(model)
    drop = set(rename.values())
    kept = [n for n in out.graph.node if not (n.op_type == "Min" and n.output[0] in drop)]
    for n in kept:
        n.output[:] = [rename.get(o, o) for o in n.output]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    ir.drop_dead(out)
    return out


def _set(init: onnx.TensorProto, value: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
