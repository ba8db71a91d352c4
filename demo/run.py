"""The demo's main job: convert both demo models into packages and run them on held-out samples.

    python -m demo.run --build build/demo

Expects the models built by ``demo.build_image_model`` and ``demo.build_text_model``.
Prints, per model, a short table (sample, true label, predicted label, score,
backend, latency) and the accuracy and median latency over the whole held-out set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import edge_sdk
from edge_sdk.errors import EdgeSDKError

SHOWN_PER_LABEL = 2


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
    image, text = build / "image", build / "text"
    out = {"surface-defects": packages / "surface-defects.edgepkg", "fault-reports": packages / "fault-reports.edgepkg"}
    started = time.perf_counter()
    edge_sdk.convert(image / "model.onnx", out["surface-defects"], task="image-classification",
                     labels=image / "labels.txt", preprocess=image / "preprocess.json",
                     calibration=image / "data" / "calib", validation=image / "data" / "test")
    edge_sdk.convert(text / "model.onnx", out["fault-reports"], task="text-classification",
                     labels=text / "labels.txt", tokenizer=text / "tokenizer.json", max_length=128,
                     calibration=text / "data" / "calib.txt", validation=text / "data" / "test.tsv")
    print(f"converted 2 packages into {packages} in {time.perf_counter() - started:.1f} s")
    return out


def _run(package: Path, heldout: Heldout) -> None:
    with edge_sdk.load(package) as model:
        print(f"\n== {heldout.name}: {package.name} on {model.backend} "
              f"({len(heldout.items)} held-out samples, one at a time)")
        rows, latencies, hits, shown = [], [], 0, {}
        for display, item, truth in heldout.items:
            started = time.perf_counter()
            p = model.predict(item)
            latencies.append((time.perf_counter() - started) * 1e3)
            hits += p.label == truth
            if shown.get(truth, 0) < SHOWN_PER_LABEL:
                shown[truth] = shown.get(truth, 0) + 1
                rows.append((display, truth, p.label, f"{p.score:.3f}", p.backend, f"{latencies[-1]:.1f} ms"))
        _table(("sample", "true", "predicted", "score", "backend", "latency"), rows)
        print(f"accuracy {hits / len(heldout.items):.3f} ({hits}/{len(heldout.items)}), "
              f"median latency {statistics.median(latencies):.1f} ms per sample")
        for s in model.info["skipped_backends"]:
            print(f"  (skipped {s['backend']}: {s['reason']})")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("build/demo"), help="where the demo models were built")
    args = parser.parse_args(argv)
    try:
        packages = _convert(args.build, args.build / "packages")
        _run(packages["surface-defects"], _image_heldout(args.build / "image"))
        _run(packages["fault-reports"], _text_heldout(args.build / "text"))
    except EdgeSDKError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
