"""Canonicalize a graph on load, before any pass: one form whatever exporter made it.

torch's TorchScript exporter (``dynamo=False``, what most tutorials and model zoos use) writes
weights and shapes as ``Constant`` nodes, traces static "same" padding as Shape/Slice/Concat/
ConstantOfShape/Pad chains and may leave BatchNormalization, Identity and Dropout nodes; the
dynamo exporter and tf2onnx write other spellings of the same network. Every pass (pruning,
int8 placement, equalization, smoothing) matches patterns, so each must see one spelling.

The rewrite is onnxruntime's *basic* (level 1) graph optimizations, run offline: constant
folding (shape arithmetic on static axes included), Constant nodes to initializers, Pad fused
into Conv, BatchNormalization folded into Conv, Identity/Dropout/no-op elimination, Conv+Add/Mul
fusion. Then what onnxruntime leaves: reads of static axes from a dynamic-batch tensor's Shape
folded to constants (so computed "same" padding folds and fuses too), trailing empty optional
inputs dropped, spatial ReduceMean written as GlobalAveragePool, and LayerNorm spelt in
primitives (exports before opset 17) fused into LayerNormalization, converting such a graph to
opset 17. Measured on EfficientNet-Lite0's TorchScript export (opset 17, dynamic batch): 456 nodes
-> 94 (222 Constants, 17 Pads and their shape chains gone), the same 94-node graph the dynamo
exporter writes; onnxscript's optimizer (0.7) left 136 nodes with the Pads and their Slices, as
static-axis slices of a dynamic-batch Shape are not folded. Basic optimizations write standard ONNX
ops only; ``MatMulAddFusion`` (2-D MatMul+Add into Gemm) and ``ConstantSharing`` (one
initializer for equal constants) are turned off so that projections keep their own weights and
pattern. Dynamic axes are kept. The result must compute the same function: it is checked on the
given feeds (to fp32 rounding), and a graph that fails the check or that onnxruntime cannot load
is kept as given, with the reason in the report.
"""

from __future__ import annotations

import collections
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from converters import ir

log = logging.getLogger(__name__)

__all__ = ["canonicalize", "TOLERANCE"]

TOLERANCE = 1e-4  # relative to the largest output: folded BatchNorm and Conv+Add fusions round differently
DISABLED = ("MatMulAddFusion", "ConstantSharing")
Feeds = Mapping[str, np.ndarray]


def _optimized(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edge-sdk-canonical-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "canonical.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED))
        out = onnx.load(options.optimized_model_filepath)
    used = {node.domain for node in out.graph.node} | {""}
    kept = [o for o in out.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    out.graph.ClearField("value_info")  # shapes inferred before pruning would go stale after it
    out.ir_version = proto.ir_version
    out.producer_name, out.producer_version = proto.producer_name, proto.producer_version
    return out


def _fold_static_shape_reads(proto: onnx.ModelProto) -> int:
    """Replace reads of static axes from a dynamic tensor's Shape (``Shape -> Gather/Slice``, or a
    ``Shape`` whose ``start:end`` is static) by constants, in place; the count replaced.

    onnxruntime folds only whole shapes that are known, so "same" padding computed from
    ``x.shape[-2:]`` of a dynamic-batch tensor stays a Shape/Gather/Sub/Div/Pad chain; once the
    static dims are constants the next optimizer round folds the chain and fuses the Pad."""
    from onnx import numpy_helper

    dims = ir.Graph(proto).shapes
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for node in proto.graph.node:
        if node.op_type == "Shape" and node.input[0] in dims:
            attrs = {a.name: a.i for a in node.attribute}
            full = dims[node.input[0]]
            shapes[node.output[0]] = full[attrs.get("start", 0):attrs.get("end", len(full)) or None]
    folded: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        source = node.input[0] if node.input else ""
        if node.op_type == "Shape" and all(d is not None for d in shapes.get(node.output[0], (None,))):
            folded[node.output[0]] = np.array(shapes[node.output[0]], np.int64)
        elif source in shapes and node.op_type == "Gather" and node.input[1] in inits:
            picked = np.asarray(shapes[source], dtype=object)[inits[node.input[1]].astype(np.int64)]
            if all(d is not None for d in np.ravel(picked)):
                folded[node.output[0]] = np.asarray(picked, np.int64)
        elif source in shapes and node.op_type == "Slice" and all(n in inits for n in node.input[1:]):
            starts, ends, *rest = (inits[n].astype(np.int64) for n in node.input[1:])
            step = int(rest[1][0]) if len(rest) > 1 else 1
            sliced = shapes[source][int(starts[0]):int(ends[0]):step]
            if all(d is not None for d in sliced) and (not rest or int(rest[0][0]) == 0):
                folded[node.output[0]] = np.array(sliced, np.int64)
    if not folded:
        return 0
    keep = [n for n in proto.graph.node if not set(n.output) & set(folded)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
    return len(folded)


def _spatial_means_to_pools(proto: onnx.ModelProto) -> int:
    """``ReduceMean`` over H and W of an NCHW tensor (how the dynamo exporter writes adaptive average
    pooling to 1x1) -> ``GlobalAveragePool`` (what the TorchScript exporter writes), plus ``Flatten``
    when the mean drops the axes; the count rewritten."""
    from onnx import helper, numpy_helper

    dims = ir.Graph(proto).shapes
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        rank = len(dims.get(node.input[0], [])) if node.input else 0
        axes = (list(attrs["axes"].ints) if "axes" in attrs else
                inits[node.input[1]].tolist() if len(node.input) > 1 and node.input[1] in inits else None)
        if node.op_type != "ReduceMean" or rank != 4 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            nodes.append(node)
            continue
        keep = attrs["keepdims"].i if "keepdims" in attrs else 1
        pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
        nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name))
        if not keep:
            nodes.append(helper.make_node("Flatten", [pooled], [node.output[0]], name=f"{node.name}_flatten", axis=1))
        changed += 1
    if changed:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return changed


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _layer_norms(proto: onnx.ModelProto) -> list[tuple[list[onnx.NodeProto], str, str, str, float]]:
    """LayerNorm spelt in primitives over the last axis (how exporters write it before opset 17):
    ``ReduceMean -> Sub -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div -> Mul gamma -> Add beta``.
    Each match: (its nodes, input, gamma, beta, epsilon)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def only(tensor: str, op: str) -> onnx.NodeProto | None:
        found = users.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    def last_axis(node: onnx.NodeProto) -> bool:
        axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
        return axes == [[-1]]

    def const(node: onnx.NodeProto, other: str) -> str | None:
        names = [n for n in node.input if n != other]
        return names[0] if len(names) == 1 and names[0] in inits else None

    matches = []
    for mean in (n for n in proto.graph.node if n.op_type == "ReduceMean" and last_axis(n)):
        x = mean.input[0]
        sub = next((u for u in users.get(mean.output[0], [])
                    if u.op_type == "Sub" and list(u.input) == [x, mean.output[0]]), None)
        if sub is None:
            continue
        d = sub.output[0]
        pow_, div = (next((u for u in users.get(d, []) if u.op_type == op), None) for op in ("Pow", "Div"))
        if pow_ is None or div is None or len(users.get(d, [])) != 2 or const(pow_, d) is None \
                or float(inits[const(pow_, d)]) != 2.0:  # type: ignore[index]
            continue
        var = only(pow_.output[0], "ReduceMean")
        add = only(var.output[0], "Add") if var is not None and last_axis(var) else None
        eps = const(add, var.output[0]) if add is not None and var is not None else None
        sqrt = only(add.output[0], "Sqrt") if add is not None else None
        if eps is None or sqrt is None or list(div.input) != [d, sqrt.output[0]]:
            continue
        mul = only(div.output[0], "Mul")
        gamma = const(mul, div.output[0]) if mul is not None else None
        beta_add = only(mul.output[0], "Add") if mul is not None else None
        beta = const(beta_add, mul.output[0]) if beta_add is not None and mul is not None else None
        if gamma is None or beta is None or inits[gamma].ndim != 1 or inits[beta].ndim != 1:
            continue
        nodes = [mean, sub, pow_, var, add, sqrt, div, mul, beta_add]  # type: ignore[list-item]
        matches.append((nodes, x, gamma, beta, float(inits[eps])))
    return matches


def _fuse_layer_norms(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Each LayerNorm spelt in primitives as one ``LayerNormalization`` (opset 17; an older graph is
    converted to opset 17 first, only when it has such a LayerNorm)."""
    from onnx import helper, version_converter

    if not _layer_norms(proto):
        return proto
    if _default_opset(proto) < 17:
        proto = version_converter.convert_version(proto, 17)
    matches = _layer_norms(proto)
    fused = {id(n) for nodes, *_ in matches for n in nodes}
    last = {id(nodes[-1]): (nodes, x, gamma, beta, eps) for nodes, x, gamma, beta, eps in matches}
    out_nodes = []
    for node in proto.graph.node:
        if id(node) in last:
            nodes, x, gamma, beta, eps = last[id(node)]
            out_nodes.append(helper.make_node("LayerNormalization", [x, gamma, beta], [node.output[0]],
                                              name=nodes[0].name.rsplit("/", 1)[0] + "/LayerNormalization",
                                              axis=-1, epsilon=eps))
        elif id(node) not in fused:
            out_nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(out_nodes)
    return proto


def _strip_empty_inputs(proto: onnx.ModelProto) -> int:
    """Drop trailing empty optional inputs (``Pad(x, pads, "")``), which keep onnxruntime's Pad fusion off."""
    changed = 0
    for node in proto.graph.node:
        count = len(node.input)
        while count and not node.input[count - 1]:
            count -= 1
        if count < len(node.input):
            kept = list(node.input[:count])
            del node.input[:]
            node.input.extend(kept)
            changed += 1
    return changed


def _run(proto: onnx.ModelProto, feeds: Sequence[Feeds]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, dict(f)) for f in feeds]


def _census(proto: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in proto.graph.node)


def _dims(proto: onnx.ModelProto) -> list[list[Any]]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input]


def canonicalize(proto: onnx.ModelProto, feeds: Sequence[Feeds]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The canonical graph and a report of what was rewritten (or why the graph was kept as given)."""
    import onnxruntime as ort

    by = f"onnxruntime {ort.__version__} basic graph optimizations (without {', '.join(DISABLED)})"
    report: dict[str, Any] = {"by": by, "nodes_before": len(proto.graph.node)}
    try:
        out = _optimized(_fuse_layer_norms(_optimized(proto)))
        for _ in range(4):  # each round exposes what the next folds
            if not (_fold_static_shape_reads(out) + _strip_empty_inputs(out) + _spatial_means_to_pools(out)
                    + ir.drop_dead(out)):
                break
            out = _optimized(out)
    except Exception as exc:  # noqa: BLE001 - custom ops, an opset onnxruntime lacks: keep the graph
        log.warning("canonicalization skipped: onnxruntime could not load the graph: %s", exc)
        return proto, {**report, "kept": f"onnxruntime could not load the graph ({type(exc).__name__}: {exc})"}
    if _dims(out) != _dims(proto):
        return proto, {**report, "kept": f"the rewrite changed the input shapes {_dims(proto)} -> {_dims(out)}"}
    if len(out.graph.node) == len(proto.graph.node) and _census(out) == _census(proto):
        return proto, {**report, "nodes_after": len(proto.graph.node), "rewritten": {}}
    worst = _difference(_run(proto, feeds), _run(out, feeds)) if feeds else None
    if worst is not None and worst > TOLERANCE:
        log.warning("canonicalization skipped: the rewritten graph differs by %.3g", worst)
        return proto, {**report, "kept": f"the rewritten graph differs by {worst:.3g} (> {TOLERANCE:g})"}
    before, after = _census(proto), _census(out)
    rewritten = {op: [before[op], after[op]] for op in sorted(set(before) | set(after)) if before[op] != after[op]}
    log.info("canonical graph: %d -> %d nodes", len(proto.graph.node), len(out.graph.node))
    before_opset, after_opset = _default_opset(proto), _default_opset(out)
    opsets = {"opset": [before_opset, after_opset]} if after_opset != before_opset else {}
    return out, {**report, "nodes_after": len(out.graph.node), "rewritten": rewritten, **opsets,
                 "max_diff": worst, "checked_on": len(feeds)}


def _difference(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for outs_a, outs_b in zip(a, b):
        for x, y in zip(outs_a, outs_b):
            if x.shape != y.shape:
                return float("inf")
            if x.dtype.kind in "fc":
                scale = max(1.0, float(np.abs(x).max(initial=0.0)))
                worst = max(worst, float(np.abs(x.astype(np.float64) - y).max(initial=0.0)) / scale)
            elif not np.array_equal(x, y):
                return float("inf")
    return worst
