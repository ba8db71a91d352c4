"""The demo's main job: convert both demo models into packages and run them on held-out samples.

    python -m demo.run --build build/demo

Expects the models built by ``demo.build_image_model`` and ``demo.build_text_model``.
Each model becomes an fp32 package and an int8 one (calibrated on the demo's
calibration split). Prints, per model, a short table (sample, true label,
predicted label, score, backend, latency) and the accuracy and median latency
of fp32 and int8 over the whole held-out set; the image model also becomes a pruned package.
``demo.anomaly`` fits a defect detector on the good
surfaces alone and compares it with the supervised classifier. Then ``demo.production`` streams a
camera line through the int8 defect model and fuses reports and camera frames into
one diagnosis per asset, with similar past incidents from a knowledge base. Last, one HTML
conversion report per model (``build/demo/packages/<model>.report.html``) sets its packages side by side.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import edge_sdk
from edge_sdk.errors import PruningError
from demo._cli import run_demo
from demo._table import table

SHOWN_PER_LABEL = 2
#: The channel allocation a pruning budget search (``{"method": "structured", "budget": 1.0}``, 5.6 min
#: on 2 cores) chose for the demo image model: 12 channel groups of the late stages, 91.33 -> 90.67 points
#: on the held-out surfaces, 1.27x CPU speed. Reapplied as given, the pruned package takes seconds; if
#: the model's units ever differ from these, the demo runs the search itself.
PRUNED_CHANNELS = {f"channels:node_Conv_{n}": r for n, r in (
    (814, 0.125), (824, 0.125), (829, 0.375), (839, 0.25), (844, 0.5), (849, 0.25), (854, 0.625), (859, 0.625),
    (864, 0.625), (869, 0.5), (872, 0.25), (874, 0.5))}
PRUNE_SEARCH = {"method": "structured", "budget": 1.0}
#: The image model's int8 accuracy budget in points: half a point on 150 held-out surfaces means no
#: net loss, so every int8 graph matches fp32 (a few layers return to float where needed).
INT8_BUDGET = 0.5
#: The packages each demo model becomes.
VARIANTS: dict[str, dict[str, dict[str, object]]] = {
    "surface-defects": {"fp32": {}, "pruned": {"prune": {"method": "structured", "ratios": PRUNED_CHANNELS}},
                        "int8": {"quantize": "int8", "budget": INT8_BUDGET}},
    "fault-reports": {"fp32": {}, "int8": {"quantize": "int8"}},
}


@dataclass(frozen=True)
class Heldout:
    name: str
    items: list[tuple[str, object, str]]  # (display name, input, true label)


def _image_heldout(root: Path) -> Heldout:
    items = [(f"{p.parent.name}/{p.name}", str(p), p.parent.name) for p in sorted((root / "data" / "test").glob("*/*.png"))]
    return Heldout("surface-defects", items)


def _text_heldout(root: Path) -> Heldout:
    items = []
    for line in (root / "data" / "test.tsv").read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if text:
            items.append((text[:48] + ("..." if len(text) > 48 else ""), text, label))
    return Heldout("fault-reports", items)


def _convert(build: Path, packages: Path) -> dict[str, Path]:
    """Convert both models, fp32 and int8; a package newer than its model is reused."""
    image, text = build / "image", build / "text"
    jobs = {
        "surface-defects": (image / "model.onnx", dict(
            task="image-classification", labels=image / "labels.txt", preprocess=image / "preprocess.json",
            calibration=image / "data" / "calib", validation=image / "data" / "test")),
        "fault-reports": (text / "model.onnx", dict(
            task="text-classification", labels=text / "labels.txt", tokenizer=text / "tokenizer.json",
            max_length=128, calibration=text / "data" / "calib.txt", validation=text / "data" / "test.tsv")),
    }
    out: dict[str, Path] = {}
    for name, (model, kwargs) in jobs.items():
        for variant, extra in VARIANTS[name].items():
            target = packages / f"{name}.{variant}.edgepkg"
            out[f"{name}.{variant}"] = target
            if target.is_file() and target.stat().st_mtime > model.stat().st_mtime:
                continue
            started = time.perf_counter()
            try:
                report = edge_sdk.convert(model, target, name=name, **kwargs, **extra)  # type: ignore[arg-type]
            except PruningError as exc:  # the recorded allocation does not fit this model: search
                print(f"{target.name}: {exc.message}; searching the allocation instead (minutes)")
                extra = {**extra, "prune": PRUNE_SEARCH}
                report = edge_sdk.convert(model, target, name=name, **kwargs, **extra)  # type: ignore[arg-type]
            print(f"converted {target.name} in {time.perf_counter() - started:.1f} s")
            if report.int8:
                from converters.report import int8_lines

                print("\n".join(f"  {line}" for line in int8_lines(report.int8)[:6]))
            if report.pruning:
                from converters.report import pruning_lines

                print("\n".join(f"  {line}" for line in pruning_lines(report.pruning)[:2]))
    return out


def write_reports(packages: Path, groups: dict[str, list[Path]]) -> list[Path]:
    """One HTML conversion report per demo model, its packages side by side, next to them as
    ``<model>.report.html`` (where the daemon's console links it)."""
    from converters.html_report import write_report

    written = []
    for name, paths in groups.items():
        out = write_report(paths, packages / f"{name}.report.html")
        print(f"report: {out} ({', '.join(p.name for p in paths)}; latency timed on CPU {isa()})")
        written.append(out)
    return written


def isa() -> str:
    """This machine's CPU family as the int8 graphs see it: every figure the demo prints was measured on it."""
    import platform

    import devices

    info = devices.detect()
    vnni = sorted(info.cpu_flags & {"avx512_vnni", "avx_vnni", "asimddp"})
    return f"{platform.machine()}, {'int8 dot product: ' + ', '.join(vnni) if vnni else 'no int8 dot product'}"


def _measure(package: Path, heldout: Heldout) -> tuple[list[tuple[str, ...]], float, float, str]:
    """Predict every held-out sample one at a time: table rows, accuracy, median latency, backend."""
    with edge_sdk.load(package) as model:
        rows, latencies, hits, shown = [], [], 0, {}
        for display, item, truth in heldout.items:
            started = time.perf_counter()
            p = model.predict(item)
            latencies.append((time.perf_counter() - started) * 1e3)
            hits += p.label == truth
            if shown.get(truth, 0) < SHOWN_PER_LABEL:
                shown[truth] = shown.get(truth, 0) + 1
                rows.append((display, truth, p.label, f"{p.score:.3f}", f"{p.backend} {p.precision}",
                             f"{latencies[-1]:.1f} ms"))
        skipped = "; ".join(f"{s['backend']}: {s['reason']}" for s in model.info["skipped_backends"])
        skipped += f"; serving the {model.info['graph']} graph: {model.info['graph_reason']}"
    return rows, hits / len(heldout.items), statistics.median(latencies), skipped


def _run(packages: dict[str, Path], heldout: Heldout) -> None:
    fp32_rows, fp32_acc, fp32_ms, _ = _measure(packages[f"{heldout.name}.fp32"], heldout)
    int8_rows, int8_acc, int8_ms, skipped = _measure(packages[f"{heldout.name}.int8"], heldout)
    print(f"\n== {heldout.name}: {len(heldout.items)} held-out samples, one at a time (int8 package shown; "
          f"CPU {isa()})")
    table(("sample", "true", "predicted", "score", "backend", "latency"), int8_rows)
    print(f"fp32: accuracy {fp32_acc:.3f}, median latency {fp32_ms:.1f} ms per sample")
    print(f"int8: accuracy {int8_acc:.3f}, median latency {int8_ms:.1f} ms per sample "
          f"({fp32_ms / int8_ms:.2f}x fp32)")
    print(f"  (skipped {skipped})")


def run(build: Path) -> None:
    """Convert both demo models, run their held-out samples, then the production-line scenario."""
    packages = _convert(build, build / "packages")
    _run(packages, _image_heldout(build / "image"))
    from demo import anomaly

    anomaly.run(build, build / "packages")
    _run(packages, _text_heldout(build / "text"))
    print()
    write_reports(build / "packages", {
        **{name: [packages[f"{name}.{v}"] for v in variants] for name, variants in VARIANTS.items()},
        anomaly.NAME: [build / "packages" / f"{anomaly.NAME}.{p}.edgepkg" for p in ("fp32", "int8")]})
    from demo import production

    production.run(build)


def main(argv: list[str] | None = None) -> int:
    return run_demo(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
