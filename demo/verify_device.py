"""Device-side check of the demo's int8 packages on this machine's CPU (native, or an emulated Arm64).

    python -m demo.verify_device --build build/demo [--samples 16]

For each ``<build>/packages/*.int8.edgepkg`` (written by ``make demo``):

* ``edge_sdk.load`` it (backend "auto": the policy walk and the golden-vector check before
  serving) and report the backend, the graph it serves, the backends it skipped and the parity
  (with ``--fp32-twin`` also the ``*.fp32.edgepkg`` twin);
* run every graph the package carries (the fp32 ``manifest.model`` and each ``manifest.graphs``
  variant, whatever their names) on onnxruntime's CPU provider over ``--samples`` held-out inputs,
  preprocessed by the package's own pipeline, and compare with the fp32 graph run here: top-1
  agreement, mean cosine of the raw outputs, accuracy against the true labels, and whether the
  graph reproduces the package's golden outputs (``runtime.parity.check_parity``);
* predict the same inputs with the loaded model (the serving path) and compare likewise.

Exits 1 when a package fails to load and serve, when the graph ``edge_sdk.load`` chose agrees with
fp32 on fewer than ``--min-agreement`` of the samples, or when the device side pulled in a
workstation module (onnx, torch, converters). Imports only edge_sdk, runtime, devices, numpy and
onnxruntime, so it runs on a device install (``pip install edge-sdk`` without extras); see
``tools/arm64/`` for running it on an emulated Arm64 (Jetson CPU) root.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import devices
import edge_sdk
from edge_sdk.errors import EdgeSDKError
from runtime.manifest import IMAGE_TASKS, TextPreprocess
from runtime.package import Package
from runtime.parity import check_parity
from runtime.pipeline import Pipeline, make_encoder
from runtime.runners.base import Feeds, Runner
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.backends import Served
from runtime.select import Selection

WORKSTATION_MODULES = ("onnx", "torch", "converters")
HEADER = ("package", "graph", "agreement", "cosine", "accuracy", "parity")


@dataclass(frozen=True)
class Heldout:
    items: list[Any]  # image paths (str) or texts
    truths: list[str]


@dataclass
class GraphRun:
    """One graph's results on the held-out inputs."""

    labels: list[str] = field(default_factory=list)
    outputs: np.ndarray | None = None  # raw output rows, one per inference row (window for texts)
    probs: np.ndarray | None = None  # per-input scores after postprocessing (None for embeddings)
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Row:
    package: str
    graph: str
    agreement: float | None
    cosine: float | None
    accuracy: float | None
    parity: str
    samples: int = 0

    def cells(self) -> tuple[str, ...]:
        return (self.package, self.graph, _pct(self.agreement, self.samples), _num(self.cosine),
                _pct(self.accuracy, self.samples), self.parity)


def _pct(value: float | None, samples: int = 0) -> str:
    if value is None:
        return "-"
    count = f" ({round(value * samples)}/{samples})" if samples else ""
    return f"{100 * value:.1f}%{count}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def spread(n: int, keep: int) -> list[int]:
    """``min(n, keep)`` indices evenly spread over ``range(n)``, first and last included."""
    if n <= keep:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, keep).round()]


def image_heldout(root: Path, samples: int) -> Heldout:
    paths = sorted((root / "data" / "test").glob("*/*.png"))
    chosen = [paths[i] for i in spread(len(paths), samples)]
    return Heldout([str(p) for p in chosen], [p.parent.name for p in chosen])


def text_heldout(root: Path, samples: int) -> Heldout:
    rows = []
    for line in (root / "data" / "test.tsv").read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if text:
            rows.append((text, label))
    chosen = [rows[i] for i in spread(len(rows), samples)]
    return Heldout([t for t, _ in chosen], [lab for _, lab in chosen])


class RecordingRunner(Runner):
    """Delegates to a runner and keeps every output it returns, in call order."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner.inputs, inner.outputs)
        self.inner = inner
        self.backend = inner.backend
        self.calls: list[dict[str, np.ndarray]] = []

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        out = self.inner.infer(feeds)
        self.calls.append(out)
        return out

    def _deactivate_impl(self) -> None:
        self.inner.deactivate()


def graph_bytes(package: Package, graph: str) -> bytes:
    m = package.manifest
    return package.read_bytes(m.model if graph == "fp32" else m.graphs[graph])


def run_graph(package: Package, graph: str, heldout: Heldout, threads: int | None) -> tuple[GraphRun, str]:
    """Run ``graph`` through the package's own pipeline on onnxruntime CPU; also its golden-vector check."""
    m = package.manifest
    run = GraphRun()
    inner = OnnxRuntimeRunner(graph_bytes(package, graph), m.inputs, m.outputs, threads=threads)
    try:
        inner.activate()
    except EdgeSDKError as exc:
        run.error = f"cannot load: {exc}"
        return run, "not run"
    try:
        try:
            parity = check_parity(package, inner, graph)
        except EdgeSDKError as exc:
            verdict = f"FAIL: {exc}"
        else:
            verdict = f"ok ({parity.max_abs_diff:.2g} <= {parity.tolerance:g})"
        recorder = RecordingRunner(inner)
        recorder.activate()
        tokenizer = (package.read_bytes(m.preprocess.tokenizer).decode("utf-8")
                     if isinstance(m.preprocess, TextPreprocess) else None)
        pipeline = Pipeline(m, Selection("onnxruntime-cpu", recorder, (), Served.of_graph(graph)), make_encoder(m, tokenizer), package)
        started = time.perf_counter()
        try:
            if m.postprocess.kind == "embedding":
                pipeline.infer(pipeline.encode(heldout.items), recorder)
            else:
                predictions = pipeline.predict_batch(heldout.items, max_batch=len(heldout.items))
                run.labels = [p.label for p in predictions]
                run.probs = np.array([[p.scores[lab] for lab in m.postprocess.labels] for p in predictions])
        except EdgeSDKError as exc:
            run.error = f"cannot run: {exc}"
        run.seconds = time.perf_counter() - started
        name = m.postprocess.output
        if recorder.calls:
            run.outputs = np.concatenate([c[name].reshape(len(c[name]), -1) for c in recorder.calls])
    finally:
        inner.deactivate()
    return run, verdict


def agreement(labels: Sequence[str], reference: Sequence[str]) -> float | None:
    if not labels or len(labels) != len(reference):
        return None
    return float(np.mean([a == b for a, b in zip(labels, reference)]))


def accuracy(labels: Sequence[str], truths: Sequence[str], known: Sequence[str]) -> float | None:
    if not labels or not any(t in known for t in truths):
        return None
    return float(np.mean([a == b for a, b in zip(labels, truths)]))


def mean_cosine(outputs: np.ndarray | None, reference: np.ndarray | None) -> float | None:
    if outputs is None or reference is None or outputs.shape != reference.shape or outputs.shape[1] < 2:
        return None
    a, b = outputs.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


def print_device() -> None:
    info = devices.detect()
    dot = "yes" if info.int8_dot_product else "no"
    flags = ", ".join(sorted(info.cpu_flags)) or "none"
    print(f"device: arch {info.arch} (platform.machine {platform.machine()}), python {platform.python_version()}")
    print(f"cpu: {info.cpu_model or 'unknown'}, {info.cpu_count} processors")
    print(f"cpu int8 features: {flags} (int8 dot product: {dot})")
    print(f"jetson: {info.jetson_module or 'no'}; gpu: {info.gpu_name or 'none'}")
    print(f"onnxruntime {info.onnxruntime_version}, providers {', '.join(info.onnxruntime_providers) or 'none'}; "
          f"numpy {np.__version__}")
    print(f"opencv {info.opencv_version or 'missing'} from {info.opencv_location or '-'} "
          f"(GStreamer pipelines: {'yes' if info.opencv_gstreamer else 'no'})")


def describe_load(label: str, model: edge_sdk.Model) -> str:
    info = model.info
    graph = info["graph"]
    served = info.get("precision_served") or ("fp32" if graph == "fp32" else "int8")
    parity = info["parity"]
    check = ("not verified" if parity is None else
             f"{parity['samples']} golden samples, max relative diff {parity['max_abs_diff']:.3g} "
             f"<= {parity['tolerance']:g}")
    print(f"  load {label}: backend {info['backend']}, graph {graph} ({served}); package precision "
          f"{info['precision']}, graphs {dict(info['graphs']) or 'fp32 only'}")
    if info.get("graph_reason"):
        print(f"    why this graph: {info['graph_reason']}")
    print(f"    parity before serving: {check}")
    for skipped in info["skipped_backends"]:
        print(f"    skipped {skipped['backend']}: {skipped['reason']}")
    return str(graph)


def served_run(model: edge_sdk.Model, heldout: Heldout) -> GraphRun:
    run = GraphRun()
    started = time.perf_counter()
    try:
        predictions = model.predict_batch(heldout.items, max_batch=len(heldout.items))
    except EdgeSDKError as exc:
        run.error = f"cannot predict: {exc}"
        return run
    run.seconds = time.perf_counter() - started
    run.labels = [p.label for p in predictions]
    run.probs = np.array([[p.scores[lab] for lab in model.labels] for p in predictions])
    return run


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chosen: dict[str, str] = field(default_factory=dict)


def verify_package(path: Path, build: Path, samples: int, threads: int | None, min_agreement: float,
                   twin: bool, require_int8: bool, outcome: Outcome) -> None:
    name = path.name.removesuffix(".edgepkg")
    print(f"\n== {name}")
    try:
        package = Package.open(path)
    except EdgeSDKError as exc:
        outcome.failures.append(f"{name}: cannot open: {exc}")
        print(f"  cannot open: {exc}")
        return
    m = package.manifest
    heldout = (image_heldout(build / "image", samples) if m.task in IMAGE_TASKS
               else text_heldout(build / "text", samples))
    if m.postprocess.kind == "anomaly":  # good / defect: every defect class is the fault label
        good, fault = m.postprocess.labels
        heldout = Heldout(heldout.items, [good if t == "ok" else fault for t in heldout.truths])
    labels = sorted(set(heldout.truths))
    print(f"  task {m.task}, {len(heldout.items)} held-out samples covering {len(labels)} labels ({', '.join(labels)})")

    loaded: dict[str, edge_sdk.Model] = {}
    twin_path = path.with_name(path.name.replace(".int8.", ".fp32."))
    for label, target in (("int8 package", path), ("fp32 twin", twin_path)):
        if target == path or (twin and target.exists()):
            try:
                loaded[label] = edge_sdk.load(target)
            except EdgeSDKError as exc:
                outcome.failures.append(f"{target.name}: edge_sdk.load failed: {exc}")
                print(f"  load {label}: FAILED: {exc}")
                continue
            chosen = describe_load(label, loaded[label])
            if label == "int8 package":
                outcome.chosen[name] = chosen
                if chosen == "fp32" and m.graphs:
                    outcome.notes.append(f"{name} carries int8 graphs {sorted(m.graphs)} but serves fp32 here")
                    print(f"  NOTE: {outcome.notes[-1]}")
                    if require_int8:
                        outcome.failures.append(f"{name}: serves fp32, not int8 (--require-int8)")

    runs: dict[str, GraphRun] = {}
    verdicts: dict[str, str] = {}
    for graph in ("fp32", *m.graphs):
        runs[graph], verdicts[graph] = run_graph(package, graph, heldout, threads)
        status = runs[graph].error or f"{runs[graph].seconds:.1f} s for {len(heldout.items)} samples"
        print(f"  graph {graph}: {status}; golden check {verdicts[graph]}")
    reference = runs["fp32"]
    served_graph = outcome.chosen.get(name)
    for graph, run in runs.items():
        mark = " (served)" if graph == served_graph else ""
        outcome.rows.append(Row(name, graph + mark, agreement(run.labels, reference.labels),
                                mean_cosine(run.outputs, reference.outputs),
                                accuracy(run.labels, heldout.truths, m.postprocess.labels), verdicts[graph],
                                len(heldout.items)))
        if graph == served_graph:
            agree = agreement(run.labels, reference.labels)
            if run.error or (agree is not None and agree < min_agreement):
                outcome.failures.append(f"{name}: the served graph {graph} agrees with fp32 on "
                                        f"{_pct(agree)} of {len(heldout.items)} samples "
                                        f"(need {_pct(min_agreement)}){'; ' + run.error if run.error else ''}")

    for label, model in loaded.items():
        if m.postprocess.kind == "embedding":
            model.close()
            continue
        served = served_run(model, heldout)
        model.close()
        graph = model.info["graph"]
        if served.error:
            outcome.failures.append(f"{name} ({label}): {served.error}")
        direct = runs.get(graph)
        if direct is not None and direct.probs is not None and served.probs is not None \
                and direct.probs.shape == served.probs.shape:
            same = direct.labels == served.labels
            print(f"  {label} served via {model.backend} ({graph}): {served.seconds:.1f} s; labels "
                  f"{'identical to' if same else 'DIFFER from'} the {graph} graph run directly "
                  f"(max score diff {float(np.abs(direct.probs - served.probs).max()):.2g})")
        served_name = name if label == "int8 package" else twin_path.name.removesuffix(".edgepkg")
        parity = model.info["parity"]
        passed = "passed before serving" + ("" if parity is None else f" ({parity['max_abs_diff']:.2g})")
        outcome.rows.append(Row(served_name, f"load -> {graph}", agreement(served.labels, reference.labels),
                                None, accuracy(served.labels, heldout.truths, m.postprocess.labels),
                                served.error or passed, len(heldout.items)))


def table(rows: Sequence[Row]) -> None:
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    for index, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if index == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("build/demo"), help="where `make demo` built")
    parser.add_argument("--samples", type=int, default=16, help="held-out inputs per package (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    parser.add_argument("--min-agreement", type=float, default=0.9,
                        help="least top-1 agreement of the served graph with fp32 (default 0.9)")
    parser.add_argument("--fp32-twin", action="store_true",
                        help="also load and serve each *.fp32.edgepkg twin (slow under emulation)")
    parser.add_argument("--require-int8", action="store_true",
                        help="fail when an int8 package serves its fp32 graph (its int8 graph failed the golden check)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    packages = sorted((args.build / "packages").glob("*.int8.edgepkg"))
    if not packages:
        print(f"verify_device: no {args.build / 'packages'}/*.int8.edgepkg; run `make demo` first", file=sys.stderr)
        return 2

    started = time.perf_counter()
    print_device()
    outcome = Outcome()
    for path in packages:
        verify_package(path, args.build, args.samples, args.threads, args.min_agreement, args.fp32_twin,
                       args.require_int8, outcome)

    heavy = [name for name in WORKSTATION_MODULES if name in sys.modules]
    if heavy:
        outcome.failures.append(f"the device side imported workstation module(s) {heavy}")
    print(f"\nworkstation modules imported: {', '.join(heavy) or 'none'} (checked {', '.join(WORKSTATION_MODULES)})")
    print(f"graph edge_sdk.load chose: "
          f"{', '.join(f'{k}: {v}' for k, v in outcome.chosen.items()) or 'none'}; "
          f"total {time.perf_counter() - started:.0f} s\n")
    table(outcome.rows)
    for note in outcome.notes:
        print(f"NOTE: {note}")
    if outcome.failures:
        print("\nFAILED:", file=sys.stderr)
        for failure in outcome.failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print("\nall packages served; every served graph agrees with fp32 on at least "
          f"{_pct(args.min_agreement)} of the samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
