"""Structured channel pruning of CNNs by dependency groups, with a least-squares refit.

A *group* starts at a Conv (``group=1``) and holds every tensor that carries its output
channels one-to-one until a layer mixes them: channel-wise ops (activations,
BatchNormalization, Mul/Add by a per-channel or scalar constant, depthwise Conv) are sliced
along the channel axis, and the consumers (Conv, or Gemm/MatMul after GlobalAveragePool +
Flatten) lose the matching input channels. Channels are removed physically, so the pruned
model has smaller initializers and fewer MACs.

Anything the walk does not understand makes the group *not prunable*, reported in
``PruneResult.notes``: a residual Add of two activations ("residual-coupled"), Concat, a Mul
by a non-constant tensor (squeeze-excitation), a graph output, a shared initializer.

Channel score: sum over consumers of ``||x_c||_2 * ||W[:, c]||_1``, where ``x_c`` is the
activation the consumer actually reads (after BN/activations/depthwise), so a channel that is
zero there scores zero. The refit solves ``min ||X_kept W' - X W||`` per consumer on the
calibration activations (im2col for kxk Convs), keeping the original weights if it does not help.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.pruning.common import Feeds, PruneResult, probe_batches, units_to_drop
from edge_sdk.errors import InternalError, PruningError

__all__ = ["ChannelGroup", "Consumer", "find_groups", "prune_channels"]

log = logging.getLogger(__name__)

_MAX_ROWS = 20_000  # im2col rows used for the least-squares refit (sampled)
_ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh")


@dataclass(frozen=True)
class Consumer:
    """A layer that mixes the group's channels: its ``weight`` loses input channels along ``axis``."""

    node: onnx.NodeProto
    tensor: str  # the activation it reads
    weight: str
    axis: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of one producer Conv and every initializer slice that follows them."""

    producer: str
    channels: int
    slices: tuple[tuple[str, int], ...]  # (initializer, axis), sliced with the kept channels
    consumers: tuple[Consumer, ...]
    depthwise: tuple[str, ...] = ()  # Conv nodes whose ``group`` becomes the kept channel count


@dataclass
class _Walk:
    """State of one group walk; handlers extend it or return a reason to refuse."""

    channels: int
    slices: list[tuple[str, int]] = field(default_factory=list)
    frontier: list[tuple[str, str]] = field(default_factory=list)  # (tensor, "spatial"|"pooled"|"flat")
    consumers: list[Consumer] = field(default_factory=list)
    depthwise: list[onnx.NodeProto] = field(default_factory=list)


@dataclass(frozen=True)
class _Graph:
    inits: dict[str, onnx.TensorProto]
    readers: dict[str, list[onnx.NodeProto]]
    outputs: frozenset[str]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


# --- group walk: {op_type: handler(node, tensor, state, walk, graph) -> reason or None} -------------

_Handler = Callable[[onnx.NodeProto, str, str, _Walk, _Graph], "str | None"]


def _activation(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    if node.input[0] != t or any(i and i not in g.inits for i in node.input[1:]):
        return f"{node.op_type} {_name(node)!r} reads the channels as a parameter"
    walk.frontier.append((node.output[0], state))
    return None


def _constant_op(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    other = node.input[1] if node.input[0] == t else node.input[0]
    if other == t or other not in g.inits:
        kind = "residual-coupled" if node.op_type == "Add" else "non-constant Mul (squeeze-excitation?)"
        return f"{kind}: {node.op_type} {_name(node)!r} joins it with another activation"
    dims = list(g.inits[other].dims)
    if math.prod(dims) != 1:
        axis = len(dims) - 3
        if state == "flat" or axis < 0 or dims[axis] != walk.channels or math.prod(dims) != walk.channels:
            return f"{node.op_type} {_name(node)!r} broadcasts a constant of shape {dims} over the channels"
        walk.slices.append((other, axis))
    walk.frontier.append((node.output[0], state))
    return None


def _batchnorm(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    if node.input[0] != t or len(node.output) != 1 or any(i not in g.inits for i in node.input[1:5]):
        return f"BatchNormalization {_name(node)!r} is in training mode or has non-constant statistics"
    walk.slices += [(i, 0) for i in node.input[1:5]]
    walk.frontier.append((node.output[0], state))
    return None


def _conv(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    weight = g.inits.get(node.input[1])
    if node.input[0] != t or weight is None or len(weight.dims) != 4:
        return f"Conv {_name(node)!r} has a non-constant or non-2-D weight"
    group = int(_attr(node, "group", 1))
    if group == 1:
        walk.consumers.append(Consumer(node, t, weight.name, 1))
        walk.slices.append((weight.name, 1))
        return None
    if group == walk.channels and list(weight.dims[:2]) == [walk.channels, 1]:
        walk.slices.append((weight.name, 0))
        walk.depthwise.append(node)
        if len(node.input) > 2 and node.input[2]:
            walk.slices.append((node.input[2], 0))
        walk.frontier.append((node.output[0], state))
        return None
    return f"grouped Conv {_name(node)!r} (group={group}) is not handled"


def _pool(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    walk.frontier.append((node.output[0], "pooled"))
    return None


def _flatten(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    if state != "pooled" or int(_attr(node, "axis", 1)) != 1:
        return f"Flatten {_name(node)!r} mixes channels with spatial positions"
    walk.frontier.append((node.output[0], "flat"))
    return None


def _dense(node: onnx.NodeProto, t: str, state: str, walk: _Walk, g: _Graph) -> str | None:
    weight = g.inits.get(node.input[1])
    if state != "flat" or node.input[0] != t or weight is None or len(weight.dims) != 2 \
            or int(_attr(node, "transA", 0)) != 0:
        return f"{node.op_type} {_name(node)!r} does not read the pooled channels as its input rows"
    axis = 1 if node.op_type == "Gemm" and int(_attr(node, "transB", 0)) == 1 else 0
    walk.consumers.append(Consumer(node, t, weight.name, axis))
    walk.slices.append((weight.name, axis))
    return None


_HANDLERS: dict[str, _Handler] = {
    **{op: _activation for op in _ACTIVATIONS},
    "Mul": _constant_op, "Add": _constant_op,
    "BatchNormalization": _batchnorm,
    "Conv": _conv,
    "GlobalAveragePool": _pool,
    "Flatten": _flatten,
    "Gemm": _dense, "MatMul": _dense,
}


def _walk(producer: onnx.NodeProto, g: _Graph) -> ChannelGroup | str:
    weight = g.inits[producer.input[1]]
    walk = _Walk(channels=int(weight.dims[0]), slices=[(weight.name, 0)], frontier=[(producer.output[0], "spatial")])
    if len(producer.input) > 2 and producer.input[2]:
        if producer.input[2] not in g.inits:
            return "its bias is not a constant"
        walk.slices.append((producer.input[2], 0))
    seen: set[str] = set()
    while walk.frontier:
        tensor, state = walk.frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in g.outputs:
            return f"tensor {tensor!r} is a graph output"
        for node in g.readers.get(tensor, []):
            handler = _HANDLERS.get(node.op_type)
            reason = (f"{node.op_type} {_name(node)!r} is not handled" if handler is None
                      else handler(node, tensor, state, walk, g))
            if reason:
                return reason
    if not walk.consumers:
        return "no Conv/Gemm/MatMul reads its channels"
    for name, _ in walk.slices:
        if len(g.readers.get(name, [])) != 1:
            return f"initializer {name!r} is shared by several nodes"
    if any(not n.name for n in walk.depthwise):
        return "a depthwise Conv in its path has no name"
    return ChannelGroup(_name(producer), walk.channels, tuple(walk.slices), tuple(walk.consumers),
                        tuple(n.name for n in walk.depthwise))


def find_groups(model: onnx.ModelProto) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """Prunable channel groups, and ``(producer, reason)`` for each Conv whose channels cannot be pruned."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    g = _Graph({i.name: i for i in model.graph.initializer}, readers, frozenset(o.name for o in model.graph.output))
    groups: list[ChannelGroup] = []
    refused: list[tuple[str, str]] = []
    for node in model.graph.node:
        if node.op_type != "Conv" or int(_attr(node, "group", 1)) != 1:
            continue
        weight = g.inits.get(node.input[1])
        if weight is None or len(weight.dims) != 4:
            refused.append((_name(node), "its weight is not a constant 2-D Conv kernel"))
            continue
        found = _walk(node, g)
        if isinstance(found, str):
            refused.append((_name(node), found))
        else:
            groups.append(found)
    return groups, refused


# --- activations, im2col and the per-consumer least squares -----------------------------------------

def _collect(model: onnx.ModelProto, batches: Sequence[Feeds], names: set[str]) -> dict[str, np.ndarray]:
    """The tensors ``names`` on every batch, concatenated along the batch axis (onnxruntime CPU)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for _, values in probe_batches(model, batches, sorted(names)):
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
    if _attr(c.node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kh, kw = kernel
    sh, sw = _attr(c.node, "strides", [1, 1])
    dh, dw = _attr(c.node, "dilations", [1, 1])
    top, left, bottom, right = _attr(c.node, "pads", [0, 0, 0, 0])
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
    """Reconstruction of ``X W`` from the kept channels: plain slicing vs least squares."""
    per = int(np.prod(w.shape[2:])) if c.node.op_type == "Conv" else 1
    p = _patches(x, c, tuple(w.shape[2:]))
    if p is None:
        return _Fit(note=f"{_name(c.node)}: auto_pad Conv, reconstruction error and refit skipped")
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
        fit.note = f"{_name(c.node)}: {p.shape[0]} calibration rows for {len(cols)} unknowns, refit skipped"
        return fit
    solved, *_ = np.linalg.lstsq(p[:, cols], y, rcond=None)
    after = float(np.sum((p[:, cols] @ solved - y) ** 2))
    if after < fit.before:
        fit.after = after
        shape = list(w.shape)
        shape[c.axis] = len(keep)
        fit.weight = _from_matrix(solved, c, tuple(shape)).astype(w.dtype)
    return fit


# --- the public entry point ---------------------------------------------------------------------------

def _scores(group: ChannelGroup, acts: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> np.ndarray:
    total = np.zeros(group.channels)
    for c in group.consumers:
        x = acts[c.tensor]
        axis = 1 if c.node.op_type == "Conv" else x.ndim - 1
        norm = np.sqrt(np.sum(x * x, axis=tuple(a for a in range(x.ndim) if a != axis)))
        w = np.abs(weights[c.weight])
        total += norm * np.sum(w, axis=tuple(a for a in range(w.ndim) if a != c.axis))
    return total


def _check_args(ratio: float, batches: Sequence[Feeds]) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= ratio < 1.0):
        raise PruningError(f"ratio={ratio!r} is not a fraction of channels to remove; expected 0 <= ratio < 1",
                           hint="pass e.g. ratio=0.25 to remove a quarter of each group's channels")
    if not batches:
        raise PruningError("prune_channels got no calibration batches; expected at least one feed dict",
                           hint="pass batches=[{input_name: array}, ...] from your calibration data")


def prune_channels(model: onnx.ModelProto, ratio: float, batches: Sequence[Feeds], *,
                   refit: bool = True) -> PruneResult:
    """Remove the lowest-scoring ``round(ratio * C)`` channels of every prunable group (at least one kept)."""
    _check_args(ratio, batches)
    groups, refused = find_groups(model)
    notes = [f"{producer}: not prunable: {reason}" for producer, reason in refused]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    acts = _collect(model, batches, {c.tensor for g in groups for c in g.consumers}) if groups else {}
    slices: dict[str, dict[int, np.ndarray]] = {}
    groups_of: dict[str, int] = {}
    refitted: dict[str, tuple[np.ndarray, int]] = {}
    plans = []
    for group in groups:
        drop = units_to_drop(ratio, group.channels)
        keep = np.sort(np.argsort(_scores(group, acts, weights), kind="stable")[drop:])
        fits = [_refit(acts[c.tensor], weights[c.weight], c, keep, refit) for c in group.consumers]
        for c, fit in zip(group.consumers, fits):
            if fit.weight is not None:
                refitted[c.weight] = (fit.weight, c.axis)
        notes += [f.note for f in fits if f.note]
        for name, axis in group.slices:
            slices.setdefault(name, {})[axis] = keep
        groups_of.update({name: len(keep) for name in group.depthwise})
        plans.append((group, keep, fits))
    new = {name: _sliced(weights[name], axes, refitted.get(name)) for name, axes in slices.items()}
    pruned = _rebuild(model, new, groups_of)
    layers = tuple(_layer(g, keep, fits, weights, new) for g, keep, fits in plans)
    log.info("pruned %d channel groups, refused %d", len(groups), len(refused))
    return PruneResult(model=pruned, method="channels", layers=layers, notes=tuple(notes))


def _sliced(w: np.ndarray, axes: dict[int, np.ndarray], fitted: tuple[np.ndarray, int] | None) -> np.ndarray:
    if fitted is not None:
        w, done = fitted
        axes = {a: k for a, k in axes.items() if a != done}
    for axis, keep in axes.items():
        w = np.take(w, keep, axis=axis)
    return w


def _rebuild(model: onnx.ModelProto, new: dict[str, np.ndarray], groups: dict[str, int]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        for a in node.attribute:
            if node.name in groups and a.name == "group":
                a.i = groups[node.name]
    for init in out.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[init.name]), init.name))
    del out.graph.value_info[:]  # shapes of pruned tensors are stale; inference recomputes them
    try:
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"channel pruning produced an invalid graph: {exc}") from exc
    return out


def _rel(err: float, target: float) -> float:
    return math.sqrt(err / target) if target > 0 else 0.0


def _layer(g: ChannelGroup, keep: np.ndarray, fits: list[_Fit], before: dict[str, np.ndarray],
           after: dict[str, np.ndarray]) -> dict[str, Any]:
    names = dict.fromkeys(name for name, _ in g.slices)
    target = sum(f.target for f in fits)
    return {
        "producer": g.producer,
        "consumers": tuple(_name(c.node) for c in g.consumers),
        "channels_before": g.channels,
        "channels_after": int(len(keep)),
        "kept": tuple(int(k) for k in keep),
        "params_before": sum(int(before[n].size) for n in names),
        "params_after": sum(int(after[n].size) for n in names),
        "recon_error_before": _rel(sum(f.before for f in fits), target),
        "recon_error_after": _rel(sum(f.after for f in fits), target),
        "refit": any(f.weight is not None for f in fits),
    }
