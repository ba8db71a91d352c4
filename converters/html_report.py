"""The conversion report as one self-contained HTML page: tables, and plots inline as PNG.

``render(subjects)`` draws one or more packages side by side: accuracy, agreement with fp32,
latency and size of every graph (with a Pareto plot of accuracy against latency and size),
per-layer int8 sensitivity, calibration histograms with the threshold each method chose, the
pruning allocation per unit, confusion matrices and anomaly-score histograms. Every figure
names where it was measured: accuracy and agreement at conversion (int8 graphs on the exact
reference, the same on every CPU), latency on the machine that wrote the report, by the backend
named beside it.

The plots are drawn with matplotlib's Agg backend (the workstation's ``convert`` extra): it has
log axes, colour maps, legends and annotated heat maps, renders without a display, and
nothing on the device imports it. The page has no script and loads nothing: the daemon's
console serves it under a ``sandbox`` policy with ``img-src data:`` only.
"""

from __future__ import annotations

import base64
import html
import io
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from runtime.manifest import Manifest

#: Where a package carries its own report (the console links it).
REPORT_FILE = "reports/report.html"
CALIBRATION_FILE = "reports/calibration.json"
CPU_GRAPHS = ("u8s8", "u8s7")
TIMING_ROUNDS = 30
SENSITIVE_SHOWN = 25
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
Key = TypeVar("Key", bound=Hashable)
METHOD_STYLES = {"entropy": ("#d62728", "-"), "percentile": ("#2ca02c", "--"), "mse": ("#9467bd", "-."),
                 "minmax": ("#7f7f7f", ":")}


@dataclass(frozen=True)
class Subject:
    """One package as the report shows it."""

    label: str  # how the page names it (the package file name)
    manifest: Manifest
    calibration: Mapping[str, Any] | None = None  # reports/calibration.json
    sizes: Mapping[str, int] = field(default_factory=dict)  # graph ("fp32", "u8s8", ...) -> bytes
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # graph -> median ms per call, measured here
    timing: str = ""  # how and where latency_ms was measured

    @property
    def reports(self) -> Mapping[str, Any]:
        return self.manifest.reports


# --------------------------------------------------------------------------------------------- measuring


def machine() -> dict[str, Any]:
    """This machine as every figure measured on it is labelled: CPU family, int8 features, the
    int8 graph onnxruntime serves here and why, onnxruntime's version."""
    import onnxruntime as ort

    from runtime.backends import device_info, this_cpu_int8_graph

    info = device_info()
    features = sorted(info.cpu_flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "avx2", "avx512f"})
    dot = sorted(set(features) & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    graph, why = this_cpu_int8_graph()
    return {"arch": info.arch or platform.machine(), "cpu": info.cpu_model or "unknown", "processors": info.cpu_count,
            "features": features,
            "isa": f"{info.arch or platform.machine()}, "
                   + (f"int8 dot product ({', '.join(dot)})" if dot else "no int8 dot product"),
            "cpu_int8_graph": graph, "cpu_int8_graph_reason": why, "onnxruntime": ort.__version__}


def time_graphs(graphs: Mapping[Key, tuple[bytes, Mapping[str, np.ndarray]]],
                rounds: int = TIMING_ROUNDS) -> dict[Key, float]:
    """Median milliseconds per call of each graph on its feeds with onnxruntime's CPU provider; the
    graphs take turns (two untimed warm-ups each) so that a busy machine slows them alike."""
    import onnxruntime as ort

    sessions = {key: (ort.InferenceSession(data, providers=["CPUExecutionProvider"]), dict(feeds))
                for key, (data, feeds) in graphs.items()}
    for _ in range(2):
        for session, feeds in sessions.values():
            session.run(None, feeds)
    times: dict[Key, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, (session, feeds) in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            times[key].append((time.perf_counter() - started) * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}


def _first_sample(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:1]) for k, v in feeds.items()}


@dataclass(frozen=True)
class _Read:
    """A package's manifest, the files the report reads, and its golden feeds."""

    label: str
    manifest: Manifest
    files: Mapping[str, bytes]
    golden_in: Mapping[str, np.ndarray]

    def timed_graphs(self, served: str) -> dict[str, bytes]:
        """The graphs this CPU runs: fp32 and the int8 graph it serves."""
        m = self.manifest
        if not self.golden_in or m.model not in self.files:
            return {}
        graphs = {"fp32": self.files[m.model]}
        if served in m.graphs and m.graphs[served] in self.files:
            graphs[served] = self.files[m.graphs[served]]
        return graphs


def subjects(read: Sequence[_Read], *, timed: bool = True) -> list[Subject]:
    """The report's view of each package; with ``timed``, the fp32 graph and the int8 graph this CPU
    serves of every package take turns on the first golden feed (one round-robin for all of them)."""
    import json

    here = machine() if timed else None
    latency: dict[tuple[int, str], float] = {}
    timing = ""
    if here is not None:
        served = here["cpu_int8_graph"]
        graphs = {(i, g): (data, _first_sample(r.golden_in))
                  for i, r in enumerate(read) for g, data in r.timed_graphs(served).items()}
        latency = time_graphs(graphs) if graphs else {}
        timing = (f"median of {TIMING_ROUNDS} calls at batch 1 (the model alone, no pre-processing; every graph "
                  f"of every package in turn), onnxruntime {here['onnxruntime']} CPU provider on {here['isa']} "
                  f"({here['cpu']}, {here['processors']} processors); the int8 graph timed is the one served "
                  f"here: {served}")
    out = []
    for i, r in enumerate(read):
        m, files = r.manifest, r.files
        sizes = {"fp32": len(files[m.model])} if m.model in files else {}
        sizes.update({g: len(files[f]) for g, f in m.graphs.items() if f in files})
        raw = files.get(CALIBRATION_FILE)
        calibration = json.loads(raw.decode("utf-8")) if raw else None
        mine = {g: ms for (j, g), ms in latency.items() if j == i}
        out.append(Subject(r.label, m, calibration, sizes, mine, timing if mine else ""))
    return out


def subject(label: str, manifest: Manifest, files: Mapping[str, bytes], golden_in: Mapping[str, np.ndarray],
            *, timed: bool = True) -> Subject:
    """One package's subject from its manifest and files (at conversion, before it is written)."""
    return subjects([_Read(label, manifest, files, golden_in)], timed=timed)[0]


def _read_package(path: str | Path) -> _Read:
    from runtime.package import Package

    package = Package.open(path)
    m = package.manifest
    wanted = [m.model, *m.graphs.values(), CALIBRATION_FILE]
    files = {name: package.read_bytes(name) for name in wanted if name in m.files}
    golden_in, _ = package.golden("fp32")
    return _Read(Path(path).name, m, files, golden_in)


def subject_from_package(path: str | Path, *, timed: bool = True) -> Subject:
    """Open (and verify) the package at ``path`` and read what the report needs from it."""
    return subjects([_read_package(path)], timed=timed)[0]


# --------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Point:
    """One graph of one package on the Pareto plot."""

    label: str
    graph: str
    metric: float | None  # points (accuracy %, or image AUROC x 100)
    agreement: float | None  # top-1 agreement with fp32, 0..1
    cosine: float | None
    latency_ms: float | None
    size: int | None
    note: str = ""


def metric_name(manifest: Manifest) -> str:
    if manifest.postprocess.kind == "anomaly" and manifest.postprocess.map_output is not None:
        return "image AUROC (points)"
    return "top-1 accuracy (%)"


def points(s: Subject) -> list[Point]:
    """Every graph of the package with its metric, agreement, latency and size."""
    r = s.reports
    int8, pruning = r.get("int8"), r.get("pruning")
    name = s.manifest.name + (" pruned" if pruning else "")
    auroc = ((r.get("anomaly") or {}).get("validation") or {}).get("auroc")
    if int8:
        fp32_metric: float | None = float(int8["metric_fp32"])
    elif auroc is not None and metric_name(s.manifest).startswith("image AUROC"):
        fp32_metric = 100.0 * float(auroc)
    elif r.get("validation"):
        fp32_metric = 100.0 * float(r["validation"]["accuracy"])
    else:
        fp32_metric = None
    same = None if pruning else 1.0  # a pruned graph's agreement with the unpruned model is not recorded
    label = f"{name} fp32 (in the int8 package)" if int8 else f"{name} fp32"
    out = [Point(label, "fp32", fp32_metric, same, same, s.latency_ms.get("fp32"), s.sizes.get("fp32"),
                 "prepared fp32 graph (same function)" if int8 else "pruned graph" if pruning else "")]
    for graph, g in (int8 or {}).get("per_graph", {}).items():
        note = g.get("target", "")
        if graph not in s.latency_ms and graph in CPU_GRAPHS:
            note += "; not timed: another CPU family serves this graph"
        elif graph not in CPU_GRAPHS:
            note += "; not timed: TensorRT builds an engine from it on the device"
        out.append(Point(f"{name} int8 {graph}", graph, g.get("metric_int8"), g.get("top1_agreement"),
                         g.get("mean_cosine"), s.latency_ms.get(graph), s.sizes.get(graph), note))
    return out


def _pareto(ps: Sequence[Point]) -> set[int]:
    """Indices of the points no other point beats on both latency (lower) and metric (higher)."""
    keep = set()
    for i, p in enumerate(ps):
        if p.latency_ms is None or p.metric is None:
            continue
        if not any(q.latency_ms is not None and q.metric is not None and q.latency_ms <= p.latency_ms
                   and q.metric >= p.metric and (q.latency_ms < p.latency_ms or q.metric > p.metric) for q in ps):
            keep.add(i)
    return keep


def pareto_plot(ps: Sequence[Point], metric: str) -> str:
    fig = _figure(10.5, 4.2)
    left, right = fig.subplots(1, 2)
    front = _pareto(ps)
    sizes = [p.size for p in ps if p.size is not None]
    unit, per = ("MB", 1e6) if sizes and max(sizes) >= 1e6 else ("kB", 1e3)
    for i, p in enumerate(ps):
        colour = COLOURS[i % len(COLOURS)]
        if p.metric is None:
            continue
        if p.latency_ms is not None:
            left.scatter([p.latency_ms], [p.metric], s=80, color=colour, marker="*" if i in front else "o",
                         label=p.label, zorder=3)
        if p.size is not None:
            right.scatter([p.size / per], [p.metric], s=60, color=colour, label=p.label, zorder=3)
    line = sorted((ps[i].latency_ms, ps[i].metric) for i in front)  # type: ignore[type-var]
    if len(line) > 1:
        left.plot([x for x, _ in line], [y for _, y in line], color="#999999", lw=1, zorder=1, label="Pareto front")
    left.set_xlabel("latency per call, batch 1 (ms, measured by this report)")
    left.set_ylabel(metric)
    left.set_title("accuracy vs latency (star: on the Pareto front)")
    right.set_xlabel(f"graph file size ({unit})")
    right.set_ylabel(metric)
    right.set_title("accuracy vs size")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(6))
    handles, labels = right.get_legend_handles_labels()
    if handles:
        right.legend(fontsize=8, loc="best")
    return _png(fig, "accuracy against latency and size")


def sensitivity_plot(int8: Mapping[str, Any]) -> str | None:
    layers = [x for x in int8.get("layers", []) if x.get("sensitivity") is not None]
    if not layers:
        return None
    layers = sorted(layers, key=lambda x: -x["sensitivity"])[:SENSITIVE_SHOWN]
    fig = _figure(10.5, 0.26 * len(layers) + 1.2)
    ax = fig.subplots()
    values = [max(x["sensitivity"], 1e-12) for x in layers]
    kept = ["fp32" in x.get("precision", {}).values() for x in layers]
    ax.barh(range(len(layers)), values, color=["#d62728" if k else "#1f77b4" for k in kept])
    ax.set_yticks(range(len(layers)), [f"{x['node']} ({x['op_type']})"[:48] for x in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("output error with only this layer in int8 (MSE / output power, exact reference, log scale)")
    ax.set_title(f"per-layer sensitivity, the {len(layers)} most sensitive layers (red: kept in float in a graph)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig, "per-layer int8 sensitivity")


def histogram_plots(calibration: Mapping[str, Any]) -> str | None:
    tensors = calibration.get("tensors", [])
    if not tensors:
        return None
    cols = 2
    rows = (len(tensors) + cols - 1) // cols
    fig = _figure(10.5, 2.7 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, t in zip(axes, tensors):
        counts = np.asarray(t["counts"], dtype=np.float64)
        edges = np.arange(len(counts) + 1) * float(t["bin_width"])
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#9ecae1", baseline=0.5)
        ax.set_yscale("log")
        for method, c in t["candidates"].items():
            if c.get("amax") is None:
                continue
            colour, style = METHOD_STYLES.get(method, ("#000000", "-"))
            chosen = method == t["linear"]["method"]
            ax.axvline(c["amax"], color=colour, ls=style, lw=2.4 if chosen else 1.1,
                       label=f"{method}{' (chosen)' if chosen else ''}: {c['amax']:.3g}")
        if t["linear"]["method"] not in t["candidates"]:
            ax.axvline(t["linear"]["amax"], color="#000000", lw=2.4,
                       label=f"{t['linear']['method']} (chosen): {t['linear']['amax']:.3g}")
        ax.set_title(str(t["title"])[:70], fontsize=8)
        ax.set_xlabel("|x|, the tensor's value (dimensionless activation)", fontsize=8)
        ax.set_ylabel("values per bin (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(tensors):]:
        ax.set_visible(False)
    return _png(fig, "calibration histograms with thresholds")


def allocation_plot(pruning: Mapping[str, Any]) -> str | None:
    # a budget search's choice, or an allocation given as such
    ratios = (pruning.get("chosen") or {}).get("ratios") or (pruning.get("spec") or {}).get("ratios") or {}
    if not ratios:
        return None
    units = sorted(ratios, key=lambda u: -ratios[u])
    fig = _figure(10.5, 0.26 * len(units) + 1.2)
    ax = fig.subplots()
    ax.barh(range(len(units)), [100 * ratios[u] for u in units], color="#2ca02c")
    ax.set_yticks(range(len(units)), [u[:56] for u in units], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the unit removed (%)")
    ax.set_title("pruning allocation per unit (a budget search's choice, or the allocation given)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig, "pruning allocation per unit")


def confusion_plot(matrices: Sequence[tuple[str, Mapping[str, Mapping[str, int]]]], labels: Sequence[str]) -> str | None:
    matrices = [(t, m) for t, m in matrices if m]
    if not matrices:
        return None
    names = list(labels) + sorted({p for _, m in matrices for row in m.values() for p in row} - set(labels))
    fig = _figure(min(4.0 * len(matrices), 10.5), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(matrices))).ravel()
    for ax, (title, m) in zip(axes, matrices):
        grid = np.array([[m.get(t, {}).get(p, 0) for p in names] for t in names], dtype=np.int64)
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > grid.max() / 2 else "black")
        ax.set_xticks(range(len(names)), [n[:14] for n in names], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), [n[:14] for n in names], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
    return _png(fig, "confusion matrices")


def anomaly_plot(anomaly: Mapping[str, Any]) -> str | None:
    h = (anomaly.get("validation") or {}).get("histogram")
    if not h:
        return None
    fig = _figure(8, 3.4)
    ax = fig.subplots()
    edges = np.asarray(h["edges"], dtype=np.float64)
    ax.stairs(h["ok"], edges, label="good parts", color="#2ca02c", lw=1.8)
    ax.stairs(h["defect"], edges, label="defective parts", color="#d62728", lw=1.8)
    ax.axvline(h["threshold"], color="#000000", ls="--", label=f"threshold {h['threshold']:.3g}")
    ax.set_xlabel("anomaly score (nearest memory-bank distance of the worst patch)")
    ax.set_ylabel("images")
    ax.set_title("anomaly scores on the validation images")
    ax.legend(fontsize=8)
    return _png(fig, "anomaly score histograms")


# --------------------------------------------------------------------------------------------- page

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1120px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-top:22px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.where{color:#555;font-size:12px}.kv td:first-child{color:#555}
"""


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_e(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _summary(subjects: Sequence[Subject]) -> str:
    rows = []
    all_points = []
    for s in subjects:
        for p in points(s):
            all_points.append(p)
            rows.append((p.label, s.label, _fmt(p.metric, ".2f"),
                         _fmt(None if p.agreement is None else 100 * p.agreement, ".1f", "%"),
                         _fmt(p.cosine, ".4f"), _fmt(p.latency_ms, ".2f"),
                         _fmt(None if p.size is None else p.size / 1e6, ".2f"), p.note))
    metric = metric_name(subjects[0].manifest)
    parts = ["<h2>Accuracy, agreement, latency and size</h2>",
             _table(("graph", "package", metric, "top-1 agreement with fp32", "mean cosine", "latency (ms)",
                     "size (MB)", "note"), rows, numeric=(2, 3, 4, 5, 6))]
    timings = sorted({s.timing for s in subjects if s.timing})
    parts.append('<p class="where">' + "<br>".join(
        ["Accuracy and agreement: measured at conversion on the validation data (int8 graphs on the exact "
         "reference, which computes Q/DQ as the ONNX spec and TensorRT do: the same on every CPU). "
         "Agreement of a pruned package is with its own fp32 graph only."]
        + [f"Latency: {_e(t)}." for t in timings] or ["Latency: not measured."]) + "</p>")
    if any(p.latency_ms is not None or p.size is not None for p in all_points):
        parts.append(pareto_plot(all_points, metric))
    return "".join(parts)


def _kv(pairs: Iterable[tuple[str, object]]) -> str:
    return "<table class=kv>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs) + "</table>"


def _int8_section(s: Subject) -> str:
    from converters.report import int8_lines

    int8 = s.reports["int8"]
    parts = ["<h3>int8</h3>", "<p>" + "<br>".join(_e(line) for line in int8_lines(dict(int8))) + "</p>"]
    rows = [(graph, g.get("target", ""), _fmt(g.get("metric_int8"), ".2f"),
             _fmt(None if g.get("top1_agreement") is None else 100 * g["top1_agreement"], ".1f", "%"),
             _fmt(g.get("mean_cosine"), ".4f"), str(len(g.get("float_layers", {}))),
             (g.get("weight_rounding") or {}).get("chosen", "nearest"))
            for graph, g in int8.get("per_graph", {}).items()]
    parts.append(_table(("graph", "for", "metric", "top-1 agreement", "mean cosine", "layers in float",
                         "weight rounding"), rows, numeric=(2, 3, 4, 5)))
    plot = sensitivity_plot(int8)
    if plot:
        parts.append("<h3>Per-layer sensitivity</h3>" + plot)
    if s.calibration:
        c = s.calibration
        plot = histogram_plots(c)
        if plot:
            parts.append(f"<h3>Calibration histograms</h3><p class=where>The inputs of the most sensitive layers: "
                         f"|x| over {_e(c.get('samples'))} calibration samples, method {_e(c.get('method'))}; each "
                         "line is the threshold (amax) a method chooses, the thick one is what the graphs use "
                         "(TensorRT's symmetric range). Values: " + _e(c.get("units", "")) + ".</p>" + plot)
            rows = [(t["tensor"], t["linear"]["method"], f"{t['linear']['amax']:.4g}", f"{t['max_abs']:.4g}",
                     "—" if not t.get("affine") else f"[{t['affine']['lo']:.4g}, {t['affine']['hi']:.4g}]",
                     ", ".join(f"{m} {v['amax']:.3g}" for m, v in t["candidates"].items() if v.get("amax") is not None),
                     t.get("fallback") or "")
                    for t in c.get("tensors", [])]
            parts.append(_table(("tensor", "method", "amax", "max |x|", "u8 range (CPU graphs)",
                                 "every method's amax", "note"), rows, numeric=(2, 3)))
    return "".join(parts)


def _pruning_section(pruning: Mapping[str, Any]) -> str:
    from converters.report import pruning_lines

    parts = ["<h3>Pruning</h3>", "<p>" + "<br>".join(_e(x) for x in pruning_lines(dict(pruning))) + "</p>"]
    parts.append(_table(("", "before", "after"), [
        ("parameters", f"{pruning['params_before']:,}", f"{pruning['params_after']:,}"),
        ("MACs per sample", f"{pruning['macs_before']:,}", f"{pruning['macs_after']:,}"),
        ("file size (MB)", f"{pruning['size_before'] / 1e6:.2f}", f"{pruning['size_after'] / 1e6:.2f}"),
        ("accuracy (points)", _fmt(pruning.get("accuracy_before"), ".2f"), _fmt(pruning.get("accuracy_after"), ".2f")),
    ], numeric=(1, 2)))
    plot = allocation_plot(pruning)
    if plot:
        parts.append(plot)
    elif pruning.get("layers"):
        parts.append(f"<p>{len(pruning['layers'])} layers pruned at the fixed ratio "
                     f"{_e((pruning.get('spec') or {}).get('ratio'))}.</p>")
    return "".join(parts)


def _package_section(s: Subject) -> str:
    m, r = s.manifest, s.reports
    machine_then = (r.get("conversion") or {}).get("machine") or {}
    parts = [f"<h2>{_e(s.label)}</h2>", _kv([
        ("model", f"{m.name} {m.version} ({m.task}, {m.precision})"),
        ("labels", ", ".join(m.postprocess.labels)),
        ("inputs", ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in m.inputs)),
        ("converted on", machine_then.get("isa", "not recorded")
         + (f" ({machine_then['cpu']})" if machine_then.get("cpu") else "")),
        ("canonicalization", _canonical(r.get("canonicalization"))),
    ])]
    validation = r.get("validation")
    if validation:
        parts.append(f"<p class=where>fp32 validation: accuracy {validation['accuracy']:.3f} on {validation['samples']} "
                     f"samples, {_e(validation.get('backend', ''))}, median {validation['median_latency_ms']:.2f} ms "
                     f"per sample in batches on the converting machine.</p>")
    if r.get("pruning"):
        parts.append(_pruning_section(r["pruning"]))
    if r.get("int8"):
        parts.append(_int8_section(s))
    matrices = [("fp32", (validation or {}).get("confusion") or {})]
    int8_validation = (r.get("int8") or {}).get("validation") or {}
    if int8_validation.get("confusion"):
        matrices.append(("int8 u8s8 (exact reference)", int8_validation["confusion"]))
    plot = confusion_plot(matrices, m.postprocess.labels)
    if plot:
        parts.append("<h3>Confusion matrices (validation data)</h3>" + plot)
    anomaly = r.get("anomaly")
    if anomaly:
        from converters.report import anomaly_lines

        parts.append("<h3>Anomaly model</h3>")
        if anomaly.get("method") == "patchcore":
            parts.append("<p>" + "<br>".join(_e(x) for x in anomaly_lines(dict(anomaly))) + "</p>")
        plot = anomaly_plot(anomaly)
        if plot:
            parts.append(plot)
    return "".join(parts)


def _canonical(c: Mapping[str, Any] | None) -> str:
    if not c:
        return "not recorded"
    from converters.report import canonical_line

    return canonical_line(dict(c))


def render(subjects: Sequence[Subject], *, title: str | None = None) -> str:
    """The report page for ``subjects`` (one or more packages of the same model, e.g. fp32, pruned, int8)."""
    if not subjects:
        raise ValueError("render needs at least one package")
    here = machine()
    title = title or "Conversion report: " + ", ".join(dict.fromkeys(s.manifest.name for s in subjects))
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=where>Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {_e(here['isa'])} ({_e(here['cpu'])}); "
            f"this CPU serves the {_e(here['cpu_int8_graph'])} int8 graph: {_e(here['cpu_int8_graph_reason'])}.</p>",
            _summary(subjects)]
    body.extend(_package_section(s) for s in subjects)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def write_report(packages: Sequence[str | Path], out: str | Path, *, title: str | None = None,
                 timed: bool = True) -> Path:
    """Render the report of ``packages`` to ``out`` (written whole, then renamed into place)."""
    page = render(subjects([_read_package(p) for p in packages], timed=timed), title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.tmp")
    staged.write_text(page, encoding="utf-8")
    staged.replace(out)
    return out
