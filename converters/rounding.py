"""Layer-wise reconstruction of int8 weight rounding on the calibration data (GPTQ / OBQ class).

Rounding every weight to its nearest int8 level is optimal weight by weight, not layer by layer.
For a layer ``y = W x`` the expected squared output error over the calibration inputs is
``tr((Q - W) H (Q - W)^T)`` with ``H = E[x x^T]``. Quantizing the input dimension one column at a
time and spreading each column's rounding error over the columns not yet quantized, weighted by
``H^-1`` (the optimal brain quantizer; Frantar et al., "GPTQ", 2023), lowers that error without any
training, in numpy. It matters where weights are few or coarse: depthwise convolutions (9 weights
per channel) and the 7-bit weights of the ``u8s7`` graph.

The per-channel scales are kept as plain rounding sets them (``max|w| / qmax``), and each row's
largest weight stays at ``±qmax``, so the Q/DQ writer, which derives its scales from the weights it
is given, reproduces exactly the levels chosen here. Because the error being minimised includes
its mean, a reconstructed layer needs no separate bias correction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

#: Positions (pixels or tokens) per batch that enter the input statistics; more cost time, not accuracy.
#: A depthwise channel has only kh*kw inputs, so far fewer positions estimate its statistics as well.
POSITIONS_PER_BATCH = 512
DEPTHWISE_POSITIONS_PER_BATCH = 128
#: Dampening of the input statistics, relative to their mean diagonal (GPTQ's default).
DAMPING = 0.01
#: Columns quantized between two deferred updates of the remaining ones (GPTQ's block size).
BLOCK = 128


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _ints(node: onnx.NodeProto, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    return next((tuple(int(v) for v in a.ints) for a in node.attribute if a.name == name), default)


def _text(node: onnx.NodeProto, name: str, default: str) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == name), default)


@dataclass(frozen=True)
class _Layer:
    """How a node's input becomes rows of the ``H`` statistics (the columns its weight multiplies)."""

    node: str
    op_type: str
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    depthwise: bool = False
    transposed: bool = False  # weight stored [K, out] (MatMul, Gemm without transB)


def layer_of(node: onnx.NodeProto, weight: np.ndarray) -> _Layer | None:
    """The reconstruction layout of ``node``, or None when it is not supported (grouped, dilated, 3-D)."""
    if node.op_type == "Conv":
        group = _int(node, "group", 1)
        if weight.ndim != 4 or _ints(node, "dilations", (1, 1)) != (1, 1) or _text(node, "auto_pad", "NOTSET") != "NOTSET":
            return None
        depthwise = group > 1 and group == weight.shape[0] and weight.shape[1] == 1
        if group != 1 and not depthwise:
            return None
        sh, sw = _ints(node, "strides", (1, 1))
        t, l, b, r = _ints(node, "pads", (0, 0, 0, 0))
        return _Layer(node.name, "Conv", (int(weight.shape[2]), int(weight.shape[3])), (sh, sw), (t, l, b, r), depthwise)
    if node.op_type == "Gemm":
        if _int(node, "transA", 0):
            return None
        return _Layer(node.name, "Gemm", transposed=not _int(node, "transB", 0))
    if node.op_type == "MatMul" and weight.ndim == 2:
        return _Layer(node.name, "MatMul", transposed=True)
    return None


def _columns(layer: _Layer, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most :data:`POSITIONS_PER_BATCH` rows of input columns: ``[positions, K]``, or
    ``[channels, positions, kh*kw]`` for a depthwise convolution (positions sampled before gathering)."""
    if layer.op_type != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) > POSITIONS_PER_BATCH:
            flat = flat[np.sort(rng.choice(len(flat), POSITIONS_PER_BATCH, replace=False))]
        return flat.astype(np.float32)
    (kh, kw), (sh, sw), (t, l, b, r) = layer.kernel, layer.strides, layer.pads
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(layer.pads):  # pointwise: pick pixels directly
        n, c, hgt, wid = x.shape
        total = n * hgt * wid
        picked = np.sort(rng.choice(total, POSITIONS_PER_BATCH, replace=False)) if total > POSITIONS_PER_BATCH \
            else np.arange(total)
        i, rest = np.divmod(picked, hgt * wid)
        return x[i, :, rest // wid, rest % wid].astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    n, c, oh, ow = windows.shape[:4]
    total = n * oh * ow
    cap = DEPTHWISE_POSITIONS_PER_BATCH if layer.depthwise else POSITIONS_PER_BATCH
    picked = np.sort(rng.choice(total, cap, replace=False)) if total > cap else np.arange(total)
    i, rest = np.divmod(picked, oh * ow)
    y, z = np.divmod(rest, ow)
    cols = windows[i, :, y, z].astype(np.float32)  # [positions, C, kh, kw]
    if layer.depthwise:
        return cols.reshape(len(picked), c, kh * kw).transpose(1, 0, 2)
    return cols.reshape(len(picked), -1)


@dataclass
class InputStatistics:
    """Running ``E[x x^T]`` of each layer's input columns, fed by the calibration pass (an observer)."""

    layers: dict[str, list[_Layer]]  # input tensor -> layers reading it
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def __call__(self, name: str, value: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed + self.counts.get(name, 0))
        for layer in self.layers.get(name, ()):
            cols = _columns(layer, value, rng)
            gram = (np.matmul(cols.transpose(0, 2, 1), cols) if cols.ndim == 3 else cols.T @ cols).astype(np.float64)
            self.sums[layer.node] = self.sums.get(layer.node, 0.0) + gram
            self.counts[layer.node] = self.counts.get(layer.node, 0) + cols.shape[-2]

    def hessian(self, node: str) -> np.ndarray | None:
        return self.sums[node] / max(self.counts[node], 1) if node in self.sums else None


def statistics_for(model: onnx.ModelProto, nodes: list[str] | tuple[str, ...]) -> InputStatistics:
    inits = {i.name: i for i in model.graph.initializer}
    chosen = set(nodes)
    layers: dict[str, list[_Layer]] = {}
    for node in model.graph.node:
        if node.name in chosen and len(node.input) > 1 and node.input[1] in inits:
            layer = layer_of(node, numpy_helper.to_array(inits[node.input[1]]))
            if layer is not None:
                layers.setdefault(node.input[0], []).append(layer)
    return InputStatistics(layers)


def _quantize_rows(w: np.ndarray, h: np.ndarray, qmax: int) -> np.ndarray:
    """GPTQ on ``w`` ``[rows, K]`` with one ``h`` ``[K, K]`` (or ``[rows, K, K]``): dequantized levels."""
    rows, k = w.shape
    w = w.astype(np.float64).copy()
    scale = np.maximum(np.abs(w).max(axis=1), 1e-30) / qmax
    keep = np.abs(w).argmax(axis=1)  # each row's largest weight stays at +-qmax: the scale is preserved
    keep_level = np.sign(w[np.arange(rows), keep]) * qmax
    h = np.array(h, dtype=np.float64)
    hs = h if h.ndim == 3 else h[None]
    diag = np.einsum("rkk->rk", hs)
    damp = DAMPING * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    hs = hs + damp[:, :, None] * np.eye(k)[None]
    inverse = np.linalg.inv(hs)
    upper = np.linalg.cholesky(inverse).transpose(0, 2, 1)  # H^-1 = U^T U, U upper triangular
    q = np.empty_like(w)
    shared = upper.shape[0] == 1
    for start in range(0, k, BLOCK):  # GPTQ's lazy batch updates: the columns after a block at once
        stop = min(start + BLOCK, k)
        errors = np.empty((rows, stop - start))
        for j in range(start, stop):
            level = np.clip(np.rint(w[:, j] / scale), -qmax, qmax)
            fixed = keep == j
            level[fixed] = keep_level[fixed]
            q[:, j] = level
            u = upper[0] if shared else None
            diag_j = u[j, j] if u is not None else upper[:, j, j]
            err = (w[:, j] - level * scale) / diag_j
            errors[:, j - start] = err
            w[:, j + 1 : stop] -= err[:, None] * (u[j, j + 1 : stop] if u is not None else upper[:, j, j + 1 : stop])
        if stop < k:
            if shared:
                w[:, stop:] -= errors @ upper[0, start:stop, stop:]
            else:
                w[:, stop:] -= np.einsum("rb,rbk->rk", errors, upper[:, start:stop, stop:])
    return (q * scale[:, None]).astype(np.float32)


def reconstruct(weight: np.ndarray, layer: _Layer, hessian: np.ndarray, qmax: int) -> np.ndarray:
    """``weight`` with its int8 levels chosen to minimise the layer's output error (same shape)."""
    w = weight.astype(np.float64)
    if layer.op_type == "Conv":
        rows = w.reshape(w.shape[0], -1)
    else:
        rows = w.T if layer.transposed else w
    out = _quantize_rows(rows, hessian, qmax)
    if layer.op_type == "Conv":
        return out.reshape(weight.shape)
    return np.ascontiguousarray(out.T if layer.transposed else out)


def output_error(weight: np.ndarray, levels: np.ndarray, layer: _Layer, hessian: np.ndarray) -> float:
    """``E[|(Q - W) x|^2]`` of a layer whose weights ``weight`` are replaced by ``levels``."""
    d = (levels.astype(np.float64) - weight.astype(np.float64))
    rows = d.reshape(d.shape[0], -1) if layer.op_type == "Conv" else (d.T if layer.transposed else d)
    if hessian.ndim == 3:
        return float(np.einsum("rk,rkl,rl->", rows, hessian, rows))
    return float(np.einsum("rk,kl,rl->", rows, hessian, rows))


__all__ = ["InputStatistics", "layer_of", "output_error", "reconstruct", "statistics_for"]
