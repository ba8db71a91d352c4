"""Residual CNN block removal: bypass the blocks ``y = x + f(x)`` that change their input the least.

A block is an Add of a tensor ``x`` (the skip) and a branch ``f(x)`` where every node of f
depends only on x and constants, no tensor of f is read outside it or is a graph output, f holds
at least one Conv/Gemm/MatMul with a constant weight, and y has the shape of x, so ``y := x`` is
a valid graph (the MobileNetV2/EfficientNet/ResNet identity blocks; not the first block of a
stage, whose skip path changes the width or the resolution).

Influence, measured once on the input model over the calibration batches:

* ``"norm"``: ``||f(x)|| / ||x||``, as ``transformer.prune_layers`` does for transformer blocks;
* ``"output"``: ``||g'(b) - g(b)|| / ||g(b)||`` over the graph outputs, with only that block bypassed.

The ``count`` least influential blocks are bypassed: the Add's output is replaced by x
everywhere and the branch's now-dead nodes and initializers are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import onnx

from converters import ir
from converters.ir import WEIGHTED, Graph, node_key
from converters.pruning.common import need_batches, Feeds, PruneResult, params, relative_error
from edge_sdk.errors import PruningError

__all__ = ["ResidualBlock", "bypass_blocks", "find_residual_blocks", "prune_residual_blocks"]

log = logging.getLogger(__name__)

Measure = Literal["norm", "output"]


@dataclass(frozen=True)
class ResidualBlock:
    """``add``'s output is ``skip + branch``; ``nodes`` compute ``branch`` from ``skip`` (graph order)."""

    add: str
    skip: str
    branch: str
    nodes: tuple[str, ...]
    params: int  # initializer elements only this branch reads


def _branch(graph: Graph, add: onnx.NodeProto, skip: str, branch: str) -> list[onnx.NodeProto] | str:
    """The nodes computing ``branch`` from ``skip`` alone, or why this is not a residual block."""
    nodes: dict[int, onnx.NodeProto] = {}
    stack, seen, reached = [branch], set(), False
    while stack:
        name = stack.pop()
        if name == skip:
            reached = True
            continue
        if not name or name in graph.inits or name in seen:
            continue
        seen.add(name)
        node = graph.writers.get(name)
        if node is None:
            return f"the branch {branch!r} also depends on graph input {name!r}"
        nodes[id(node)] = node
        stack.extend(node.input)
    if not reached:
        return f"the branch {branch!r} does not read {skip!r}"
    inside = set(nodes) | {id(add)}
    for node in nodes.values():
        for out in node.output:
            if out in graph.outputs:
                return f"branch tensor {out!r} is a graph output"
            if any(id(r) not in inside for r in graph.readers.get(out, [])):
                return f"branch tensor {out!r} is also read outside the block"
    if not any(n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in graph.inits for n in nodes.values()):
        return "the branch holds no layer with a constant weight"
    return sorted(nodes.values(), key=lambda n: graph.order[id(n)])


def _block(graph: Graph, add: onnx.NodeProto) -> ResidualBlock | str:
    if add.output[0] in graph.outputs:
        return "its output is a graph output"
    reasons = []
    for skip, branch in (tuple(add.input), tuple(add.input)[::-1]):
        found = _branch(graph, add, skip, branch)
        if isinstance(found, str):
            reasons.append(found)
            continue
        if graph.dims(skip) is None or graph.dims(skip) != graph.dims(add.output[0]):
            return f"the shapes of {skip!r} and {add.output[0]!r} are not known to be equal"
        own = {i for n in found for i in n.input if i in graph.inits
               and all(any(r is m for m in found) for r in graph.readers[i])}
        count = sum(int(np.prod(graph.inits[i].dims, dtype=np.int64)) for i in own)
        return ResidualBlock(node_key(add), skip, branch, tuple(node_key(n) for n in found), count)
    reasons.sort(key=lambda r: "graph input" in r or "does not read" in r)  # the orientation that fits best
    return reasons[0]


def find_residual_blocks(model: onnx.ModelProto) -> tuple[list[ResidualBlock], list[str]]:
    """The removable residual blocks in graph order, and why the other Adds of two activations are not."""
    graph = Graph(model)
    blocks, notes = [], []
    for node in graph.nodes:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in graph.inits for i in node.input):
            continue
        found = _block(graph, node)
        if isinstance(found, str):
            notes.append(f"{node_key(node)}: not a removable block: {found}")
        else:
            blocks.append(found)
    return blocks, notes


def _bypass(model: onnx.ModelProto, blocks: Sequence[ResidualBlock]) -> onnx.ModelProto:
    """A copy of ``model`` with ``y := x`` for each of ``blocks``, dead nodes and initializers dropped."""
    adds = {b.add: b.skip for b in blocks}
    rename = {n.output[0]: adds[node_key(n)] for n in model.graph.node if n.op_type == "Add" and node_key(n) in adds}
    out = ir.bypass(model, rename)
    ir.forget_shapes(out, [v.name for v in out.graph.value_info])
    return out


def bypass_blocks(model: onnx.ModelProto, adds: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the residual blocks ending at the Add nodes ``adds`` bypassed."""
    blocks = {b.add: b for b in find_residual_blocks(model)[0]}
    unknown = sorted(set(adds) - set(blocks))
    if unknown:
        raise PruningError(f"{unknown} do not end removable residual blocks of this graph",
                           hint=f"removable blocks (their Add): {', '.join(blocks) or 'none'}")
    return _bypass(model, [blocks[a] for a in adds])


def _norm_influence(model: onnx.ModelProto, blocks: list[ResidualBlock], batches: Sequence[Feeds]) -> list[float]:
    sums = np.zeros((len(blocks), 2))
    names = sorted({t for b in blocks for t in (b.skip, b.branch)})
    for _, values in ir.probe(model, batches, names, error=PruningError):
        for k, b in enumerate(blocks):
            sums[k] += [float(np.sum(np.square(values[b.branch], dtype=np.float64))),
                        float(np.sum(np.square(values[b.skip], dtype=np.float64)))]
    return [float(np.sqrt(fx / xx)) if xx > 0 else float("inf") for fx, xx in sums]


def _output_influence(model: onnx.ModelProto, blocks: list[ResidualBlock], batches: Sequence[Feeds]) -> list[float]:
    reference = ir.outputs_on(model, batches)
    return [float(np.sqrt(relative_error(ir.outputs_on(_bypass(model, [b]), batches), reference))) for b in blocks]


def prune_residual_blocks(model: onnx.ModelProto, count: int, batches: Sequence[Feeds], *,
                          measure: Measure = "norm") -> PruneResult:
    """Bypass the ``count`` residual blocks with the least influence (see the module docstring)."""
    blocks, notes = find_residual_blocks(model)
    if not blocks:
        raise PruningError("this graph has no residual block y = x + f(x) that can be bypassed"
                           + (f" ({'; '.join(notes[:3])})" if notes else ""),
                           hint='prune channels instead: {"method": "structured", "ratio": 0.2}')
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(blocks):
        raise PruningError(f"count is {count!r}; expected an int from 1 to {len(blocks)}, the residual blocks found",
                           hint="count is how many residual blocks y = x + f(x) to remove")
    if measure not in ("norm", "output"):
        raise PruningError(f"measure is {measure!r}; expected 'norm' or 'output'",
                           hint="'norm' compares ||f(x)|| with ||x||; 'output' bypasses each block and compares outputs")
    need_batches(batches, "prune_residual_blocks")
    influence = (_norm_influence if measure == "norm" else _output_influence)(model, blocks, batches)
    chosen = set(sorted(range(len(blocks)), key=lambda k: influence[k])[:count])
    pruned = _bypass(model, [blocks[k] for k in sorted(chosen)])
    ir.check(pruned, "block-pruned")
    layers = tuple({"node": b.add, "op_type": "Add", "skip": b.skip, "branch": b.branch, "nodes": b.nodes,
                    "params": b.params, "influence": influence[k], "measure": measure, "removed": k in chosen}
                   for k, b in enumerate(blocks))
    notes.append(f"params {params(model)} -> {params(pruned)}")
    log.info("removed %d of %d residual blocks (%s influence)", count, len(blocks), measure)
    return PruneResult(model=pruned, method="blocks", layers=layers, notes=tuple(notes))
