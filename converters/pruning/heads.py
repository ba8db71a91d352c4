"""Structured pruning of attention heads in BERT-style ONNX graphs.

An attention block is matched backwards from its output projection::

    x -> MatMul(Wq[K,H*D]) [-> Add(bq)] -> Reshape([B,S,H,D]) -> Transpose ---\
    x -> MatMul(Wk)        [-> Add(bk)] -> Reshape -> Transpose(s) -> MatMul(q, k) -> scale/mask/Softmax
    x -> MatMul(Wv)        [-> Add(bv)] -> Reshape -> Transpose ---------------------> MatMul(p, v)
      -> Transpose -> Reshape([B,S,H*D]) -> MatMul(Wo[H*D,N]) [-> Add(bo)]

Heads are independent up to the output projection, so removing head h means slicing columns
``h*D:(h+1)*D`` of Wq/Wk/Wv (and their biases) and the same rows of Wo, and rewriting the
reshape constants that spell out H (``H -> H'``) or H*D (``H*D -> H'*D``); a ``-1`` entry needs
no rewrite. New initializers (and, for Concat-built shapes, new Concat nodes) are created for
every changed tensor, so weights or shape constants shared with other nodes are never mutated.
The attention scale 1/sqrt(D) is unchanged since D is.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converters import ir
from converters.ir import Graph, node_key
from converters.pruning.common import (Feeds, PruneResult, check_ratios, need_batches, params, refit_rows,
                                      relative_mse, unknown_units)
from edge_sdk.errors import InternalError, PruningError

__all__ = ["AttentionBlock", "find_attention_blocks", "prune_heads"]

log = logging.getLogger(__name__)

# Ops a walk from the probabilities MatMul back to the scores MatMul may cross.
_SCORE_OPS = {"Softmax", "Add", "Mul", "Div", "Sub", "Where", "Cast", "Transpose"}
_MAX_SCORE_NODES = 12
_MAX_ROWS = 20_000  # calibration tokens used for the output-projection refit (evenly sampled)


@dataclass(frozen=True)
class _Projection:
    matmul: str  # node key of MatMul(x, W)
    weight: str
    bias_add: str | None  # node key of the Add holding the bias
    bias: str | None  # the bias tensor (initializer, Constant or Identity of one)
    reshape: str  # node key of the Reshape to [B, S, H, D]
    tensors: tuple[str, ...]  # outputs from the MatMul up to the attention MatMul


@dataclass(frozen=True)
class AttentionBlock:
    """One prunable multi-head attention block."""

    q: _Projection
    k: _Projection
    v: _Projection
    out: str  # node key of the output-projection MatMul
    wo: str
    context_reshape: str  # node key of the Reshape to [B, S, H*D]
    context: str  # the tensor [B, S, H*D] fed to the output projection
    num_heads: int
    head_dim: int
    tensors: tuple[str, ...]  # every tensor whose shape depends on H


def _skip_back(g: Graph, tensor: str, ops: set[str], passed: list[str]) -> str:
    """Walk up from ``tensor`` through ``ops`` (Mul/Div only with a scalar constant)."""
    while True:
        node = g.writers.get(tensor)
        if node is None or node.op_type not in ops:
            return tensor
        if node.op_type == "Transpose":
            tensor = node.input[0]
        else:
            data = [i for i in node.input if not g.is_scalar(i)]
            if len(data) != 1 or len(node.input) != 2:
                return tensor
            tensor = data[0]
        passed.append(node.output[0])


def _length(g: Graph, name: str) -> int | None:
    """The inferred length of a 1-D tensor, when fixed."""
    shape = g.shapes.get(name)
    return shape[0] if shape is not None and len(shape) == 1 else None


def _shape_layout(g: Graph, reshape: onnx.NodeProto) -> list[tuple[str | None, int, int | None]] | None:
    """Per element of a Reshape's shape: (constant piece tensor or None, offset, value or None)."""
    src = reshape.input[1]
    value = g.const(src)
    if value is not None:
        return [(src, i, int(v)) for i, v in enumerate(value.reshape(-1))]
    node = g.writers.get(src)
    if node is None or node.op_type != "Concat":
        return None
    layout: list[tuple[str | None, int, int | None]] = []
    for piece in node.input:
        value = g.const(piece)
        if value is not None:
            layout.extend((piece, i, int(v)) for i, v in enumerate(value.reshape(-1)))
        elif (length := _length(g, piece)) is not None:
            layout.extend((None, i, None) for i in range(length))
        else:
            return None
    return layout


def _projection(g: Graph, tensor: str) -> _Projection | str:
    """The Q/K/V projection feeding an attention MatMul input; a reason string when not matched."""
    passed: list[str] = []
    top = _skip_back(g, tensor, {"Transpose", "Mul", "Div"}, passed)
    reshape = g.writers.get(top)
    if reshape is None or reshape.op_type != "Reshape":
        return f"{tensor!r} does not come from a Reshape through Transpose/scale ops"
    passed.append(reshape.output[0])
    t = _skip_back(g, reshape.input[0], {"Mul", "Div"}, passed)
    node = g.writers.get(t)
    bias_add, bias = None, None
    if node is not None and node.op_type == "Add" and len(node.input) == 2:
        consts = [i for i in node.input if g.const(i) is not None]
        data = [i for i in node.input if g.const(i) is None]
        if len(consts) == 1 and len(data) == 1:
            bias_add, bias = node, consts[0]
            passed.append(node.output[0])
            node = g.writers.get(data[0])
    if node is None or g.matmul_weight(node) is None:
        return f"Reshape {node_key(reshape)!r} is not fed by MatMul(x, W) [+ bias]"
    passed.append(node.output[0])
    weight = g.matmul_weight(node)
    assert weight is not None
    if bias is not None:
        b = g.const(bias)
        if b is None or b.shape != (int(weight.dims[1]),):
            return f"bias {bias!r} of {node_key(node)!r} is not a [{weight.dims[1]}] vector"
    return _Projection(matmul=node_key(node), weight=weight.name,
                       bias_add=node_key(bias_add) if bias_add is not None else None, bias=bias,
                       reshape=node_key(reshape), tensors=tuple(passed))


def _scores_matmul(g: Graph, probs: str, visited: list[str]) -> onnx.NodeProto | None:
    """The Q @ K^T MatMul upstream of the attention probabilities, through Softmax/scale/mask ops."""
    queue, seen = deque([probs]), {probs}
    while queue and len(visited) < _MAX_SCORE_NODES:
        node = g.writers.get(queue.popleft())
        if node is None:
            continue
        if node.op_type == "MatMul" and g.matmul_weight(node) is None and all(g.const(i) is None for i in node.input):
            visited.append(node.output[0])
            return node
        if node.op_type not in _SCORE_OPS:
            continue
        visited.append(node.output[0])
        for name in node.input:
            if name and name not in seen and g.const(name) is None:
                seen.add(name)
                queue.append(name)
    return None


def _heads_from(layouts: list[list[tuple[str | None, int, int | None]]], width: int,
                num_heads: int | None) -> int | str:
    """The head count implied by the [B, S, H, D] reshape shapes (and the argument)."""
    found: set[int] = set()
    for layout in layouts:
        h, d = layout[2][2], layout[3][2]
        if h is not None and h > 0:
            found.add(h)
        if d is not None and d > 0 and width % d == 0:
            found.add(width // d)
    if num_heads is not None:
        found.add(num_heads)
    if not found:
        return "head count not in the reshape constants; pass num_heads"
    if len(found) > 1:
        return f"head counts disagree: {sorted(found)} (reshape constants vs num_heads)"
    heads = found.pop()
    if width % heads:
        return f"width {width} is not a multiple of {heads} heads"
    return heads


def _block_at(g: Graph, out: onnx.NodeProto, num_heads: int | None) -> AttentionBlock | str | None:
    """The attention block whose output projection is ``out``; a reason string when it looks like
    one but is not supported; None when ``out`` is not fed by Reshape(Transpose(MatMul(p, v)))."""
    wo = g.matmul_weight(out)
    if wo is None:
        return None
    ctx_reshape = g.writers.get(out.input[0])
    if ctx_reshape is None or ctx_reshape.op_type != "Reshape":
        return None
    passed: list[str] = [ctx_reshape.output[0]]
    top = _skip_back(g, ctx_reshape.input[0], {"Transpose"}, passed)
    pv = g.writers.get(top)
    if pv is None or pv.op_type != "MatMul" or g.matmul_weight(pv) is not None or len(passed) < 2:
        return None
    passed.append(pv.output[0])
    where = f"attention -> {node_key(out)}"
    v = _projection(g, pv.input[1])
    if isinstance(v, str):
        return f"{where}: value path: {v}; skipped"
    scores = _scores_matmul(g, pv.input[0], passed)
    if scores is None:
        return f"{where}: no Q @ K MatMul found upstream of the attention probabilities; skipped"
    q, k = _projection(g, scores.input[0]), _projection(g, scores.input[1])
    if isinstance(q, str) or isinstance(k, str):
        return f"{where}: query/key path: {q if isinstance(q, str) else k}; skipped"
    widths = {int(g.inits[p.weight].dims[1]) for p in (q, k, v)}
    width = int(wo.dims[0])
    if widths != {width}:
        return f"{where}: Q/K/V widths {sorted(widths)} do not match Wo rows {width}; skipped"
    layouts = []
    for p in (q, k, v):
        layout = _shape_layout(g, g.by_key[p.reshape])
        if layout is None or len(layout) != 4:
            return f"{where}: Reshape {p.reshape!r} shape is not a 4-element constant/Concat; skipped"
        layouts.append(layout)
    heads = _heads_from(layouts, width, num_heads)
    if isinstance(heads, str):
        return f"{where}: {heads}; skipped"
    dim = width // heads
    for p, layout in zip((q, k, v), layouts):
        (piece_h, _, h), (_, _, d) = layout[2], layout[3]
        if h not in (heads, -1) or (h == heads and piece_h is None) or d not in (dim, -1) or h == d == -1:
            return f"{where}: Reshape {p.reshape!r} shape {[e[2] for e in layout]} is not [B, S, {heads}|-1, {dim}|-1]; skipped"
    ctx_layout = _shape_layout(g, ctx_reshape)
    if ctx_layout is None or len(ctx_layout) != 3 or ctx_layout[2][2] not in (width, -1) or (
            ctx_layout[2][2] == width and ctx_layout[2][0] is None):
        shown = None if ctx_layout is None else [e[2] for e in ctx_layout]
        return f"{where}: context Reshape {node_key(ctx_reshape)!r} shape {shown} is not [B, S, {width}|-1]; skipped"
    tensors = set(passed) | set(q.tensors) | set(k.tensors) | set(v.tensors)
    exposed = sorted(tensors & g.outputs)
    if exposed:
        return f"{where}: head-shaped tensor {exposed[0]!r} is a graph output; skipped"
    return AttentionBlock(q=q, k=k, v=v, out=node_key(out), wo=wo.name, context_reshape=node_key(ctx_reshape),
                          context=out.input[0], num_heads=heads, head_dim=dim, tensors=tuple(sorted(tensors)))


def find_attention_blocks(model: onnx.ModelProto, num_heads: int | None = None) -> tuple[list[AttentionBlock], list[str]]:
    """The attention blocks of ``model`` in graph order, and why attention-like structures were skipped."""
    g = Graph(model)
    blocks: list[AttentionBlock] = []
    notes: list[str] = []
    for node in model.graph.node:
        found = _block_at(g, node, num_heads)
        if isinstance(found, AttentionBlock):
            blocks.append(found)
        elif isinstance(found, str):
            notes.append(found)
    return blocks, notes


def _context_rows(model: onnx.ModelProto, blocks: list[AttentionBlock], batches: Sequence[Feeds],
                  max_rows: int = _MAX_ROWS) -> list[np.ndarray]:
    """Per block: the context tensor (the output projection's input) over the non-padding calibration
    tokens, ``[tokens, H*D]``, evenly subsampled to at most ``max_rows`` rows."""
    rows: list[list[np.ndarray]] = [[] for _ in blocks]
    for feeds, values in ir.probe(model, batches, sorted({b.context for b in blocks}), error=PruningError):
        mask = feeds.get("attention_mask")
        for b, block in enumerate(blocks):
            ctx = np.asarray(values[block.context], dtype=np.float64)
            flat = ctx.reshape(-1, ctx.shape[-1])
            if mask is not None and tuple(np.shape(mask)) == ctx.shape[:-1]:
                flat = flat[np.asarray(mask).reshape(-1) != 0]
            rows[b].append(flat)
    out = []
    for parts in rows:
        x = np.concatenate(parts)
        out.append(x[np.linspace(0, len(x) - 1, max_rows).astype(int)] if len(x) > max_rows else x)
    return out


def _refit_wo(ctx: np.ndarray, wo: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Rows of Wo for the kept heads, re-fitted by least squares so that the kept context reproduces
    the full projection ``ctx @ Wo`` on the calibration tokens; (rows, error before, error after)."""
    target = ctx @ wo
    sliced = wo[cols]
    before = relative_mse(ctx[:, cols] @ sliced, target)
    fitted, _ = refit_rows(ctx[:, cols], target, with_bias=False)
    after = relative_mse(ctx[:, cols] @ fitted, target)
    return (fitted, before, after) if after < before else (sliced, before, before)


class _Editor:
    """Adds uniquely named initializers and nodes to a model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.names = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {
            i.name for i in model.graph.input}
        self.before: dict[str, list[onnx.NodeProto]] = {}  # node key -> new nodes to insert before it

    def fresh(self, base: str) -> str:
        name, n = f"{base}_heads", 1
        while name in self.names:
            n += 1
            name = f"{base}_heads{n}"
        self.names.add(name)
        return name

    def init(self, base: str, value: np.ndarray, like: np.ndarray) -> str:
        name = self.fresh(base)
        array = np.ascontiguousarray(value.astype(like.dtype))
        self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _rewrite_shape(g: Graph, edit: _Editor, reshape: onnx.NodeProto, index: int, new: int) -> None:
    """Point ``reshape`` at a new shape whose element ``index`` is ``new`` (shared constants untouched)."""
    layout = _shape_layout(g, reshape)
    if layout is None:
        raise InternalError(f"shape of {node_key(reshape)!r} changed between matching and pruning")
    piece, offset, _ = layout[index]
    if piece is None:
        raise InternalError(f"shape element {index} of {node_key(reshape)!r} is not constant")
    value = g.const(piece)
    assert value is not None
    flat = value.copy().reshape(-1)
    flat[offset] = new
    name = edit.init(piece, flat.reshape(value.shape), value)
    if piece == reshape.input[1]:
        reshape.input[1] = name
        return
    concat = g.writers[reshape.input[1]]
    copy = onnx.NodeProto()
    copy.CopyFrom(concat)
    copy.name = edit.fresh(concat.name or "Concat")
    for i, inp in enumerate(copy.input):
        if inp == piece:
            copy.input[i] = name
    copy.output[0] = edit.fresh(concat.output[0])
    reshape.input[1] = copy.output[0]
    edit.before.setdefault(node_key(reshape), []).append(copy)


def _prune_block(g: Graph, edit: _Editor, block: AttentionBlock, keep: np.ndarray,
                 wo_rows: np.ndarray | None = None) -> tuple[int, int]:
    """Slice one block of the model behind ``g``/``edit`` in place; (params before, after)."""
    dim, heads = block.head_dim, block.num_heads
    cols = np.concatenate([np.arange(h * dim, (h + 1) * dim) for h in keep])
    before = after = 0
    for proj in (block.q, block.k, block.v):
        matmul = g.by_key[proj.matmul]
        w = numpy_helper.to_array(g.inits[proj.weight])
        matmul.input[1] = edit.init(proj.weight, w[:, cols], w)
        before, after = before + w.size, after + w.shape[0] * len(cols)
        if proj.bias is not None and proj.bias_add is not None:
            add = g.by_key[proj.bias_add]
            b = g.const(proj.bias)
            assert b is not None
            new_bias = edit.init(proj.bias, b[cols], b)
            for i, inp in enumerate(add.input):
                if inp == proj.bias:
                    add.input[i] = new_bias
            before, after = before + b.size, after + len(cols)
        reshape = g.by_key[proj.reshape]
        layout = _shape_layout(g, reshape)
        if layout is not None and layout[2][2] == heads:
            _rewrite_shape(g, edit, reshape, 2, len(keep))
    wo = numpy_helper.to_array(g.inits[block.wo])
    rows = wo[cols] if wo_rows is None else wo_rows.astype(wo.dtype)
    g.by_key[block.out].input[1] = edit.init(block.wo, rows, wo)
    before, after = before + wo.size, after + len(cols) * wo.shape[1]
    ctx = g.by_key[block.context_reshape]
    layout = _shape_layout(g, ctx)
    if layout is not None and layout[2][2] == heads * dim:
        _rewrite_shape(g, edit, ctx, 2, len(keep) * dim)
    return before, after


def prune_heads(model: onnx.ModelProto, ratio: float, batches: Sequence[Feeds], *,
                num_heads: int | None = None, refit: bool = True,
                ratios: Mapping[str, float] | None = None) -> PruneResult:
    """Remove the ``round(ratio * H)`` least important heads (at least one kept) of every attention block.

    A head's importance is the L2 norm of its slice of the context tensor (the input of the output
    projection) over the calibration tokens, padding dropped via ``attention_mask``, times the
    Frobenius norm of its rows of Wo. All blocks are scored once on the input model. ``num_heads``
    is needed only when the reshape constants spell neither H nor D; when given it must agree
    with them. With ``refit`` the kept rows of Wo are re-fitted by least squares so the kept heads
    reproduce the full projection on the calibration tokens (kept only when the error drops).
    Blocks that are not matched are reported in ``notes`` and left as they are. ``ratios``
    overrides the ratio per block, keyed by its output-projection MatMul (``AttentionBlock.out``);
    with it, ``ratio`` may be 0 (blocks not named keep their heads).
    """
    check_ratios(ratio, ratios, "attention heads")
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise PruningError(f"num_heads is {num_heads!r}; expected a positive int or None",
                           hint="num_heads is the head count of every attention block, e.g. 12")
    need_batches(batches, "prune_heads")
    blocks, notes = find_attention_blocks(model, num_heads)
    pruned = ir.copy(model)
    if not blocks:
        notes.append("no supported attention block found; model unchanged")
        return PruneResult(model=pruned, method="heads", layers=(), notes=tuple(notes))
    ratios = dict(ratios or {})
    unknown_units(ratios, [b.out for b in blocks], "attention blocks")
    blocks = [b for b in blocks if ratios.get(b.out, ratio) > 0]
    if not blocks:
        return PruneResult(model=pruned, method="heads", layers=(), notes=tuple(notes))
    contexts = _context_rows(model, blocks, batches)
    norms = [np.sqrt(np.sum(np.square(c.reshape(len(c), b.num_heads, b.head_dim)), axis=(0, 2)))
             for c, b in zip(contexts, blocks)]
    g = Graph(pruned)
    edit = _Editor(pruned)
    layers: list[dict[str, Any]] = []
    for block, norm, ctx in zip(blocks, norms, contexts):
        heads, dim = block.num_heads, block.head_dim
        block_ratio = float(ratios.get(block.out, ratio))
        drop = int(round(block_ratio * heads))
        if drop >= heads:
            drop = heads - 1
            notes.append(f"{block.out}: ratio {block_ratio} would remove all {heads} heads; kept 1")
        wo = numpy_helper.to_array(g.inits[block.wo]).astype(np.float64)
        row_norms = np.linalg.norm(wo.reshape(heads, dim, -1), axis=(1, 2))
        scores = norm * row_norms
        keep = np.sort(np.argsort(scores, kind="stable")[drop:])
        cols = np.concatenate([np.arange(h * dim, (h + 1) * dim) for h in keep])
        rows, err_before, err_after = (_refit_wo(ctx, wo, cols) if refit and drop
                                       else (wo[cols], 0.0, 0.0))
        before, after = _prune_block(g, edit, block, keep, rows)
        log.info("%s: %d -> %d heads, recon error %.3g -> %.3g", block.out, heads, len(keep), err_before, err_after)
        layers.append({"node": block.out, "op_type": "Attention", "q": block.q.matmul, "k": block.k.matmul,
                       "v": block.v.matmul, "o": block.out, "ratio": block_ratio, "before": heads,
                       "after": int(len(keep)), "heads_before": heads, "heads_after": int(len(keep)),
                       "head_dim": dim, "kept_heads": [int(h) for h in keep],
                       "scores": [float(s) for s in scores], "params_before": before, "params_after": after,
                       "recon_before": err_before, "recon_after": err_after, "refit": err_after < err_before})
    nodes = []
    for node in pruned.graph.node:
        nodes.extend(edit.before.get(node_key(node), []))
        nodes.append(node)
    del pruned.graph.node[:]
    pruned.graph.node.extend(nodes)
    stale = {t for b in blocks for t in b.tensors}
    ir.forget_shapes(pruned, stale)
    ir.drop_dead(pruned)
    ir.check(pruned, "head-pruned")
    _smoke_run(pruned, batches[0])
    log.info("prune_heads: %d -> %d params", params(model), params(pruned))
    return PruneResult(model=pruned, method="heads", layers=tuple(layers), notes=tuple(notes))


def _smoke_run(model: onnx.ModelProto, feeds: Feeds) -> None:
    """Run the pruned model once on CPU; a failure here is a bug in the rewrite, not the caller's."""
    try:
        ir.outputs_on(model, [feeds])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InternalError(f"head-pruned model does not run in onnxruntime: {exc}") from exc
