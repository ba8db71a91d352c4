"""Benchmark: structured pruning, int8, and both, on the demo models, through ``edge_sdk.convert``.

    python -m bench.prune [--out build/bench/prune.json] [--quick]

Models: the demo models that ``make demo`` builds under ``build/demo/`` (built here with
``demo.build_image_model`` / ``demo.build_text_model`` when missing, 1-2 minutes):

* **image**: EfficientNet-Lite0 + 5-class head, ``data/calib/<label>/*.png`` for calibration,
  ``data/test/<label>/*.png`` held out (labelled);
* **text**: MiniLM-L6 + 8-class head, ``data/calib.txt`` for calibration, ``data/test.tsv``
  (label<TAB>text) held out (exported with the TorchScript exporter);
* **image-ts**: the same image classifier exported again with torch's TorchScript exporter
  (``dynamo=False``, opset 17: 456 nodes, its "same" padding as Constant/Pad chains, where the demo's
  dynamo export has 94), same data. The conversion canonicalizes both; the ``flavours`` line compares
  the units the pruning search found and the speed-ups.

Variants, each one ``edge_sdk.convert(...)`` call with the SDK's public options, so the numbers are
what users get (``validation=`` is the held-out set, as in ``demo.run``; the pruning budget is
therefore chosen on the same samples that the accuracy column is measured on):

1. **fp32**: no options, the baseline every ratio is taken against, timed in the same run;
2. **pruned**: ``prune={"method": "structured", "budget": 1.0}`` (the per-unit allocation whose
   validation accuracy stays within 1 point, see ``converters.pruning.allocation``). If none fits
   (``PruningError``) that is recorded and a fixed ``{"method": "structured", "ratio": 0.1}``
   variant is run as well;
3. **int8**: ``quantize="int8"``;
4. **pruned+int8**: ``prune={"method": "structured", "budget": 1.0}, quantize="int8"``, run as
   ``{"method": "structured", "ratios": <the allocation the budget variant chose>}``: the same
   pruned graph (pruning is deterministic) without repeating the budget search, which dominates
   the run time.

For every package: its report (``report.to_dict()``: validation accuracy, the ``pruning`` section
with params and MACs before/after, the SDK's own cpu_speedup, the chosen allocation and every
allocation the search measured (``budget_steps``), the
``int8`` section), then throughput measured here: ``edge_sdk.load(pkg, backend="onnxruntime-cpu",
threads=2)`` and ``model.predict_batch(items, max_batch=8)`` over a fixed held-out set (64 image
paths / 64 texts; 32 with ``--quick``), i.e. preprocessing and tokenization included. After one
untimed warm-up per variant, the timed calls go round-robin over the variants (5 rounds, a short
pause before each call so that an idle thread pool's spinning is not charged to the next one);
b8 samples/s is the set size over the median call time. Each round also times the model alone
(``model x fp32``): the runner's ``infer`` on the same held-out set preprocessed once, in batches of
8, since image decoding and tokenization cost the same whatever the graph. Accuracy and top-1
agreement with fp32 come from the warm-up predictions (labels known).

A variant whose conversion or run raises is reported with its error, not fatal. The machine is
shared: read the ratios, not the absolute numbers. Nothing is asserted; the issue's targets are
printed as met / not met from the measured numbers. ``--quick``: 32 held-out samples and
``calibration_samples=64``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._log import Log
import edge_sdk
from edge_sdk.errors import PruningError

BUDGET = 1.0
FALLBACK_RATIO = 0.1
ROUNDS = 5
MAX_BATCH = 8
THREADS = 2
# The issue's targets.
TARGET_PRUNED_SPEEDUP = 1.3

log = Log("prune")


@dataclass
class Variant:
    name: str
    options: dict[str, Any]
    package: str | None = None
    convert_s: float | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    params: int | None = None
    accuracy: float | None = None  # held-out, points, from our own predictions
    agreement: float | None = None  # top-1 agreement with fp32, percent
    b8_sps: float | None = None
    ratio: float | None = None
    times_s: list[float] = field(default_factory=list)
    graph_sps: float | None = None  # the model alone: infer() on the preprocessed batches
    graph_ratio: float | None = None
    graph_times_s: list[float] = field(default_factory=list)
    labels_pred: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("labels_pred")
        return out


# --- data ---------------------------------------------------------------------------------------


def ensure_built(build: Path) -> None:
    for kind, module in (("image", "demo.build_image_model"), ("text", "demo.build_text_model")):
        if (build / kind / "model.onnx").exists():
            continue
        log(f"building the {kind} demo model ({module}), 1-2 minutes")
        subprocess.run([sys.executable, "-m", module, "--out", str(build / kind)], check=True)


def _spread(items: list[tuple[Any, str]], n: int) -> list[tuple[Any, str]]:
    """``n`` items evenly spaced over the (label-sorted) list, so every label is represented."""
    if len(items) <= n:
        return items
    return [items[(i * len(items)) // n] for i in range(n)]


def image_job(root: Path, n: int) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    items = [(str(p), p.parent.name) for p in sorted((root / "data" / "test").glob("*/*.png"))]
    kwargs = dict(task="image-classification", labels=root / "labels.txt", preprocess=root / "preprocess.json",
                  calibration=root / "data" / "calib", validation=root / "data" / "test")
    return kwargs, _spread(items, n)


def text_job(root: Path, n: int) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    items = []
    for line in (root / "data" / "test.tsv").read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if text:
            items.append((text, label))
    items.sort(key=lambda x: x[1])
    kwargs = dict(task="text-classification", labels=root / "labels.txt", tokenizer=root / "tokenizer.json",
                  max_length=128, calibration=root / "data" / "calib.txt", validation=root / "data" / "test.tsv")
    return kwargs, _spread(items, n)


# --- conversion ---------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def convert(model: Path, kwargs: dict[str, Any], v: Variant, tmp: Path, extra: dict[str, Any]) -> None:
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in v.name)
    target = tmp / f"{model.parent.name}-{safe}.edgepkg"  # the file stem becomes the package name
    start = time.perf_counter()
    try:
        report = edge_sdk.convert(model, target, **kwargs, **v.options, **extra)
    except PruningError:
        v.convert_s = time.perf_counter() - start
        raise
    except Exception as exc:  # an SDK crash: record it, go on with the other variants
        v.convert_s = time.perf_counter() - start
        v.error = _short(exc)
        log(f"{v.name}: convert failed after {v.convert_s:.1f} s: {v.error}\n{traceback.format_exc()}")
        return
    v.convert_s = time.perf_counter() - start
    v.package = report.package
    v.report = report.to_dict()
    pruning = v.report.get("pruning") or {}
    v.params = pruning.get("params_after")
    log(f"{v.name}: converted in {v.convert_s:.1f} s")


def pruning_summary(pruning: dict[str, Any] | None) -> dict[str, Any] | None:
    if not pruning:
        return None
    chosen = pruning.get("chosen") or {}
    ratios = chosen.get("ratios") or {}
    steps = pruning.get("budget_steps") or []
    layers = pruning.get("layers") or []
    notes = pruning.get("notes") or []
    kinds = dict(Counter(key.split(":", 1)[0] for key in ratios))
    return {
        "params_before": pruning.get("params_before"), "params_after": pruning.get("params_after"),
        "macs_before": pruning.get("macs_before"), "macs_after": pruning.get("macs_after"),
        "cpu_speedup_sdk": pruning.get("cpu_speedup"), "ratios": ratios, "units_by_kind": kinds,
        "step": chosen.get("step"), "of": chosen.get("of"), "budget_steps": steps,
        "accuracy_before": pruning.get("accuracy_before"), "accuracy_after": pruning.get("accuracy_after"),
        "groups_pruned": len(layers), "groups_refused": len(notes), "notes_sample": notes[:5],
    }


# --- measurement --------------------------------------------------------------------------------


def measure(variants: list[Variant], items: list[tuple[Any, str]]) -> None:
    inputs = [x for x, _ in items]
    truth = [y for _, y in items]
    models: dict[str, Any] = {}
    feeds: list[dict[str, Any]] = []  # the held-out set preprocessed once, in batches of MAX_BATCH
    for v in variants:
        if v.package is None:
            continue
        try:
            models[v.name] = edge_sdk.load(v.package, backend="onnxruntime-cpu", threads=THREADS)
            preds = models[v.name].predict_batch(inputs, max_batch=MAX_BATCH)  # warm-up, and the predictions
            if not feeds:
                pipeline = models[v.name].pipeline
                feeds = [pipeline.encode(inputs[i:i + MAX_BATCH]) for i in range(0, len(inputs), MAX_BATCH)]
            for batch in feeds:
                models[v.name].pipeline.infer(batch)
            v.labels_pred = [p.label for p in preds]
            v.accuracy = 100.0 * sum(p == t for p, t in zip(v.labels_pred, truth)) / len(truth)
        except Exception as exc:
            v.error = f"run: {_short(exc)}"
            log(f"{v.name}: load/predict failed: {v.error}\n{traceback.format_exc()}")
            models.pop(v.name, None)
    for _ in range(ROUNDS):
        for v in variants:
            model = models.get(v.name)
            if model is None:
                continue
            time.sleep(0.05)
            try:
                t = time.perf_counter()
                model.predict_batch(inputs, max_batch=MAX_BATCH)
                v.times_s.append(time.perf_counter() - t)
                time.sleep(0.05)
                t = time.perf_counter()
                for batch in feeds:
                    model.pipeline.infer(batch)
                v.graph_times_s.append(time.perf_counter() - t)
            except Exception as exc:
                v.error = f"run: {_short(exc)}"
                models.pop(v.name).close()
    for model in models.values():
        model.close()
    base = next((v for v in variants if v.name == "fp32"), None)
    for v in variants:
        if v.times_s:
            v.b8_sps = len(inputs) / statistics.median(v.times_s)
        if base is not None and base.labels_pred and v.labels_pred:
            v.agreement = 100.0 * sum(a == b for a, b in zip(base.labels_pred, v.labels_pred)) / len(inputs)
        if base is not None and base.b8_sps and v.b8_sps:
            v.ratio = v.b8_sps / base.b8_sps
        if v.graph_times_s:
            v.graph_sps = len(inputs) / statistics.median(v.graph_times_s)
        if base is not None and base.graph_sps and v.graph_sps:
            v.graph_ratio = v.graph_sps / base.graph_sps


# --- per model ----------------------------------------------------------------------------------


def bench_model(kind: str, model: Path, kwargs: dict[str, Any], items: list[tuple[Any, str]],
                args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    extra: dict[str, Any] = {"calibration_samples": 64} if args.quick else {}
    log(f"{kind}: {model}, {len(items)} held-out samples for timing and accuracy")
    prune_budget = {"method": "structured", "budget": BUDGET}
    planned = [
        Variant("fp32", {}),
        Variant("pruned", {"prune": prune_budget}),
        Variant("int8", {"quantize": "int8"}),
        Variant("pruned+int8", {"prune": prune_budget, "quantize": "int8"}),
    ]
    variants: list[Variant] = []
    budget_failed: str | None = None
    for v in planned:
        # fp32 gets no extra options, as the brief says; calibration_samples only matters with calibration
        opts = extra if v.options else {}
        if v.name == "pruned+int8" and variants[1].report:
            # The budget variant's allocation, reapplied without its search (pruning is deterministic,
            # and the search dominates the run time).
            ratios = (pruning_summary(variants[1].report.get("pruning")) or {}).get("ratios")
            if ratios:
                v.options = {"prune": {"method": "structured", "ratios": ratios}, "quantize": "int8"}
        if budget_failed and "prune" in v.options:
            v.error = f"PruningError: {budget_failed}"
            variants.append(v)
            continue
        try:
            convert(model, kwargs, v, tmp, opts)
        except PruningError as exc:
            budget_failed = str(exc)
            v.error = f"PruningError: {exc}"
            log(f"{v.name}: {v.error}; adding a fixed ratio {FALLBACK_RATIO} variant")
            variants.append(v)
            fixed = Variant(f"pruned r={FALLBACK_RATIO}", {"prune": {"method": "structured", "ratio": FALLBACK_RATIO}})
            try:
                convert(model, kwargs, fixed, tmp, opts)
            except PruningError as exc2:
                fixed.error = f"PruningError: {exc2}"
            variants.append(fixed)
            continue
        variants.append(v)
    log(f"{kind}: timing {sum(v.package is not None for v in variants)} packages")
    measure(variants, items)
    fp32 = variants[0]
    if fp32.params is None and fp32.report is not None:  # unpruned: the pruned report's "before" count
        before = next((v.report["pruning"]["params_before"] for v in variants
                       if v.report and v.report.get("pruning")), None)
        for v in variants:
            if v.report is not None and not v.report.get("pruning"):
                v.params = before
    return {"model": str(model), "held_out": len(items), "variants": [
        {**v.row(), "pruning_summary": pruning_summary((v.report or {}).get("pruning"))} for v in variants]}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    by = {v["name"]: v for v in result["variants"]}
    pruned = by.get("pruned") if by.get("pruned", {}).get("ratio") else by.get(f"pruned r={FALLBACK_RATIO}")
    name = pruned["name"] if pruned else None
    out: dict[str, Any] = {}
    for what, key, sps in (("model alone", "graph_ratio", "graph_sps"), ("end to end", "ratio", "b8_sps")):
        speed = pruned.get(key) if pruned else None
        out[f"structured pruning alone >= {TARGET_PRUNED_SPEEDUP}x faster than fp32 on the CPU at a {BUDGET}-point "
            f"budget ({what})"] = {"variant": name, "value": speed,
                                   "met": None if speed is None else bool(speed >= TARGET_PRUNED_SPEEDUP
                                                                          and name == "pruned")}
        p8, i8 = by.get("pruned+int8", {}).get(sps), by.get("int8", {}).get(sps)
        out[f"pruned+int8 ahead of int8 alone ({what})"] = {
            "value": None if not (p8 and i8) else p8 / i8, "met": None if not (p8 and i8) else bool(p8 > i8)}
    return out


def flavours(dynamo: dict[str, Any], torchscript: dict[str, Any]) -> dict[str, Any]:
    """The budget-pruned variant of both exports: canonical graph, units found and speed-ups, side by side."""
    def pick(result: dict[str, Any]) -> dict[str, Any]:
        v = next((v for v in result["variants"] if v["name"] == "pruned"), {})
        ps = v.get("pruning_summary") or {}
        canon = (v.get("report") or {}).get("canonicalization") or {}
        return {"nodes": [canon.get("nodes_before"), canon.get("nodes_after")], "units": ps.get("units_by_kind"),
                "unit_names": sorted(ps.get("ratios") or {}), "model_speedup": v.get("graph_ratio"),
                "end_to_end_speedup": v.get("ratio"), "error": v.get("error")}

    a, b = pick(dynamo), pick(torchscript)
    same_units = a["units"] == b["units"] and len(a["unit_names"]) == len(b["unit_names"])
    within = (None if not (a["model_speedup"] and b["model_speedup"])
              else abs(b["model_speedup"] / a["model_speedup"] - 1) <= 0.10)
    return {"dynamo": a, "torchscript": b, "same units found": same_units, "model speed-up within 10%": within}


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(kind: str, result: dict[str, Any]) -> None:
    print(f"\n== {kind}: {result['model']} ({result['held_out']} held-out samples, b8 = predict_batch max_batch=8) ==")
    print(f"{'variant':<16}{'params':>12}{'MACs':>8}{'acc %':>8}{'agree %':>9}{'b8 smp/s':>10}{'x fp32':>8}"
          f"{'model x fp32':>13}{'SDK val acc':>12}{'convert s':>10}  error")
    for v in result["variants"]:
        ps = v["pruning_summary"] or {}
        val = ((v["report"] or {}).get("validation") or {}).get("accuracy")
        macs = f"{ps['macs_after'] / 1e6:.0f}M" if ps.get("macs_after") else "-"
        print(f"{v['name']:<16}{_fmt(v['params'], ','):>12}{macs:>8}"
              f"{_fmt(v['accuracy'], '.1f'):>8}{_fmt(v['agreement'], '.1f'):>9}{_fmt(v['b8_sps'], '.1f'):>10}"
              f"{_fmt(v['ratio'], '.2f'):>8}{_fmt(v['graph_ratio'], '.2f'):>13}{_fmt(val, '.3f'):>12}{_fmt(v['convert_s'], '.1f'):>10}  {v['error'] or ''}")
    for v in result["variants"]:
        ps = v["pruning_summary"]
        if ps:
            steps = ", ".join(f"{s.get('step')}: drop {s['drop']:.2f}, MACs -{100 * s.get('macs_saved', 0):.0f}%"
                              for s in sorted(ps["budget_steps"], key=lambda s: s.get("step", 0)) if "drop" in s)
            units = ", ".join(f"{n} {k}" for k, n in ps["units_by_kind"].items()) or "-"
            print(f"  {v['name']}: params {ps['params_before']:,} -> {ps['params_after']:,}, MACs "
                  f"{ps['macs_before'] / 1e6:.0f}M -> {ps['macs_after'] / 1e6:.0f}M, SDK cpu_speedup "
                  f"{_fmt(ps['cpu_speedup_sdk'], '.2f')}x, units {units}, refused (notes) {ps['groups_refused']}")
            if steps:
                print(f"    allocation path steps measured (step of {ps['of']}): {steps}; chosen {ps['step']}")
        int8 = (v["report"] or {}).get("int8")
        if int8:
            agree = (int8.get("agreement_with_fp32") or {}).get("top1_agreement")
            print(f"  {v['name']}: int8 {int8.get('method')} on {int8.get('samples')} samples, metric "
                  f"{_fmt(int8.get('metric_int8'), '.2f')} vs fp32 {_fmt(int8.get('metric_fp32'), '.2f')}, "
                  f"SDK top-1 agreement {_fmt(None if agree is None else 100 * agree, '.1f')}%")
    for name, t in result["targets"].items():
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"  target: {name}: {_fmt(t['value'], '.2f')} -> {state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/prune.json"))
    parser.add_argument("--build", type=Path, default=Path("build/demo"), help="where the demo models are (built)")
    parser.add_argument("--quick", action="store_true", help="32 held-out samples, calibration_samples=64")
    parser.add_argument("--models", default="image,image-ts,text", help="comma-separated subset of image,image-ts,text")
    args = parser.parse_args(argv)
    n = 32 if args.quick else 64
    ensure_built(args.build)
    results: dict[str, Any] = {"quick": args.quick, "threads": THREADS, "rounds": ROUNDS, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp_name:
        tmp = Path(tmp_name)
        for kind in args.models.split(","):
            root = args.build / ("text" if kind == "text" else "image")
            kwargs, items = (text_job if kind == "text" else image_job)(root, n)
            model = root / "model.onnx"
            if kind == "image-ts":
                from bench._models import demo_image_torchscript

                model = demo_image_torchscript(root, args.out.parent)
            result = bench_model(kind, model, kwargs, items, args, tmp)
            result["targets"] = targets(result)
            results["models"][kind] = result
            print_table(kind, result)
    if {"image", "image-ts"} <= set(results["models"]):
        results["flavours"] = flavours(results["models"]["image"], results["models"]["image-ts"])
        print(f"\nflavours (dynamo vs TorchScript export of the image classifier): {results['flavours']}")
    log.write(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
