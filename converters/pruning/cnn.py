"""Structured channel pruning of CNNs by dependency groups, with a least-squares refit.

A *group* is a set of channels that must go together. It starts at a Conv (``group=1``), the
*producer*, and holds every tensor that carries its output channels one-to-one until a layer
mixes them: channel-wise ops (activations, BatchNormalization, Mul/Add by a per-channel or
scalar constant, depthwise Conv, pooling) are sliced along the channel axis, and the
*consumers* (Conv, or Gemm/MatMul after global pooling + Flatten/Reshape) lose the matching
input channels. A Concat (axis 1) passes the channels on at an offset: everything after it
loses the slice ``offset + removed``, and the other Concat inputs keep their channels.
Channels are removed physically, so the pruned model has smaller initializers and fewer MACs.

With ``joint=True`` a group may hold several producers (DepGraph-style): an Add or Mul of two
activations - the residual chain ``y = x + f(x)`` of a MobileNetV2/EfficientNet stage, or the
squeeze-excitation gate ``x * sigmoid(Conv(relu(Conv(GlobalAveragePool(x)))))`` - joins every
tensor it reads into one group, so all its producers, per-channel constants and consumers lose
the same channel indices. A joint group is pruned whole or not at all; without ``joint`` such
groups are refused as today. The squeeze width of an SE block is kept (its consumers see one
row per image: too few to score and refit it).

Anything the walk does not understand makes the whole group *not prunable*, reported in
``PruneResult.notes``: a tensor that is a graph input or output, an op not handled, an
activation joined with a Concat output, a shared initializer.

Channel score: sum over every consumer of the group of ``||x_c||_2 * ||W[:, c]||_1``, where
``x_c`` is the activation the consumer actually reads (after BN/activations/depthwise), so a
channel that is zero there scores zero. Kept counts follow ``units_to_drop`` (multiples of 8
on wide groups). The refit solves ``min ||X_kept W' - X W||`` (ridge) per consumer on the
calibration activations (im2col for kxk Convs), keeping the original weights if it does not help.
When several groups are cut, a second pass refits each consumer on its input *in the pruned
model*, which carries the upstream pruning errors, to the unpruned output (as in He et al.,
"Channel Pruning for Accelerating Very Deep Neural Networks", 2017), so errors do not pile up
from layer to layer (EfficientNet-Lite0 at the same allocation: -0.67 instead of -2.0 points).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from converters.ir import Graph, attr, node_key
from converters.pruning.common import need_batches, Feeds, PruneResult, units_to_drop
from edge_sdk.errors import PruningError

__all__ = ["ChannelGroup", "ChannelPruner", "Consumer", "Slice", "find_groups", "prune_channels"]

log = logging.getLogger(__name__)

_MAX_ROWS = 20_000  # im2col rows used for the least-squares refit (sampled)
_ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh", "Identity")


class Slice(NamedTuple):
    """The group's channels are ``[offset, offset + channels)`` of axis ``axis`` (length ``width``)
    of initializer ``name``; for a Reshape shape constant, ``axis`` is the entry to shrink."""

    name: str
    axis: int
    offset: int
    width: int


@dataclass(frozen=True)
class Consumer:
    """A layer that mixes the group's channels: its ``weight`` loses input channels along ``axis``."""

    node: onnx.NodeProto
    tensor: str  # the activation it reads
    weight: str
    axis: int
    offset: int = 0  # where the group's channels start in ``tensor`` (after a Concat)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of one or more producer Convs (a joint group) and every slice that follows them."""

    producers: tuple[str, ...]
    channels: int
    slices: tuple[Slice, ...]  # initializers sliced with the kept channels
    consumers: tuple[Consumer, ...]
    shapes: tuple[Slice, ...] = ()  # Reshape shape constants whose entry ``axis`` shrinks
    couplings: tuple[str, ...] = ()  # the Add/Mul nodes that joined several producers

    @property
    def producer(self) -> str:
        return self.producers[0]


@dataclass(frozen=True)
class _At:
    """How a tensor carries the group: channels ``[offset, offset + group)`` of its ``width``."""

    state: str  # "spatial" | "pooled" (1x1) | "flat" ([N, C])
    offset: int
    width: int
    concat: bool = False  # past a Concat: the walk goes forward only


def _channels(g: Graph, tensor: str) -> int | None:
    shape = g.shapes.get(tensor)
    return shape[1] if shape is not None and len(shape) > 1 else None


def _state(g: Graph, tensor: str) -> str | None:
    """How an NCHW tensor carries channels: ``"flat"`` [N, C], ``"pooled"`` 1x1, else ``"spatial"``."""
    shape = g.shapes.get(tensor)
    if shape is None:
        return None
    if len(shape) == 2:
        return "flat"
    return "pooled" if len(shape) == 4 and shape[2:] == (1, 1) else "spatial"


@dataclass
class _Walk:
    """State of one group walk; handlers extend it or return a reason to refuse."""

    channels: int
    joint: bool
    graph: Graph
    at: dict[str, _At] = field(default_factory=dict)
    frontier: list[str] = field(default_factory=list)
    done: set[tuple[int, str]] = field(default_factory=set)  # (node id, tensor it was reached by)
    producers: list[onnx.NodeProto] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    slices: dict[tuple[str, int], Slice] = field(default_factory=dict)
    shapes: dict[tuple[str, int], Slice] = field(default_factory=dict)
    couplings: list[str] = field(default_factory=list)

    def push(self, tensor: str, at: _At, by: onnx.NodeProto | None = None) -> str | None:
        """Add ``tensor`` to the group (its state refined from the inferred shape); ``by`` is done with it."""
        if by is not None:
            self.done.add((id(by), tensor))
        at = replace(at, state=_state(self.graph, tensor) or at.state)
        old = self.at.get(tensor)
        if old is None:
            self.at[tensor] = at
            self.frontier.append(tensor)
        elif (old.offset, old.width) != (at.offset, at.width):
            return f"tensor {tensor!r} carries the channels at two different offsets"
        return None

    def slice(self, name: str, axis: int, at: _At, into: str = "slices") -> str | None:
        table = self.slices if into == "slices" else self.shapes
        new = Slice(name, axis, at.offset, at.width)
        if table.setdefault((name, axis), new) != new:
            return f"initializer {name!r} would be sliced at two different offsets"
        return None

    def slice_all(self, names: Sequence[str], axis: int, at: _At) -> str | None:
        return next((reason for name in names if (reason := self.slice(name, axis, at))), None)


# --- group walk: {op_type: handler(node, tensor, at, walk, graph) -> reason or None} ------------------
# ``tensor`` is the group tensor the node was reached by: one of its inputs, or (walking back from
# a joined tensor) its output.

_Handler = Callable[[onnx.NodeProto, str, _At, _Walk, Graph], "str | None"]


def _across(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, out_state: str | None = None) -> str | None:
    """The channels pass one-to-one between input 0 and output 0, in either direction."""
    if t == node.input[0]:
        return walk.push(node.output[0], replace(at, state=out_state or at.state), node)
    return walk.push(node.input[0], replace(at, state="spatial" if out_state else at.state), node)


def _one_to_one(node: onnx.NodeProto, t: str, g: Graph) -> str | None:
    if t not in (node.input[0], node.output[0]) or sum(1 for o in node.output if o) != 1 \
            or any(i and i not in g.constants for i in node.input[1:]):
        return f"{node.op_type} {node_key(node)!r} reads the channels as a parameter"
    return None


def _activation(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    return _one_to_one(node, t, g) or _across(node, t, at, walk)


def _batchnorm(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    if len(node.output) != 1 or len(node.input) != 5 or any(i not in g.inits for i in node.input[1:5]):
        return f"BatchNormalization {node_key(node)!r} is in training mode or has non-constant statistics"
    return _one_to_one(node, t, g) or walk.slice_all(node.input[1:5], 0, at) or _across(node, t, at, walk)


def _per_channel(node: onnx.NodeProto, const: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    init = g.inits.get(const)
    if init is None:  # a Constant node: scalars only
        return None if g.shapes.get(const) == () else f"{node.op_type} {node_key(node)!r}: constant is not an initializer"
    dims = list(init.dims)
    if math.prod(dims) == 1:
        return None
    axis = len(dims) - (1 if at.state == "flat" else 3)
    if axis < 0 or dims[axis] != at.width or math.prod(dims) != at.width:
        return f"{node.op_type} {node_key(node)!r} broadcasts a constant of shape {dims} over the channels"
    return walk.slice(const, axis, at)


def _join(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    """Add/Mul of two activations: every input and the output carry the same channels."""
    joined = [i for i in node.input if i not in walk.at]
    if at.concat or (joined and not walk.joint):
        kind = "residual-coupled" if node.op_type == "Add" else "non-constant Mul (squeeze-excitation?)"
        where = " after a Concat" if at.concat else ""
        return f"{kind}: {node.op_type} {node_key(node)!r} joins it with another activation{where}"
    if joined:
        walk.couplings.append(node_key(node))
    for name in (*node.input, node.output[0]):
        reason = walk.push(name, _At(at.state, 0, walk.channels), node)
        if reason:
            return reason
    return None


def _elementwise(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    if len(node.input) != 2:
        return f"{node.op_type} {node_key(node)!r} is not a binary op"
    const = [i for i in node.input if i in g.constants]
    if not const:
        return _join(node, t, at, walk, g)
    x = node.input[1] if node.input[0] == const[0] else node.input[0]
    return _per_channel(node, const[0], at, walk, g) or walk.push(node.output[0] if t == x else x, at, node)


def _conv(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    weight = g.inits.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or len(weight.dims) != 4 or t not in (node.input[0], node.output[0]):
        return f"Conv {node_key(node)!r} has a non-constant or non-2-D weight"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in g.inits:
        return f"Conv {node_key(node)!r} has a non-constant bias"
    group = int(attr(node, "group", 1))
    outputs = [weight.name] + ([bias] if bias else [])  # sliced along axis 0 with the output channels
    if group == 1 and t == node.output[0]:
        if int(weight.dims[0]) != at.width:
            return f"Conv {node_key(node)!r} has {weight.dims[0]} output channels, expected {at.width}"
        walk.producers.append(node)
        return walk.slice_all(outputs, 0, at)
    if group == 1:
        walk.consumers.append(Consumer(node, t, weight.name, 1, at.offset))
        return walk.slice(weight.name, 1, at)
    if group == at.width and list(weight.dims[:2]) == [at.width, 1]:
        return walk.slice_all(outputs, 0, at) or _across(node, t, at, walk)
    return f"grouped Conv {node_key(node)!r} (group={group}) is not handled"


def _global_pool(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    return _one_to_one(node, t, g) or _across(node, t, at, walk, out_state="pooled")


def _pool(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    return _one_to_one(node, t, g) or _across(node, t, at, walk)


def _flatten(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    if t != node.input[0] or at.state != "pooled" or int(attr(node, "axis", 1)) != 1:
        return f"Flatten {node_key(node)!r} mixes channels with spatial positions"
    return walk.push(node.output[0], replace(at, state="flat"), node)


def _reshape(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    shape = g.inits.get(node.input[1]) if len(node.input) > 1 else None
    target = numpy_helper.to_array(shape).tolist() if shape is not None else None
    if t != node.input[0] or at.state != "pooled" or shape is None or target is None or len(target) != 2 \
            or target[1] not in (at.width, -1) or target == [-1, -1]:
        return f"Reshape {node_key(node)!r} is not a constant [N, C] flattening of pooled channels"
    reason = walk.slice(shape.name, 1, at, into="shapes") if target[1] == at.width else None
    return reason or walk.push(node.output[0], replace(at, state="flat"), node)


def _dense(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    weight = g.inits.get(node.input[1])
    if at.state != "flat" or node.input[0] != t or weight is None or len(weight.dims) != 2 \
            or int(attr(node, "transA", 0)) != 0:
        return f"{node.op_type} {node_key(node)!r} does not read the pooled channels as its input rows"
    axis = 1 if node.op_type == "Gemm" and int(attr(node, "transB", 0)) == 1 else 0
    walk.consumers.append(Consumer(node, t, weight.name, axis, at.offset))
    return walk.slice(weight.name, axis, at)


def _concat(node: onnx.NodeProto, t: str, at: _At, walk: _Walk, g: Graph) -> str | None:
    if t == node.output[0] or list(node.input).count(t) != 1:
        return f"Concat {node_key(node)!r} joins the channels with themselves or with a coupled activation"
    rank = len(g.shapes.get(t, ())) or 4
    axis = int(attr(node, "axis", 1))
    if (axis + rank if axis < 0 else axis) != 1:
        return f"Concat {node_key(node)!r} joins along axis {axis}, not the channels"
    widths = [at.width if i == t else _channels(g, i) for i in node.input]
    if any(w is None for w in widths):
        return f"Concat {node_key(node)!r}: the channel counts of its inputs are unknown"
    before = sum(w or 0 for w in widths[:list(node.input).index(t)])
    return walk.push(node.output[0], _At(at.state, at.offset + before, sum(w or 0 for w in widths), concat=True), node)


_HANDLERS: dict[str, _Handler] = {
    **{op: _activation for op in _ACTIVATIONS},
    "Mul": _elementwise, "Add": _elementwise,
    "BatchNormalization": _batchnorm,
    "Conv": _conv,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool,
    "AveragePool": _pool, "MaxPool": _pool,
    "Flatten": _flatten, "Reshape": _reshape,
    "Gemm": _dense, "MatMul": _dense,
    "Concat": _concat,
}


def _visit(tensor: str, walk: _Walk, g: Graph) -> str | None:
    at = walk.at[tensor]
    if tensor in g.outputs:
        return f"tensor {tensor!r} is a graph output"
    if _channels(g, tensor) not in (None, at.width):
        return f"tensor {tensor!r} has {_channels(g, tensor)} channels, expected {at.width}"
    writer = [] if at.concat else [g.writers.get(tensor)]
    if writer == [None]:
        return f"tensor {tensor!r} is a graph input"
    for node in [*writer, *g.readers.get(tensor, [])]:
        if node is None or (id(node), tensor) in walk.done:
            continue
        walk.done.add((id(node), tensor))
        handler = _HANDLERS.get(node.op_type)
        reason = (f"{node.op_type} {node_key(node)!r} is not handled" if handler is None
                  else handler(node, tensor, at, walk, g))
        if reason:
            return reason
    return None


def _gates(tensor: str, g: Graph) -> bool:
    """Whether ``tensor`` reaches, through activations, a Mul by another activation (an SE gate)."""
    for _ in range(4):
        readers = g.readers.get(tensor, [])
        if len(readers) != 1:
            return False
        node = readers[0]
        if node.op_type == "Mul":
            return not any(i in g.constants for i in node.input)
        if node.op_type not in _ACTIVATIONS:
            return False
        tensor = node.output[0]
    return False


def _walk(producer: onnx.NodeProto, g: Graph, joint: bool) -> tuple[ChannelGroup | str, list[str]]:
    """The group of ``producer`` (or why it is refused) and the producers it reached."""
    channels = int(g.inits[producer.input[1]].dims[0])
    walk = _Walk(channels, joint, g)
    reason = walk.push(producer.output[0], _At("spatial", 0, channels))
    while walk.frontier and not reason:
        reason = _visit(walk.frontier.pop(), walk, g)
    names = list(dict.fromkeys(node_key(p) for p in [producer, *walk.producers]))
    if reason:
        return reason, names
    if not walk.consumers:
        return "no Conv/Gemm/MatMul reads its channels", names
    for name, _ in [*walk.slices, *walk.shapes]:
        if len(g.readers.get(name, [])) != 1:
            return f"initializer {name!r} is shared by several nodes", names
    if len(walk.producers) == 1 and _state(g, producer.input[0]) == "pooled" \
            and any(_gates(c.node.output[0], g) for c in walk.consumers):
        return "squeeze-excitation bottleneck: its width is kept", names
    group = ChannelGroup(tuple(names), channels, tuple(walk.slices.values()), tuple(walk.consumers),
                         tuple(walk.shapes.values()), tuple(walk.couplings))
    return group, names


def find_groups(model: onnx.ModelProto, *, joint: bool = False) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """Prunable channel groups, and ``(producer, reason)`` for each Conv whose channels cannot be pruned.

    With ``joint``, producers whose channels meet at an Add or Mul of two activations form one group.
    """
    g = Graph(model)
    groups: list[ChannelGroup] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for node in g.nodes:
        if node.op_type != "Conv" or int(attr(node, "group", 1)) != 1 or node_key(node) in seen:
            continue
        weight = g.inits.get(node.input[1])
        if weight is None or len(weight.dims) != 4:
            refused.append((node_key(node), "its weight is not a constant 2-D Conv kernel"))
            continue
        found, producers = _walk(node, g, joint)
        seen.update(producers)
        if isinstance(found, str):
            refused += [(p, found) for p in producers]
        else:
            groups.append(found)
    return groups, refused


# --- activations, im2col and the per-consumer least squares -----------------------------------------

def _collect(model: onnx.ModelProto, batches: Sequence[Feeds], names: set[str]) -> dict[str, np.ndarray]:
    """The tensors ``names`` on every batch, concatenated along the batch axis (onnxruntime CPU)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for _, values in ir.probe(model, batches, sorted(names), error=PruningError):
        for n in names:
            parts[n].append(np.asarray(values[n], dtype=np.float64))
    return {n: np.concatenate(v, axis=0) for n, v in parts.items()}


def _weight_matrix(w: np.ndarray, c: Consumer) -> np.ndarray:
    """``[C*k, O]``: rows follow ``_patches`` columns (channel-major)."""
    if c.node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if c.axis == 1 else w


def _from_matrix(m: np.ndarray, c: Consumer, shape: tuple[int, ...]) -> np.ndarray:
    if c.node.op_type == "Conv":
        return m.T.reshape(shape)
    return m.T if c.axis == 1 else m


def _patches(x: np.ndarray, c: Consumer, kernel: tuple[int, ...]) -> np.ndarray | None:
    """im2col of ``x`` for a Conv consumer (rows: output positions), or ``x`` itself for Gemm/MatMul."""
    if c.node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
    if attr(c.node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kh, kw = kernel
    sh, sw = attr(c.node, "strides", [1, 1])
    dh, dw = attr(c.node, "dilations", [1, 1])
    top, left, bottom, right = attr(c.node, "pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((x.shape[0], x.shape[1], kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(-1, x.shape[1] * kh * kw)


@dataclass
class _Fit:
    """Squared errors of one consumer, and its refitted weight (already sliced) if the refit helped."""

    target: float = 0.0
    before: float = 0.0
    after: float = 0.0
    weight: np.ndarray | None = None
    note: str | None = None


def _refit(x: np.ndarray, w: np.ndarray, c: Consumer, keep: np.ndarray, refit: bool) -> _Fit:
    """Reconstruction of ``X W`` from the kept input channels ``keep``: plain slicing vs least squares."""
    per = int(np.prod(w.shape[2:])) if c.node.op_type == "Conv" else 1
    p = _patches(x, c, tuple(w.shape[2:]))
    if p is None:
        return _Fit(note=f"{node_key(c.node)}: auto_pad Conv, reconstruction error and refit skipped")
    if p.shape[0] > _MAX_ROWS:
        p = p[np.random.default_rng(0).choice(p.shape[0], _MAX_ROWS, replace=False)]
    m = _weight_matrix(w.astype(np.float64), c)
    cols = (keep[:, None] * per + np.arange(per)).ravel()
    y = p @ m
    fit = _Fit(target=float(np.sum(y * y)), before=float(np.sum((p[:, cols] @ m[cols] - y) ** 2)))
    fit.after = fit.before
    if not refit or fit.before <= 1e-12 * max(fit.target, 1e-30):
        return fit
    if p.shape[0] < 2 * len(cols):
        fit.note = f"{node_key(c.node)}: {p.shape[0]} calibration rows for {len(cols)} unknowns, refit skipped"
        return fit
    solved = _ridge(p[:, cols], y)
    after = float(np.sum((p[:, cols] @ solved - y) ** 2))
    if after < fit.before:
        fit.after = after
        shape = list(w.shape)
        shape[c.axis] = len(keep)
        fit.weight = _from_matrix(solved, c, tuple(shape)).astype(w.dtype)
    return fit


RIDGE = 1e-3


def _ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin ||x w - y||^2 + lam ||w||^2`` with ``lam`` = ``RIDGE`` times the mean squared column norm of
    ``x``: a few calibration images give few rows per unknown on late, low-resolution layers, and
    plain least squares then fits their noise."""
    gram = x.T @ x
    lam = RIDGE * float(np.trace(gram)) / max(gram.shape[0], 1)
    gram[np.diag_indices_from(gram)] += max(lam, 1e-12)
    return np.linalg.solve(gram, x.T @ y)


# --- the public entry point ---------------------------------------------------------------------------

def _scores(group: ChannelGroup, acts: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> np.ndarray:
    total = np.zeros(group.channels)
    for c in group.consumers:
        span = slice(c.offset, c.offset + group.channels)
        x = acts[c.tensor]
        axis = 1 if c.node.op_type == "Conv" else x.ndim - 1
        norm = np.sqrt(np.sum(x * x, axis=tuple(a for a in range(x.ndim) if a != axis)))
        w = np.abs(weights[c.weight])
        total += norm[span] * np.sum(w, axis=tuple(a for a in range(w.ndim) if a != c.axis))[span]
    return total


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= ratio < 1.0):
        raise PruningError(f"ratio={ratio!r} is not a fraction of channels to remove; expected 0 <= ratio < 1",
                           hint="pass e.g. ratio=0.25 to remove a quarter of each group's channels")


def _check_batches(batches: Sequence[Feeds]) -> None:
    need_batches(batches, "prune_channels")


class ChannelPruner:
    """The groups of one model with their calibration activations and scores, measured once, so that
    many pruning plans (per-group ratios) can be built cheaply; first-pass refits are cached per
    kept set. ``sequential`` turns the second, pruned-input refit pass on (when several groups are cut)."""

    def __init__(self, model: onnx.ModelProto, batches: Sequence[Feeds], *, refit: bool = True,
                 joint: bool = False, sequential: bool = True) -> None:
        _check_batches(batches)
        self.model, self.refit, self.batches, self.sequential = model, refit, batches, sequential and refit
        self.groups, self.refused = find_groups(model, joint=joint)
        self.weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.consumers = {(node_key(c.node), c.weight): c for g in self.groups for c in g.consumers}
        self.acts = _collect(model, batches, {c.tensor for c in self.consumers.values()}) if self.groups else {}
        self.order = [np.argsort(_scores(g, self.acts, self.weights), kind="stable") for g in self.groups]
        self._fits: dict[tuple[tuple[str, str], bytes], _Fit] = {}

    @property
    def units(self) -> list[str]:
        """One name per prunable group (its first producer), the keys of ``prune``'s ``ratios``."""
        return [g.producer for g in self.groups]

    def _fit(self, key: tuple[str, str], c: Consumer, kept: np.ndarray) -> _Fit:
        width = self.weights[c.weight].shape[c.axis]
        if len(kept) == width:
            return _Fit()
        cache = (key, kept.tobytes())
        if cache not in self._fits:
            self._fits[cache] = _refit(self.acts[c.tensor], self.weights[c.weight], c, kept, self.refit)
        return self._fits[cache]

    def prune(self, ratio: float, ratios: Mapping[str, float] | None = None,
              bypass: Sequence[str] = ()) -> PruneResult:
        """Remove the lowest-scoring channels of every group: ``ratios[producer]`` where given, else ``ratio``;
        also bypass the residual blocks ending at the Adds ``bypass`` (``cnn_blocks``). The second refit
        pass then also sees the bypassed blocks, and refits every consumer after them."""
        ratios = dict(ratios or {})
        for r in (ratio, *ratios.values()):
            _check_ratio(r)
        unknown = sorted(set(ratios) - set(self.units))
        if unknown:
            raise PruningError(f"ratios name {unknown}, which are not prunable channel groups",
                               hint=f"prunable groups (their first producer): {', '.join(self.units)}")
        groups, weights = self.groups, self.weights
        notes = [f"{producer}: not prunable: {reason}" for producer, reason in self.refused]
        keeps = [np.sort(order[units_to_drop(ratios.get(g.producer, ratio), g.channels):])
                 for g, order in zip(groups, self.order)]
        cut: dict[tuple[str, int], set[int]] = {}  # (initializer, axis) -> removed indices, over all groups
        for group, keep in zip(groups, keeps):
            gone = np.setdiff1d(np.arange(group.channels), keep)
            for s in (*group.slices, *group.shapes):
                cut.setdefault((s.name, s.axis), set()).update(int(s.offset + i) for i in gone)
        fits = {key: self._fit(key, c, _kept(weights[c.weight].shape[c.axis], cut.get((c.weight, c.axis), set())))
                for key, c in self.consumers.items()}
        notes += [f.note for f in fits.values() if f.note]
        fitted = {c.weight: (f.weight, c.axis) for key, c in self.consumers.items()
                  if (f := fits[key]).weight is not None}
        new = self._sliced(cut, fitted)
        pruned = self._build(new, bypass)
        if self.sequential and (bypass or sum(len(k) < g.channels for g, k in zip(groups, keeps)) > 1):
            fitted.update(self._refit_on(pruned, cut, fitted, everything=bool(bypass)))
            new = self._sliced(cut, fitted)
            pruned = self._build(new, bypass)
        layers = tuple(_layer(g, keep, [fits[(node_key(c.node), c.weight)] for c in g.consumers], weights, new)
                       for g, keep in zip(groups, keeps))
        layers += tuple({"node": add, "op_type": "Add", "removed": True} for add in bypass)
        log.info("pruned %d of %d channel groups (%d joint), bypassed %d blocks, refused %d producers",
                 sum(len(k) < g.channels for g, k in zip(groups, keeps)), len(groups),
                 sum(len(g.producers) > 1 for g in groups), len(bypass), len(self.refused))
        return PruneResult(model=pruned, method="channels", layers=layers, notes=tuple(notes))


    def _sliced(self, cut: dict[tuple[str, int], set[int]],
                fitted: dict[str, tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
        """Every changed initializer: sliced weights (refitted ones as given) and shrunk Reshape shapes."""
        reshaped = {(s.name, s.axis) for g in self.groups for s in g.shapes}
        new = _new_weights(self.weights, {k: v for k, v in cut.items() if k not in reshaped}, fitted)
        for name, index in reshaped:
            shape = new.get(name, self.weights[name]).copy()
            shape[index] -= len(cut.get((name, index), ()))
            new[name] = shape
        return new

    def _build(self, new: dict[str, np.ndarray], bypass: Sequence[str]) -> onnx.ModelProto:
        pruned = _rebuild(self.model, new)
        if not bypass:
            return pruned
        from converters.pruning.cnn_blocks import bypass_blocks

        return bypass_blocks(pruned, bypass)

    def _refit_on(self, pruned: onnx.ModelProto, cut: dict[tuple[str, int], set[int]],
                  fitted: dict[str, tuple[np.ndarray, int]], everything: bool = False,
                  ) -> dict[str, tuple[np.ndarray, int]]:
        """Second pass: refit every cut consumer (with ``everything``, every consumer still in the graph)
        on its input *in the pruned model*, which carries the upstream pruning errors, to the unpruned
        model's output, where that lowers the error."""
        present = {node_key(n) for n in pruned.graph.node}
        todo = {key: c for key, c in self.consumers.items()
                if key[0] in present and (everything or cut.get((c.weight, c.axis)))}
        xs = _collect(pruned, self.batches, {c.tensor for c in todo.values()})
        better: dict[str, tuple[np.ndarray, int]] = {}
        for key, c in todo.items():
            w = self.weights[c.weight]
            kept = _kept(w.shape[c.axis], cut.get((c.weight, c.axis), set()))
            first = fitted[c.weight][0] if c.weight in fitted else np.take(w, kept, axis=c.axis)
            solved = _refit_to(xs[c.tensor], self.acts[c.tensor], w, first, c, kept)
            if solved is not None:
                better[c.weight] = (solved, c.axis)
        return better


def _refit_to(x_new: np.ndarray, x_old: np.ndarray, w: np.ndarray, first: np.ndarray, c: Consumer,
              kept: np.ndarray) -> np.ndarray | None:
    """``W'`` minimising ``||P(x_new) W' - P(x_old) W||`` (ridge), or None when ``first`` does as well."""
    kernel = tuple(w.shape[2:])
    p_new, p_old = _patches(x_new, c, kernel), _patches(x_old, c, kernel)
    if p_new is None or p_old is None or p_new.shape[0] != p_old.shape[0]:
        return None
    if p_new.shape[0] > _MAX_ROWS:
        rows = np.random.default_rng(0).choice(p_new.shape[0], _MAX_ROWS, replace=False)
        p_new, p_old = p_new[rows], p_old[rows]
    if p_new.shape[0] < 2 * p_new.shape[1]:
        return None
    y = p_old @ _weight_matrix(w.astype(np.float64), c)
    solved = _ridge(p_new, y)
    shape = list(w.shape)
    shape[c.axis] = len(kept)
    start = float(np.sum((p_new @ _weight_matrix(first.astype(np.float64), c) - y) ** 2))
    if float(np.sum((p_new @ solved - y) ** 2)) >= start:
        return None
    return _from_matrix(solved, c, tuple(shape)).astype(w.dtype)


def prune_channels(model: onnx.ModelProto, ratio: float, batches: Sequence[Feeds], *,
                   refit: bool = True, joint: bool = False, ratios: Mapping[str, float] | None = None) -> PruneResult:
    """Remove the lowest-scoring ``round(ratio * C)`` channels of every prunable group (at least one kept);
    ``ratios`` overrides the ratio per group, keyed by the group's first producer.

    With ``joint``, residual chains and squeeze-excitation gates are pruned as joint groups
    (the same indices in every producer and consumer); without it they are left intact.
    """
    _check_ratio(ratio)  # before the activations are collected
    return ChannelPruner(model, batches, refit=refit, joint=joint).prune(ratio, ratios)


def _kept(width: int, removed: set[int]) -> np.ndarray:
    return np.array([i for i in range(width) if i not in removed], dtype=np.int64)


def _new_weights(weights: dict[str, np.ndarray], cut: dict[tuple[str, int], set[int]],
                 fitted: dict[str, tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    """Every sliced initializer without its removed indices (a refitted consumer's axis is already done)."""
    axes: dict[str, dict[int, set[int]]] = {name: {} for name in fitted}
    for (name, axis), removed in cut.items():
        axes.setdefault(name, {})[axis] = removed
    new: dict[str, np.ndarray] = {}
    for name, by_axis in axes.items():
        w = weights[name]
        if name in fitted:
            w, done = fitted[name]
            by_axis = {a: r for a, r in by_axis.items() if a != done}
        for axis, removed in by_axis.items():
            w = np.take(w, _kept(w.shape[axis], removed), axis=axis)
        new[name] = w
    return new


def _rebuild(model: onnx.ModelProto, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = ir.copy(model)
    old = {i.name: list(i.dims) for i in out.graph.initializer}
    for node in out.graph.node:  # depthwise Convs: ``group`` follows the kept channel count
        group = int(attr(node, "group", 1))
        if node.op_type == "Conv" and group > 1 and node.input[1] in new and group == old[node.input[1]][0]:
            for a in node.attribute:
                if a.name == "group":
                    a.i = int(new[node.input[1]].shape[0])
    for init in out.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[init.name]), init.name))
    ir.forget_shapes(out, [v.name for v in out.graph.value_info])  # stale; inference recomputes them
    return ir.check(out, "channel-pruned")


def _rel(err: float, target: float) -> float:
    return math.sqrt(err / target) if target > 0 else 0.0


def _layer(g: ChannelGroup, keep: np.ndarray, fits: list[_Fit], before: dict[str, np.ndarray],
           after: dict[str, np.ndarray]) -> dict[str, Any]:
    names = dict.fromkeys(s.name for s in g.slices)
    target = sum(f.target for f in fits)
    return {
        "producer": g.producer,
        "producers": g.producers,
        "couplings": g.couplings,
        "consumers": tuple(node_key(c.node) for c in g.consumers),
        "channels_before": g.channels,
        "channels_after": int(len(keep)),
        "kept": tuple(int(k) for k in keep),
        "params_before": sum(int(before[n].size) for n in names),
        "params_after": sum(int(after[n].size) for n in names),
        "recon_error_before": _rel(sum(f.before for f in fits), target),
        "recon_error_after": _rel(sum(f.after for f in fits), target),
        "refit": any(f.weight is not None for f in fits),
    }
