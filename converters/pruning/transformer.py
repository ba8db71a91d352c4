"""Structured pruning of transformer FFN neurons, with a least-squares refit of the down projection.

An FFN group is ``MatMul(x, W1[K,F]) -> [Add(b1[F])] -> activation -> MatMul(h, W2[F,K2]) -> [Add(b2)]``
with W1, W2 (and biases) constant initializers used by this group only, and an element-wise
activation (Erf-GELU subgraph in either torch order, ``Gelu``, ``Relu``) whose constants are
scalars, so that each of the F hidden neurons is independent of the others. Removing a neuron
then means slicing a column of W1, an entry of b1 and a row of W2: the graph gets physically
smaller and stays valid. The kept rows of W2 (and b2) are refit by ridge least squares so that
the layer output over the calibration tokens moves as little as possible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters import ir
from converters.ir import Graph, node_key
from converters.pruning.common import (Feeds, PruneResult, check_ratios, need_batches, params, refit_rows, relative_mse,
                                      units_to_drop, unknown_units)
from edge_sdk.errors import PruningError

__all__ = ["FFNGroup", "find_ffn_groups", "prune_ffn", "find_residual_blocks", "prune_layers"]

log = logging.getLogger(__name__)

# Ops a walk from the first MatMul may cross while looking for the second one.
_ELEMENTWISE = {"Mul", "Div", "Add", "Sub", "Erf", "Relu", "Gelu", "Sigmoid", "Tanh", "Pow", "Neg",
                "FastGelu", "BiasGelu", "Sqrt", "Exp", "LeakyRelu", "Clip"}
_ERF_GELU_OPS = {"Mul", "Div", "Add", "Erf"}


@dataclass(frozen=True)
class FFNGroup:
    """One prunable FFN: node names, initializer names and the hidden (post-activation) tensor."""

    up: str
    down: str
    w1: str
    w2: str
    b1: str | None
    b2: str | None
    hidden: str
    activation: str  # "gelu_erf", "gelu" or "relu"
    tensors: tuple[str, ...]  # every tensor of width F between the two MatMuls


def _activation(ops: list[str]) -> str | None:
    if ops == ["Relu"]:
        return "relu"
    if ops == ["Gelu"]:
        return "gelu"
    if ops.count("Erf") == 1 and set(ops) <= _ERF_GELU_OPS:
        return "gelu_erf"
    return None


def _group_at(graph: Graph, up: onnx.NodeProto) -> FFNGroup | str | None:
    """The FFN group starting at ``up``; a reason string when it looks like one but is not
    supported; None when no second MatMul is reached through element-wise ops."""
    w1 = graph.matmul_weight(up)
    if w1 is None:
        return None
    width = int(w1.dims[1])
    start, b1 = up.output[0], None
    bias = graph.bias_after(start, width)
    if bias is not None:
        start, b1 = bias[0].output[0], bias[1]
    region: list[onnx.NodeProto] = []
    tensors, frontier = {start}, [start]
    downs: list[onnx.NodeProto] = []
    while frontier:
        for node in graph.readers.get(frontier.pop(), []):
            if any(node is n for n in region + downs):
                continue
            if graph.matmul_weight(node) is not None and node.input[0] in tensors:
                downs.append(node)
            elif node.op_type in _ELEMENTWISE:
                region.append(node)
                tensors.update(node.output)
                frontier.extend(node.output)
    if not downs:
        return None
    where = f"{node_key(up)} -> {node_key(downs[0])}"
    if len(downs) > 1:
        return f"{where}: hidden tensors feed {len(downs)} MatMuls; skipped"
    down = downs[0]
    hidden = down.input[0]
    w2 = graph.matmul_weight(down)
    if w2 is None:  # cannot happen: downs hold only MatMuls with a 2-D weight
        return None
    inside = {id(n) for n in region} | {id(down)}
    for name in sorted(tensors | ({up.output[0]} if b1 else set())):
        if name in graph.outputs:
            return f"{where}: hidden tensor {name!r} is a graph output; skipped"
        foreign = [node_key(n) for n in graph.readers.get(name, []) if id(n) not in inside]
        if name != up.output[0] and foreign:
            return f"{where}: hidden tensor {name!r} also feeds {foreign}; skipped"
    if graph.uses[hidden] != 1:
        return f"{where}: activation {hidden!r} feeds more than the second MatMul; skipped"
    for node in region:
        mixed = [i for i in node.input if i not in tensors and not graph.is_scalar(i)]
        if mixed:
            return f"{where}: {node.op_type} {node_key(node)!r} mixes in non-scalar tensor {mixed[0]!r} (gated FFN?); skipped"
    kind = _activation([n.op_type for n in region])
    if kind is None:
        return f"{where}: activation {[n.op_type for n in region]} not supported (Erf-GELU, Gelu, Relu); skipped"
    if int(w2.dims[0]) != width:
        return f"{where}: W1 has {width} columns but W2 has {w2.dims[0]} rows; skipped"
    if graph.uses[w1.name] != 1 or graph.uses[w2.name] != 1:
        return f"{where}: W1 or W2 is shared with other nodes; skipped"
    b2 = graph.bias_after(down.output[0], int(w2.dims[1]))
    return FFNGroup(up=node_key(up), down=node_key(down), w1=w1.name, w2=w2.name, b1=b1,
                    b2=b2[1] if b2 else None, hidden=hidden, activation=kind,
                    tensors=tuple(sorted(tensors | {up.output[0]})))


def find_ffn_groups(model: onnx.ModelProto) -> tuple[list[FFNGroup], list[str]]:
    """The FFN groups of ``model`` in graph order, and why FFN-like structures were skipped."""
    graph = Graph(model)
    groups: list[FFNGroup] = []
    notes: list[str] = []
    for node in model.graph.node:
        found = _group_at(graph, node)
        if isinstance(found, FFNGroup):
            groups.append(found)
        elif isinstance(found, str):
            notes.append(found)
    return groups, notes


def _hidden_rows(model: onnx.ModelProto, hidden: str, batches: Sequence[Feeds]) -> np.ndarray:
    """The hidden activations ``[tokens, F]`` over all batches, padding tokens (attention_mask == 0) dropped."""
    rows = []
    for feeds, values in ir.probe(model, batches, [hidden], error=PruningError):
        h = np.asarray(values[hidden], dtype=np.float64)
        flat = h.reshape(-1, h.shape[-1])
        mask = feeds.get("attention_mask")
        if mask is not None and tuple(np.shape(mask)) == h.shape[:-1]:
            flat = flat[np.asarray(mask).reshape(-1) != 0]
        rows.append(flat)
    return np.concatenate(rows, axis=0)


def _set(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    init = inits[name]
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))


def _prune_group(model: onnx.ModelProto, group: FFNGroup, ratio: float, batches: Sequence[Feeds],
                 refit: bool, notes: list[str]) -> dict[str, Any]:
    """Prune one group of ``model`` in place; the layer's report entry."""
    inits = {i.name: i for i in model.graph.initializer}
    w1, w2 = numpy_helper.to_array(inits[group.w1]), numpy_helper.to_array(inits[group.w2]).astype(np.float64)
    width = w1.shape[1]
    names = [n for n in (group.w1, group.b1, group.w2) if n]
    before = sum(int(np.prod(inits[n].dims, dtype=np.int64)) for n in names)
    drop = units_to_drop(ratio, width) if int(round(ratio * width)) < width else width
    if drop >= width:
        drop = width - 1
        notes.append(f"{group.up}: ratio {ratio} would remove all {width} neurons; kept 1")
    h = _hidden_rows(model, group.hidden, batches)
    scores = np.mean(np.abs(h), axis=0) * np.linalg.norm(w2, axis=1)
    keep = np.sort(np.argsort(scores, kind="stable")[drop:])
    target = h @ w2
    new_w2, shift = w2[keep], np.zeros(w2.shape[1])
    err_before = err_after = relative_mse(h[:, keep] @ new_w2, target)
    if refit and drop > 0:
        fit_w2, fit_shift = refit_rows(h[:, keep], target, group.b2 is not None)
        err_fit = relative_mse(h[:, keep] @ fit_w2 + fit_shift, target)
        if err_fit < err_before:
            new_w2, shift, err_after = fit_w2, fit_shift, err_fit
        else:
            notes.append(f"{group.up}: refit did not reduce the error ({err_fit:.3g} >= {err_before:.3g}); kept the slice")
    _set(inits, group.w1, w1[:, keep])
    if group.b1:
        _set(inits, group.b1, numpy_helper.to_array(inits[group.b1])[keep])
    _set(inits, group.w2, new_w2)
    if group.b2:
        _set(inits, group.b2, numpy_helper.to_array(inits[group.b2]) + shift)
    after = sum(int(np.prod(inits[n].dims, dtype=np.int64)) for n in names)
    log.info("%s: %d -> %d neurons, recon error %.3g -> %.3g", group.up, width, len(keep), err_before, err_after)
    return {"node": group.up, "op_type": "FFN", "up": group.up, "down": group.down, "activation": group.activation,
            "ratio": ratio, "before": width, "after": int(len(keep)), "neurons_before": width,
            "neurons_after": int(len(keep)), "params_before": before, "params_after": after,
            "recon_before": err_before, "recon_after": err_after, "refit": err_after < err_before}


def prune_ffn(model: onnx.ModelProto, ratio: float, batches: Sequence[Feeds], *, refit: bool = True,
              ratios: Mapping[str, float] | None = None) -> PruneResult:
    """Remove the ``round(ratio * F)`` least important hidden neurons of every FFN group.

    A neuron's importance is ``mean |h_f| * ||W2[f, :]||`` over the calibration tokens (padding
    dropped via ``attention_mask``). Groups are pruned in graph order, each measured on the model
    with the earlier groups already pruned. With ``refit``, the kept W2 rows (and b2, when the
    group has one) are refit by ridge least squares to the original ``h @ W2`` of that group;
    the refit is kept only when it lowers the relative reconstruction error, which each layer
    entry reports before (``recon_before``, slicing only) and after (``recon_after``).
    ``ratios`` overrides the ratio per group, keyed by the group's first MatMul (``FFNGroup.up``);
    with it, ``ratio`` may be 0 (groups not named stay whole).
    """
    check_ratios(ratio, ratios, "FFN neurons")
    need_batches(batches, "prune_ffn")
    groups, notes = find_ffn_groups(model)
    pruned = ir.copy(model)
    if not groups:
        notes.append("no supported FFN group found; model unchanged")
        return PruneResult(model=pruned, method="structured", layers=(), notes=tuple(notes))
    ratios = dict(ratios or {})
    unknown_units(ratios, [g.up for g in groups], "FFN groups")
    layers = [_prune_group(pruned, g, float(ratios.get(g.up, ratio)), batches, refit, notes) for g in groups
              if ratios.get(g.up, ratio) > 0]
    stale = {t for g in groups for t in g.tensors}
    ir.forget_shapes(pruned, stale)
    ir.check(pruned, "pruned FFN")
    log.info("prune_ffn: %d -> %d params", params(model), params(pruned))
    return PruneResult(model=pruned, method="structured", layers=tuple(layers), notes=tuple(notes))


def _ancestors(producers: dict[str, onnx.NodeProto], tensor: str) -> tuple[set[str], list[onnx.NodeProto]]:
    """Tensors upstream of ``tensor`` and the nodes between them."""
    seen: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    stack = [tensor]
    while stack:
        node = producers.get(stack.pop())
        if node is None or any(node is n for n in nodes):
            continue
        nodes.append(node)
        for name in node.input:
            if name and name not in seen:
                seen.add(name)
                stack.append(name)
    return seen, nodes


def find_residual_blocks(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, str]]:
    """``(Add node, skip input x, branch output f)`` for each ``x + f(x)`` whose branch holds a
    MatMul with an initializer weight (an attention or FFN sub-block), in graph order."""
    graph = Graph(model)
    constants = graph.inits  # a shared constant (GELU's 1.0) skips nothing
    blocks = []
    for node in graph.nodes:
        if node.op_type != "Add" or len(node.input) != 2 or node.output[0] in graph.outputs:
            continue
        for skip, branch in (node.input, node.input[::-1]):
            if skip in constants:
                continue
            upstream, nodes = _ancestors(graph.writers, branch)
            if skip in upstream and any(graph.matmul_weight(n) is not None for n in nodes):
                blocks.append((node, skip, branch))
                break
    return blocks


def _influence(model: onnx.ModelProto, blocks: list[tuple[onnx.NodeProto, str, str]],
               batches: Sequence[Feeds]) -> list[float]:
    """``||f(x)|| / ||x||`` per block over the calibration tokens."""
    names = sorted({t for _, x, f in blocks for t in (x, f)})
    sums = np.zeros((len(blocks), 2))
    for _, values in ir.probe(model, batches, names, error=PruningError):
        for b, (_, x, f) in enumerate(blocks):
            sums[b] += [float(np.sum(np.square(values[f], dtype=np.float64))),
                        float(np.sum(np.square(values[x], dtype=np.float64)))]
    return [float(np.sqrt(fx / xx)) if xx > 0 else float("inf") for fx, xx in sums]


def prune_layers(model: onnx.ModelProto, count: int, batches: Sequence[Feeds]) -> PruneResult:
    """Bypass the ``count`` residual blocks ``x + f(x)`` whose branch moves x the least.

    Influence is ``||f(x)|| / ||x||`` over all calibration tokens, measured once on the input model.
    A removed block's Add output is replaced by ``x`` everywhere and the branch's now-dead nodes and
    initializers are dropped.
    """
    blocks = find_residual_blocks(model)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(blocks):
        raise PruningError(f"count is {count!r}; expected an int from 1 to {len(blocks)}, the residual blocks found",
                           hint="count is how many attention/FFN residual blocks to remove")
    need_batches(batches, "prune_layers")
    influence = _influence(model, blocks, batches)
    chosen = sorted(range(len(blocks)), key=lambda b: influence[b])[:count]
    rename = {blocks[b][0].output[0]: blocks[b][1] for b in chosen}
    before = params(model)
    pruned = ir.bypass(model, rename)
    ir.check(pruned, "layer-pruned")
    layers = tuple({"node": node_key(blocks[b][0]), "op_type": "Add", "skip": blocks[b][1], "branch": blocks[b][2],
                    "influence": influence[b], "removed": b in chosen} for b in range(len(blocks)))
    notes = (f"params {before} -> {params(pruned)}",)
    return PruneResult(model=pruned, method="layers", layers=layers, notes=notes)
