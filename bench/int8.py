"""Benchmark: edge-sdk's int8 graphs against onnxruntime's own quantizers, per ISA.

    python -m bench.int8 [--out build/bench/int8.json] [--quick] [--models KEY ...]
    python -m bench.int8_avx2          # what an x86 CPU without VNNI computes (qemu), demo image model

Models (built on first use and cached under ``build/bench/``, see ``bench/_models.py``; a model
whose package or files are missing is skipped with a message):

* ``minilm``: all-MiniLM-L6-v2 with attention-mask mean pooling -> ``[batch, 384]``, every text
  padded to 128 tokens. Calibration texts: ``demo.corpus`` split "train"; held-out texts: split
  "test" with another seed. Fidelity: mean (and min) cosine between int8 and fp32 embeddings.
* ``lite0`` / ``lite1`` / ``lite2``: EfficientNet-Lite0 / Lite1 / Lite2 with their ImageNet heads at
  their native resolutions 224 / 240 / 260, on synthetic surfaces from ``demo.defects``
  (calibration and held-out with different seeds) preprocessed by ``runtime.preprocess.image``
  (RGB, ``(x - 127) / 128``). Fidelity: top-1 agreement with fp32, whether int8's top 5 holds fp32's
  top 1, mean logits cosine. The ImageNet head is rarely decisive on these surfaces (see the fp32
  logit margin printed with each table), which makes top-1 agreement a hard measure.
* ``demo-image`` (surface-defects) and ``demo-text`` (fault-reports): the demo's models from
  ``build/demo/{image,text}`` (``make demo``), calibrated on their ``calib`` data and measured on
  their labelled ``test`` data: agreement, cosine and accuracy (labels from the folder names /
  the TSV, indices from ``labels.txt``). The text model is padded to 128 tokens.

Rows, all on onnxruntime CPU (2 intra-op threads, ORT_ENABLE_ALL):

1. **ORT fp32**: the baseline every ratio and every fidelity figure is taken against, timed in
   the same run.
2. **ORT static** (``quantize_static``, QDQ, per-channel weights) for each calibration method
   MinMax / Entropy / Percentile, type U8S8 (uint8 activations, int8 weights); ``--ort-types``
   adds S8S8 (int8 activations) and "U8S8 rr" (``reduce_range``: 7-bit weights, onnxruntime's
   advice for x86 without VNNI). Each method is calibrated once (``calibration_cache_path``); the other
   types reuse its ranges, so their calibration time is the calibration alone plus their own
   quantization. On the text models only MatMul / Gemm are quantized. The input first goes
   through ``quant_pre_process`` (symbolic shape inference with ``auto_merge=True``, then
   onnxruntime's graph optimizations), as onnxruntime recommends. Calibration runs 4 batches at a
   time (``CalibStridedMinMax``): in one go onnxruntime's calibrators keep every intermediate
   tensor of every batch in memory. A method that raises is reported as failed, not fatal. The
   best row by fidelity is timed.
3. **ORT dynamic** (text models; int8 weights, MatMul), on the pre-processed model too.
4. **edge-sdk u8s8 / u8s7 / s8s8**: ``converters.quantize.prepare_int8`` with the SDK's default
   method (``auto``; smoothing for transformers, cross-layer equalization for CNNs, bias
   correction, attention-mask-aware statistics, the input statistics of layer-wise weight
   rounding) then ``build_variant`` per graph with nearest and with reconstructed
   (``converters.rounding``) weights, on the plain fp32 export. Like ``convert``, each graph
   keeps the reconstructed rounding only where it measures strictly better (here: exact run on
   the held-out data; accuracy where labels exist, else agreement, cosine for MiniLM; convert
   measures on its validation data), and the targets are read on the kept one. No layer is
   returned to float (convert's mixed precision is not run). u8s8 is the CPU graph for x86 with VNNI and Arm64, u8s7 the one for x86 without VNNI,
   s8s8 TensorRT's: its onnxruntime CPU speed means nothing, so it is not timed and only its
   exact fidelity is measured. ``runtime.backends.this_cpu_int8_graph`` names the CPU graph this
   machine serves.

Fidelity is given twice for int8 Q/DQ graphs: **fused**, as onnxruntime's integer kernels compute
it on this machine (what a device with this ISA runs), and **exact**, as the Q/DQ graph means
(``converters.reference.run_reference``: the same on every CPU; what TensorRT and an exact CPU
kernel compute). On x86 without VNNI the fused U8S8 kernels saturate; ``bench.int8_avx2`` shows it.

Samples: 128 calibration / 160 held-out for the pretrained models (``--calibration`` /
``--held-out``), 200 / 200 for the demo models (demo-image has 200 / 150; the classes are
interleaved), batches of 8. Calibration time is one wall-clock measurement. Latency (b1) is a median of single-sample runs,
throughput (b8) is 8 / the median batch-of-8 time. Timing goes round-robin over the timed rows of
a model, in short blocks (pause, untimed run, timed runs), so that load from other processes hits
every row alike and an idle session's spinning thread pool is not charged to the next. The machine
is shared: read the ratios, not the absolute numbers. Nothing is asserted; each model ends with a
line saying which of the int8 issue's targets are met on this ISA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench._log import Log
from bench import _models

Feeds = dict[str, np.ndarray]
BATCH = 8
CAL_SEED = {"minilm": 1101, "efficientnet": 2002}
HELD_SEED = {"minilm": 3303, "efficientnet": 3003}
MODEL_KEYS = ("minilm", "minilm-dynamo", "lite0", "lite0-ts", "lite1", "lite2", "demo-image", "demo-text")
DEMO_ROOT = Path("build/demo")
# Sample counts: the pretrained models' calibration is kept at 128 so that the whole run fits in
# ~25 minutes on two cores (edge-sdk's calibration pass is the slowest part); the demo models are
# calibrated on 200 samples (all of demo-image's; convert would take up to 256).
DEFAULT_CAL, DEFAULT_HELD = 128, 160
DEMO_CAL, DEMO_HELD = 200, 200

# The int8 issue's targets.
TARGET_AGREEMENT = {"lite0": 97.0, "lite1": 97.0, "lite2": 97.0, "demo-image": 99.0}
TARGET_ACCURACY_DROP = {"demo-image": 0.5, "demo-text": 0.5}
TARGET_COSINE = {"minilm": 0.997}
TARGET_SPEEDUP = {True: 2.3, False: 1.7}  # b8 vs ORT fp32, with / without VNNI
#: fp32 top-1 logit minus top-2 logit from which a sample counts as "confident" (diagnostic only).
CONFIDENT_MARGIN = 0.5
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
ORT_TYPES = ("U8S8", "S8S8", "U8S8 rr")  # rr: reduce_range (7-bit weights)
DEFAULT_ORT_TYPES = ("U8S8",)
S8S8_NOTE = "TensorRT graph: only its exact fidelity matters; ORT CPU speed meaningless, not timed"


@dataclass
class Row:
    name: str
    family: str  # "fp32", "ort-static", "ort-dynamic", "edge"
    graph: str  # "fp32"; ORT: "U8S8", "U8S8 rr", "S8S8", "dynamic"; edge-sdk: "u8s8", "u8s7", "s8s8"
    model: bytes | None = None
    calib_s: float | None = None
    fused: dict[str, Any] = field(default_factory=dict)  # fidelity as onnxruntime's fused kernels compute it here
    exact: dict[str, Any] = field(default_factory=dict)  # fidelity as the exact reference computes the graph
    b1_ms: float | None = None
    b8_sps: float | None = None
    ratio: float | None = None
    error: str | None = None
    note: str = ""
    timed: bool = False
    served: bool = False  # the CPU graph this machine serves (edge-sdk rows)
    rounding: str = ""  # edge-sdk: "nearest" or "reconstructed" (layer-wise, converters.rounding) weights
    chosen: bool = False  # edge-sdk: the rounding convert keeps for this graph (the better measured one)

    def out(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("model")
        return d


@dataclass
class Bench:
    """One model and its data: ``task`` is "embedding", "imagenet" or "classifier"."""

    key: str
    title: str
    kind: str  # "text" or "image"
    task: str
    path: Path
    cal: list[Feeds]
    held: list[Feeds]
    labels: np.ndarray | None = None
    classes: list[str] | None = None


log = Log("int8")


# --- ISA ----------------------------------------------------------------------------------------


def isa_info() -> dict[str, Any]:
    import devices
    from runtime.backends import VNNI_FEATURES, this_cpu_int8_graph

    info = devices.detect()
    vnni = sorted(info.cpu_flags & VNNI_FEATURES)
    graph, reason = this_cpu_int8_graph()
    label = f"{info.arch} " + (f"with VNNI ({', '.join(vnni)})" if vnni else "without VNNI")
    return {"arch": info.arch, "vnni": bool(vnni), "vnni_features": vnni, "cpu_flags": sorted(info.cpu_flags),
            "label": label, "served_graph": graph, "served_reason": reason}


# --- sessions, fidelity, timing ---------------------------------------------------------------


def session(model: bytes | str, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_all(sess: Any, batches: Sequence[Feeds]) -> np.ndarray:
    name = sess.get_outputs()[0].name
    return np.concatenate([sess.run([name], b)[0] for b in batches]).astype(np.float64)


def run_exact(model: bytes, batches: Sequence[Feeds]) -> np.ndarray:
    import onnx

    from converters.reference import run_reference

    return run_reference(onnx.load_from_string(model), batches).astype(np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def fidelity(task: str, reference: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    cos = cosines(reference, got)
    out: dict[str, Any] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if task == "embedding":
        return out
    agree = reference.argmax(1) == got.argmax(1)
    out["top1_agreement"] = float(100.0 * agree.mean())
    if task == "imagenet":
        top5 = np.argsort(got, axis=1)[:, -5:] == reference.argmax(1)[:, None]
        ordered = np.sort(reference, axis=1)
        confident = ordered[:, -1] - ordered[:, -2] >= CONFIDENT_MARGIN
        out.update(top5_contains_fp32_top1=float(100.0 * top5.any(1).mean()),
                   top1_agreement_confident=float(100.0 * agree[confident].mean()) if confident.any() else None)
    if labels is not None:
        out["accuracy"] = float(100.0 * np.mean(got.argmax(1) == labels))
    return out


def score(task: str, fid: dict[str, Any]) -> tuple[float, float]:
    """Sort key: top-1 agreement first for classifiers, then mean cosine."""
    if not fid:
        return (-1.0, -1.0)
    return (fid["mean_cosine"], 0.0) if task == "embedding" else (fid["top1_agreement"], fid["mean_cosine"])


def _block(run: Callable[[], object], times: list[float], repeats: int) -> None:
    """One untimed run, then ``repeats`` timed ones (seconds appended to ``times``)."""
    time.sleep(0.02)  # let the thread pool of the session timed before this one stop spinning
    run()
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)


def time_round_robin(rows: list[Row], b1: Feeds, b8: Feeds, budget_s: float, min_rounds: int,
                     max_rounds: int, sessions: dict[str, Any] | None = None) -> None:
    """Fill ``b1_ms`` / ``b8_sps`` / ``ratio`` of the timed rows with medians over rounds that visit each in turn.

    Each visit is a short block (a pause, an untimed run, then timed runs): idle onnxruntime
    thread pools spin for a while after a run, and on two cores the previous session's spinning
    would otherwise be charged to the next one.
    """
    timed = [r for r in rows if r.model is not None and r.timed]
    sessions = dict(sessions or {})
    for r in timed:
        if r.name not in sessions and r.model is not None:
            sessions[r.name] = session(r.model)
    names = {r.name: sessions[r.name].get_outputs()[0].name for r in timed}
    b1_times: dict[str, list[float]] = {r.name: [] for r in timed}
    b8_times: dict[str, list[float]] = {r.name: [] for r in timed}
    for r in timed:  # warm-up: first runs allocate and pick kernels
        for feeds in (b1, b1, b8, b8):
            sessions[r.name].run([names[r.name]], feeds)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for r in timed:
            s, out = sessions[r.name], [names[r.name]]
            _block(lambda: s.run(out, b8), b8_times[r.name], 2)
            _block(lambda: s.run(out, b1), b1_times[r.name], 4)
        rounds += 1
    for r in timed:
        r.b1_ms = 1e3 * statistics.median(b1_times[r.name])
        r.b8_sps = BATCH / statistics.median(b8_times[r.name])
    base = next(r for r in timed if r.family == "fp32")
    for r in timed:
        r.ratio = r.b8_sps / base.b8_sps  # type: ignore[operator]
    log(f"timed {len(timed)} rows over {rounds} rounds in {time.perf_counter() - start:.0f} s")


# --- onnxruntime quantizers -------------------------------------------------------------------


class _Reader:
    """``CalibrationDataReader`` over a list of feeds, with the ``set_range`` that strided calibration uses."""

    def __init__(self, batches: Sequence[Feeds]) -> None:
        self._batches = list(batches)
        self._i, self._end = 0, len(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def get_next(self) -> Feeds | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return self._batches[self._i - 1]

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i, self._end = start_index, min(end_index, len(self._batches))

    def rewind(self) -> None:
        self._i, self._end = 0, len(self._batches)


def _stride(n_batches: int, most: int = 4) -> int:
    """Batches per ``CalibStridedMinMax`` chunk: the largest divisor of ``n_batches`` up to ``most``."""
    return max(d for d in range(1, most + 1) if n_batches % d == 0)


def ort_preprocessed(path: Path, tmp: Path) -> tuple[Path, str]:
    """``quant_pre_process`` output (the input itself if pre-processing fails)."""
    from onnxruntime.quantization import quant_pre_process

    out = tmp / f"{path.stem}.pre.onnx"
    # auto_merge: without it symbolic shape inference stops on MiniLM ("Incomplete symbolic shape inference").
    for how, kwargs in (("quant_pre_process(auto_merge=True)", {"auto_merge": True}),
                        ("quant_pre_process(skip_symbolic_shape=True)", {"skip_symbolic_shape": True})):
        try:
            with contextlib.chdir(tmp):  # symbolic shape inference drops temp files into the cwd
                quant_pre_process(str(path), str(out), **kwargs)
            return out, how
        except Exception as exc:
            log(f"{how} failed ({type(exc).__name__}: {exc}); trying the next setting")
    return path, "none (quant_pre_process failed)"


def ort_static_method(pre: Path, batches: Sequence[Feeds], method: str, op_types: list[str] | None,
                      tmp: Path, types: Sequence[str] = DEFAULT_ORT_TYPES) -> list[Row]:
    """One row per type for calibration ``method``: calibrated once, the other types reuse its ranges."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    cache = tmp / f"{pre.stem}.{method}.calibration.json"
    rows: list[Row] = []
    calibration_only: float | None = None
    for kind in types:
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(batches)
        row = Row(f"ORT static {method} {kind}", "ort-static", kind)
        out = tmp / f"{pre.stem}.static.{method}.{kind.replace(' ', '_')}.onnx"
        activation = QuantType.QInt8 if kind == "S8S8" else QuantType.QUInt8
        start = time.perf_counter()
        try:  # the calibrators print their progress: keep it out of the report
            with contextlib.chdir(tmp), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(pre), str(out), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    per_channel=True, reduce_range=kind == "U8S8 rr", activation_type=activation,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                    calibration_cache_path=str(cache),
                    # A few batches at a time: ORT's calibrators otherwise keep every intermediate
                    # tensor of every batch in memory (~16 GB for MiniLM at 256 x 128).
                    extra_options={"CalibStridedMinMax": _stride(len(batches))},
                )
        except Exception as exc:  # report, don't crash: e.g. Entropy's "Too many bins for data range"
            row.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
            row.calib_s = time.perf_counter() - start
            log(f"{row.name} failed after {row.calib_s:.1f} s: {row.error}")
            rows.append(row)
            if not cache.exists():
                break  # the calibration itself failed: every type would fail the same way
            continue
        seconds = time.perf_counter() - start
        if not rows:  # calibration + quantization
            row.calib_s = seconds
        else:  # quantization from the cached ranges: add the calibration alone
            if calibration_only is None:
                calibration_only = max(rows[0].calib_s - seconds, 0.0)  # type: ignore[operator]
            row.calib_s = calibration_only + seconds
            row.note = f"ranges of the {types[0]} run"
        row.model = out.read_bytes()
        rows.append(row)
    log(f"ORT static {method}: " + ", ".join(f"{r.graph} {'FAILED' if r.error else f'{r.calib_s:.1f} s'}"
                                              for r in rows))
    return rows


def ort_dynamic(pre: Path, tmp: Path) -> Row:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / f"{pre.stem}.dynamic.onnx"
    start = time.perf_counter()
    with contextlib.chdir(tmp):
        quantize_dynamic(str(pre), str(out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    return Row("ORT dynamic QInt8", "ort-dynamic", "dynamic", out.read_bytes(), time.perf_counter() - start,
               note="no calibration; activations quantized at run time")


# --- edge-sdk ---------------------------------------------------------------------------------

EDGE_NOTES = {"u8s8": "CPU graph: x86 with VNNI, Arm64", "u8s7": "CPU graph: x86 without VNNI", "s8s8": S8S8_NOTE}


def edge_int8(path: Path, batches: Sequence[Feeds], served: str, roundings: Sequence[str] = ("nearest", "reconstructed"),
              ) -> tuple[list[Row], dict[str, Any]]:
    """edge-sdk's three graphs from one ``prepare_int8`` (the SDK's default method, ``auto``)."""
    import onnx

    from converters.calibration.methods import CalibrationMethod
    from converters.ir import name_nodes
    from converters.qdq import Variant
    from converters.quantize import build_variant, prepare_int8

    from converters.canonical import canonicalize

    model, canonical = canonicalize(onnx.load(str(path)), batches[:1])  # as convert() does on load
    model = name_nodes(model)
    mask = "attention_mask" if "attention_mask" in batches[0] else None
    start = time.perf_counter()
    try:
        cal, placement = prepare_int8(model, batches, CalibrationMethod.AUTO, mask=mask)
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        log(f"edge-sdk prepare_int8 failed: {err}\n{traceback.format_exc()}")
        return [Row(f"edge-sdk {v.value}", "edge", v.value, error=err[:300]) for v in Variant], {"error": err[:300]}
    prepare_s = time.perf_counter() - start
    chosen: dict[str, int] = {}
    for r in cal.affine.values():
        chosen[r.method.value] = chosen.get(r.method.value, 0) + 1
    info: dict[str, Any] = {
        "canonical_nodes": [canonical["nodes_before"], canonical.get("nodes_after")],
        "family": placement.family, "quantized_nodes": len(placement.nodes), "smoothed": len(cal.smoothed),
        "equalized_pairs": len(cal.equalized), "bias_corrected": len(cal.bias_corrected),
        "range_fallbacks": len(cal.range_fallbacks), "tensors": len(cal.histograms),
        "prepare_s": round(prepare_s, 2), "calibrate_s": round(cal.seconds, 2), "auto_affine_methods": chosen,
    }
    reconstruct = cal.statistics is not None and bool(cal.statistics.sums) and "reconstructed" in roundings
    info["reconstruction_layers"] = len(cal.statistics.sums) if reconstruct and cal.statistics is not None else 0
    rows: list[Row] = []
    for variant in (Variant.U8S8, Variant.U8S7, Variant.S8S8):
        for rounding in ("nearest", "reconstructed") if reconstruct else ("nearest",):
            row = Row(f"edge-sdk {variant.value}" + (" rec" if rounding == "reconstructed" else ""), "edge",
                      variant.value, note=EDGE_NOTES[variant.value], served=variant.value == served,
                      rounding=rounding, chosen=not reconstruct)
            t = time.perf_counter()
            try:
                graph = build_variant(cal, placement, variant, reconstruction=rounding == "reconstructed")
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"[:300]
                log(f"edge-sdk build_variant({variant.value}, {rounding}) failed: {row.error}\n"
                    f"{traceback.format_exc()}")
            else:
                row.model = graph.SerializeToString()
                row.calib_s = prepare_s + time.perf_counter() - t
                if variant is Variant.S8S8 and rounding == "reconstructed":
                    # its 8-bit levels were reconstructed (and cached) for the u8s8 graph: count that work
                    pair = {r.rounding: r for r in rows if r.graph == "u8s8" and r.calib_s is not None}
                    if len(pair) == 2:
                        row.calib_s += max(pair["reconstructed"].calib_s - pair["nearest"].calib_s, 0.0)  # type: ignore[operator]
            rows.append(row)
    return rows, info


def choose_rounding(task: str, rows: list[Row]) -> None:
    """Mark per graph the rounding ``convert`` keeps: reconstructed only where it measures strictly
    better (convert: validation accuracy, else top-1 agreement; here on the held-out exact run, by
    accuracy where labels exist, else agreement, mean cosine for the embedding model)."""
    def key(r: Row) -> float:
        if not r.exact:
            return -1.0
        if "accuracy" in r.exact:
            return r.exact["accuracy"]
        return r.exact["mean_cosine"] if task == "embedding" else r.exact["top1_agreement"]

    for graph in ("u8s8", "u8s7", "s8s8"):
        pair = {r.rounding: r for r in rows if r.family == "edge" and r.graph == graph}
        if not pair:
            continue
        near, rec = pair.get("nearest"), pair.get("reconstructed")
        pick = rec if rec is not None and near is not None and key(rec) > key(near) else (near or rec)
        for r in pair.values():
            r.chosen = r is pick
            if rec is None:
                continue
            if r is rec:
                r.note = ("reconstructed rounding, kept (measures better); " if r.chosen else
                          "reconstructed rounding: no better, convert keeps nearest; ") + r.note
            else:
                r.note = ("nearest rounding, kept; " if r.chosen else
                          "nearest rounding: convert keeps the reconstructed one; ") + r.note


def save_chosen(rows: list[Row], folder: Path, stem: str) -> None:
    """The chosen edge-sdk graphs as ``folder/stem.GRAPH.onnx`` (+ ``stem.json``: their roundings)."""
    folder.mkdir(parents=True, exist_ok=True)
    roundings = {}
    for r in rows:
        if r.family == "edge" and r.chosen and r.model is not None:
            (folder / f"{stem}.{r.graph}.onnx").write_bytes(r.model)
            roundings[r.graph] = r.rounding
    (folder / f"{stem}.json").write_text(json.dumps({"rounding": roundings}) + "\n")


# --- data per model ---------------------------------------------------------------------------


def _chunks(feeds: Feeds) -> list[Feeds]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + BATCH] for k, v in feeds.items()} for i in range(0, n, BATCH)]


def _text_feeds(tok: Any, texts: list[str], inputs: set[str]) -> list[Feeds]:
    return [{k: v for k, v in _models.tokenize(tok, texts[i:i + BATCH]).items() if k in inputs}
            for i in range(0, len(texts), BATCH)]


def _input_names(path: Path) -> set[str]:
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def load_bench(key: str, cache: Path, n_cal: int, n_held: int) -> Bench:
    """The model ``key`` and its data; raises ``_models.ModelUnavailable`` when it cannot be had."""
    if key in ("minilm", "minilm-dynamo"):
        path = _models.minilm_onnx(cache, "dynamo" if key == "minilm-dynamo" else "torchscript").resolve()
        tok = _models.tokenizer()
        inputs = _input_names(path)
        cal = _text_feeds(tok, _models.sentences(CAL_SEED["minilm"], "train", n_cal), inputs)
        held = _text_feeds(tok, _models.sentences(HELD_SEED["minilm"], "test", n_held), inputs)
        flavour = "dynamo" if key == "minilm-dynamo" else "TorchScript"
        return Bench(key, f"MiniLM-L6 (all-MiniLM-L6-v2, mean pooled, sequence {_models.SEQUENCE}, {flavour} export)", "text",
                     "embedding", path, cal, held)
    if key in ("lite0", "lite0-ts", "lite1", "lite2"):
        variant = key.removesuffix("-ts")
        size = _models.efficientnet_size(variant)
        path = _models.efficientnet_onnx(cache, variant, "torchscript" if key.endswith("-ts") else "dynamo").resolve()
        cal_x = _models.cached_images(cache, CAL_SEED["efficientnet"], n_cal, size)
        held_x = _models.cached_images(cache, HELD_SEED["efficientnet"], n_held, size)
        flavour = "TorchScript" if key.endswith("-ts") else "dynamo"
        return Bench(key, f"EfficientNet-{variant.capitalize()} {size} (ImageNet, {flavour} export)", "image",
                     "imagenet", path,
                     _chunks({"image": cal_x}), _chunks({"image": held_x}))
    if key == "demo-image":
        path, cal_x, held_x, y, labels = _models.demo_image(DEMO_ROOT / "image")
        return Bench(key, f"demo surface-defects (EfficientNet-Lite0 + {len(labels)}-class head, 224)", "image",
                     "classifier", path.resolve(), _chunks({"image": cal_x[:n_cal]}),
                     _chunks({"image": held_x[:n_held]}), y[:n_held], labels)
    if key == "demo-text":
        path, cal_t, held_t, y, labels, tok_path = _models.demo_text(DEMO_ROOT / "text")
        tok = _models.tokenizer(_models.SEQUENCE, tok_path)
        inputs = _input_names(path)
        return Bench(key, f"demo fault-reports (MiniLM-L6 + {len(labels)}-class head, sequence {_models.SEQUENCE})",
                     "text", "classifier", path.resolve(), _text_feeds(tok, cal_t[:n_cal], inputs),
                     _text_feeds(tok, held_t[:n_held], inputs), y[:n_held], labels)
    raise ValueError(f"unknown model {key!r}; expected one of {MODEL_KEYS}")


def samples(batches: Sequence[Feeds]) -> int:
    return sum(len(next(iter(b.values()))) for b in batches)


# --- per model --------------------------------------------------------------------------------


def bench_model(b: Bench, args: argparse.Namespace, isa: dict[str, Any], tmp: Path) -> dict[str, Any]:
    tmp = tmp / b.key  # the demo models are both model.onnx: keep their ORT files and calibration caches apart
    tmp.mkdir(parents=True, exist_ok=True)
    log(f"{b.title}: {samples(b.cal)} calibration / {samples(b.held)} held-out samples")
    rows = [Row("ORT fp32", "fp32", "fp32", b.path.read_bytes(), note="baseline", timed=True)]
    fp32 = session(b.path.read_bytes())
    reference = run_all(fp32, b.held)
    rows[0].fused = fidelity(b.task, reference, reference, b.labels)

    pre, pre_how = ort_preprocessed(b.path, tmp)
    log(f"ORT pre-processing: {pre_how}")
    op_types = ["MatMul", "Gemm"] if b.kind == "text" else None
    for method in args.ort_methods:
        rows.extend(ort_static_method(pre, b.cal, method, op_types, tmp, args.ort_types))
        gc.collect()
    if b.kind == "text":
        rows.append(ort_dynamic(pre, tmp))

    edge, edge_info = edge_int8(b.path, b.cal, isa["served_graph"], args.rounding)
    rows.extend(edge)
    log(f"edge-sdk: prepare_int8 {edge_info.get('prepare_s')} s; {edge_info}")

    # Fidelity: exact on every edge-sdk graph (which picks each graph's rounding, as convert does),
    # fused on the ORT graphs and the chosen edge-sdk CPU graphs (not the TensorRT one); exact on
    # the best ORT static graph too. The sessions are kept for the timing.
    for r in rows:
        if r.family == "edge" and r.model is not None:
            try:
                r.exact = fidelity(b.task, reference, run_exact(r.model, b.held), b.labels)
            except Exception as exc:
                r.error, r.model = f"{type(exc).__name__}: {exc}"[:300], None
                log(f"{r.name}: {r.error}")
    choose_rounding(b.task, rows)
    if b.key == "demo-image":  # for bench.int8_avx2
        save_chosen(rows, args.cache / "graphs", "demo_image")
    sessions = {rows[0].name: fp32}
    for r in rows[1:]:
        if r.model is None or r.graph == "s8s8" or (r.family == "edge" and not r.chosen):
            continue
        try:
            sessions[r.name] = session(r.model)
            r.fused = fidelity(b.task, reference, run_all(sessions[r.name], b.held), b.labels)
        except Exception as exc:
            r.error, r.model = f"{type(exc).__name__}: {exc}"[:300], None
            log(f"{r.name}: {r.error}")
    ort_rows = [r for r in rows if r.family.startswith("ort") and r.fused]
    best_static = max((r for r in ort_rows if r.family == "ort-static"), key=lambda r: score(b.task, r.fused),
                      default=None)
    best_ort = max(ort_rows, key=lambda r: score(b.task, r.fused), default=None)
    if best_static is not None:
        best_static.timed = True
        best_static.note = (best_static.note + "; " if best_static.note else "") + "best ORT static, timed"
        try:
            assert best_static.model is not None
            best_static.exact = fidelity(b.task, reference, run_exact(best_static.model, b.held), b.labels)
        except Exception as exc:
            log(f"exact reference of {best_static.name} failed: {type(exc).__name__}: {exc}")
    for kind in args.ort_types:  # also time the best of each other type: ORT's S8S8 kernels run at another speed
        best_kind = max((r for r in ort_rows if r.family == "ort-static" and r.graph == kind),
                        key=lambda r: score(b.task, r.fused), default=None)
        if best_kind is not None and not best_kind.timed:
            best_kind.timed = True
            best_kind.note = (best_kind.note + "; " if best_kind.note else "") + f"best ORT static {kind}, timed"
    for r in rows:
        if r.family == "ort-dynamic" or (r.family == "edge" and r.graph != "s8s8" and r.chosen):
            r.timed = r.model is not None
    log("fidelity measured")

    data: dict[str, Any] = {}
    if b.kind == "text":  # most of a 128-token row is padding, and calibration statistics would see it
        data["calibration_real_token_fraction"] = round(
            float(np.mean(np.concatenate([x["attention_mask"] for x in b.cal]))), 3)
    if b.task == "imagenet":  # how decisive the ImageNet head is on these surfaces
        ordered = np.sort(reference, axis=1)
        margin = ordered[:, -1] - ordered[:, -2]
        data["fp32_top1_logit_margin_median"] = round(float(np.median(margin)), 3)
        data["fp32_confident_fraction"] = round(float(np.mean(margin >= CONFIDENT_MARGIN)), 3)
    if b.labels is not None:
        data["fp32_accuracy"] = rows[0].fused["accuracy"]
        data["classes"] = b.classes

    for name in [n for n in sessions if not next(r for r in rows if r.name == n).timed]:
        del sessions[name]
    gc.collect()
    b1 = {k: a[:1] for k, a in b.held[0].items()}
    time_round_robin(rows, b1, b.held[0], args.time_budget, 2 if args.quick else 3, 30, sessions)
    sessions.clear()
    for r in rows:
        r.model = None
    targets = check_targets(b, rows, best_ort, isa)
    return {"title": b.title, "onnx": str(b.path), "kind": b.kind, "task": b.task, "isa": isa["label"],
            "served_graph": isa["served_graph"], "edge_sdk": edge_info, "ort_preprocess": pre_how, "data": data,
            "calibration_samples": samples(b.cal), "held_out_samples": samples(b.held),
            "best_ort": best_ort.name if best_ort else None, "rows": [r.out() for r in rows], "targets": targets}


# --- targets ----------------------------------------------------------------------------------


def _check(label: str, value: float | None, op: str, target: float, fmt: str) -> dict[str, Any]:
    met = value is not None and (value >= target if op == ">=" else value <= target)
    shown = "n/a" if value is None else fmt.format(value)
    return {"what": label, "value": value, "target": target, "met": bool(met),
            "text": f"{label} {shown} {op} {fmt.format(target)} {'ok' if met else 'MISSED'}"}


def _fidelity_checks(b: Bench, fid: dict[str, Any], baseline: dict[str, Any], who: str) -> list[dict[str, Any]]:
    checks = []
    if b.key in TARGET_AGREEMENT:
        checks.append(_check(f"{who} agreement", fid.get("top1_agreement"), ">=", TARGET_AGREEMENT[b.key],
                             "{:.1f}%"))
    if b.key in TARGET_ACCURACY_DROP:
        drop = baseline["accuracy"] - fid["accuracy"] if fid.get("accuracy") is not None else None
        checks.append(_check(f"{who} accuracy drop", drop, "<=", TARGET_ACCURACY_DROP[b.key], "{:.2f} pt"))
    if b.key in TARGET_COSINE:
        checks.append(_check(f"{who} mean cosine", fid.get("mean_cosine"), ">=", TARGET_COSINE[b.key], "{:.4f}"))
    return checks


def check_targets(b: Bench, rows: list[Row], best_ort: Row | None, isa: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for this model on this ISA, from the measured rows."""
    baseline = rows[0].fused
    served = next((r for r in rows if r.family == "edge" and r.served and r.chosen), None)
    s8s8 = next((r for r in rows if r.family == "edge" and r.graph == "s8s8" and r.chosen), None)
    checks: list[dict[str, Any]] = []
    if served is None or not served.fused:
        checks.append({"what": "served graph", "met": False,
                       "text": f"served graph {isa['served_graph']}: {served.error if served else 'missing'} MISSED"})
    else:
        checks += _fidelity_checks(b, served.fused, baseline, f"{served.graph} (served, fused)")
    if s8s8 is None or not s8s8.exact:
        checks.append({"what": "s8s8", "met": False, "text": f"s8s8: {s8s8.error if s8s8 else 'missing'} MISSED"})
    else:
        checks += _fidelity_checks(b, s8s8.exact, baseline, "s8s8 (exact)")
    # Every edge-sdk row at least as faithful as the best onnxruntime row (its fused run here).
    metric = "mean_cosine" if b.task == "embedding" else "top1_agreement"
    fmt = "{:.4f}" if b.task == "embedding" else "{:.1f}%"
    if best_ort is not None:
        edge_figures = {f"{r.graph} {how}": fid[metric] for r in rows if r.family == "edge" and r.chosen
                        for how, fid in (("fused", r.fused), ("exact", r.exact)) if fid}
        worst = min(edge_figures.items(), key=lambda kv: kv[1], default=None)
        target = best_ort.fused[metric]
        met = worst is not None and worst[1] >= target and len(edge_figures) == 5
        shown = f"{worst[0]} {fmt.format(worst[1])}" if worst else "none"
        checks.append({"what": "every edge-sdk row >= best ORT", "value": worst[1] if worst else None,
                       "target": target, "met": bool(met), "rows": edge_figures,
                       "text": f"worst edge-sdk row ({shown}) >= best ORT ({best_ort.name} {fmt.format(target)}) "
                               f"{'ok' if met else 'MISSED'}"})
    speed_target = TARGET_SPEEDUP[isa["vnni"]]
    checks.append(_check(f"b8 speed {served.graph if served else '?'}", served.ratio if served else None, ">=",
                         speed_target, "{:.2f}x"))
    return {"isa": isa["label"], "checks": checks, "met": all(c["met"] for c in checks)}


# --- report -----------------------------------------------------------------------------------


def _fid(task: str, fid: dict[str, Any]) -> str:
    if not fid:
        return "-"
    if task == "embedding":
        return f"cos {fid['mean_cosine']:.4f} min {fid['min_cosine']:.3f}"
    text = f"{fid['top1_agreement']:5.1f}% cos {fid['mean_cosine']:.4f}"
    if "accuracy" in fid:
        text += f" acc {fid['accuracy']:5.1f}%"
    elif "top5_contains_fp32_top1" in fid:
        text += f" top5 {fid['top5_contains_fp32_top1']:5.1f}%"
    return text


def print_report(results: dict[str, dict[str, Any]], isa: dict[str, Any]) -> None:
    for key, res in results.items():
        if "skipped" in res or "error" in res:
            print(f"\n== {res.get('title', key)} | ISA {isa['label']}: "
                  f"{'SKIPPED' if 'skipped' in res else 'FAILED'}: {res.get('skipped') or res.get('error')}")
            continue
        task = res["task"]
        width = 30 if task == "embedding" else 36
        fid_head = "agree / cos / acc" if res["data"].get("classes") else (
            "cosine" if task == "embedding" else "agree / cos / top5")
        header = (f"{'row':<29} {'graph':<13} {'b1 ms':>7} {'b8 x fp32':>9}  {'fused: ' + fid_head:<{width}}  "
                  f"{'exact: ' + fid_head:<{width}} {'calib s':>7}  note")
        print(f"\n== {res['title']} | ISA {isa['label']} | this CPU serves {isa['served_graph']} ==")
        print(f"({res['calibration_samples']} calibration / {res['held_out_samples']} held-out samples; fidelity vs "
              f"ORT fp32; fused = onnxruntime's int8 kernels on this ISA, exact = the Q/DQ graph's meaning)")
        d = res["data"]
        if "fp32_top1_logit_margin_median" in d:
            print(f"(fp32 median top-1 minus top-2 logit: {d['fp32_top1_logit_margin_median']}; "
                  f"{100 * d['fp32_confident_fraction']:.0f}% of held-out images have a margin >= {CONFIDENT_MARGIN})")
        if "fp32_accuracy" in d:
            print(f"(fp32 accuracy {d['fp32_accuracy']:.1f}% on the labelled test set, {len(d['classes'])} classes)")
        if "calibration_real_token_fraction" in d:
            print(f"(real tokens are {100 * d['calibration_real_token_fraction']:.0f}% of the calibration "
                  f"positions; the rest is padding)")
        print(f"(edge-sdk: {res['edge_sdk']})")
        print(header)
        print("-" * len(header))
        for r in res["rows"]:
            graph = r["graph"] + (" (served)" if r["served"] else "")
            b1 = f"{r['b1_ms']:7.2f}" if r["b1_ms"] else f"{'-':>7}"
            ratio = f"{r['ratio']:8.2f}x" if r["ratio"] else f"{'-':>9}"
            cal = f"{r['calib_s']:7.1f}" if r["calib_s"] is not None else f"{'-':>7}"
            fused = "FAILED" if r["error"] else ("(not run: TensorRT graph)" if r["graph"] == "s8s8"
                                                 else _fid(task, r["fused"]))
            exact = "-" if r["error"] else _fid(task, r["exact"])
            note = r["error"] if r["error"] else r["note"]
            print(f"{r['name']:<29} {graph:<13} {b1} {ratio}  {fused:<{width}}  {exact:<{width}} {cal}  {note}")
        t = res["targets"]
        print(f"TARGETS {res['title']} on {t['isa']}: {'MET' if t['met'] else 'NOT MET'} - "
              + "; ".join(c["text"] for c in t["checks"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/int8.json"), help="JSON results")
    parser.add_argument("--cache", type=Path, default=Path("build/bench"), help="cached models and images")
    parser.add_argument("--quick", action="store_true", help="64 calibration / 64 held-out samples, smoke run")
    parser.add_argument("--models", nargs="+", default=list(MODEL_KEYS), choices=MODEL_KEYS)
    parser.add_argument("--calibration", type=int, default=None,
                        help=f"calibration samples per model (default {DEFAULT_CAL} for the pretrained models, "
                             f"up to {DEMO_CAL} of the demo's calib set, as convert takes; 64 with --quick)")
    parser.add_argument("--held-out", type=int, default=None,
                        help=f"held-out samples per model (default {DEFAULT_HELD}; up to {DEMO_HELD} of the demo's "
                             f"test set; 64 with --quick)")
    parser.add_argument("--ort-methods", nargs="+", default=list(ORT_METHODS), choices=ORT_METHODS)
    parser.add_argument("--ort-types", nargs="+", default=list(DEFAULT_ORT_TYPES), choices=ORT_TYPES,
                        help="quantize_static types per method ('U8S8 rr': reduce_range, 7-bit weights)")
    parser.add_argument("--rounding", nargs="+", default=["nearest", "reconstructed"],
                        choices=["nearest", "reconstructed"],
                        help="edge-sdk weight roundings to build per graph (convert builds both and keeps the "
                             "better; 'nearest' alone skips the slow layer-wise reconstruction)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of timing rounds per model")
    args = parser.parse_args(argv)
    if args.time_budget is None:
        args.time_budget = 4.0 if args.quick else 6.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)  # onnxruntime.quantization logs every tensor it skips
    args.cache.mkdir(parents=True, exist_ok=True)
    isa = isa_info()
    log(f"ISA {isa['label']}: this CPU serves {isa['served_graph']} ({isa['served_reason']})")
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp_dir:
        tmp = Path(tmp_dir).resolve()  # absolute: ORT's quantizers run with it as the working directory
        for key in args.models:
            demo = key.startswith("demo-")
            n_cal = args.calibration or (64 if args.quick else DEMO_CAL if demo else DEFAULT_CAL)
            n_held = args.held_out or (64 if args.quick else DEMO_HELD if demo else DEFAULT_HELD)
            try:
                b = load_bench(key, args.cache, n_cal, n_held)
            except _models.ModelUnavailable as exc:
                log(f"{key}: SKIPPED: {exc}")
                results[key] = {"skipped": str(exc)}
                continue
            try:
                results[key] = bench_model(b, args, isa, tmp)
            except Exception as exc:
                log(f"{key} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                results[key] = {"title": b.title, "error": f"{type(exc).__name__}: {exc}"[:300]}
            del b
            gc.collect()
    wall = time.monotonic() - started
    print_report(results, isa)
    import onnxruntime

    print(f"\nISA {isa['label']}; this CPU serves {isa['served_graph']}: {isa['served_reason']}")
    print(f"ORT {onnxruntime.__version__}, 2 threads, batch {BATCH}; total wall time {wall:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"quick": args.quick, "batch": BATCH, "threads": 2, "sequence": _models.SEQUENCE, "isa": isa,
               "onnxruntime": onnxruntime.__version__, "wall_s": round(wall, 1), "models": results}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
