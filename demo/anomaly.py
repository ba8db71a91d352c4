"""The demo's defect detection from good parts only, next to the supervised classifier.

    python -m demo.anomaly --build build/demo

An anomaly-detection package is fitted on the demo's *good* training surfaces alone (the
EfficientNet-Lite0 classifier's ONNX as the backbone; its head is not used), its threshold set on
the calibration split, and both it and the supervised int8 classifier judge the held-out test
surfaces: image AUROC, good parts flagged, and the share of each defect class caught - classes the
anomaly model never saw. One defect's anomaly map is written over its image as
``build/demo/anomaly/heatmap.png``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import edge_sdk
from demo._cli import run_demo
from demo._table import table

NAME = "surface-anomaly"


def _validation(image: Path, out: Path) -> Path:
    """``ok/`` and ``defect/`` from the calibration split (the test split stays unseen)."""
    if out.is_dir():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for folder in sorted((image / "data" / "calib").iterdir()):
        target = staging / ("ok" if folder.name == "ok" else "defect")
        target.mkdir(parents=True, exist_ok=True)
        for png in sorted(folder.glob("*.png")):
            dest = target / f"{folder.name}_{png.name}"
            try:
                os.link(png, dest)
            except OSError:
                shutil.copyfile(png, dest)
    staging.rename(out)
    return out


def convert(build: Path, packages: Path) -> dict[str, Path]:
    """The fp32 and int8 anomaly packages; one newer than the backbone is reused."""
    image = build / "image"
    validation = _validation(image, build / "anomaly" / "validation")
    out = {}
    for precision in ("fp32", "int8"):
        target = packages / f"{NAME}.{precision}.edgepkg"
        out[precision] = target
        if target.is_file() and target.stat().st_mtime > (image / "model.onnx").stat().st_mtime:
            continue
        started = time.perf_counter()
        report = edge_sdk.convert(image / "model.onnx", target, task="anomaly-detection", name=NAME,
                                  normal=image / "data" / "train" / "ok", preprocess=image / "preprocess.json",
                                  validation=validation, **({"quantize": "int8"} if precision == "int8" else {}))
        print(f"converted {target.name} in {time.perf_counter() - started:.1f} s")
        from converters.report import anomaly_lines

        assert report.anomaly is not None
        print("\n".join(f"  {line}" for line in anomaly_lines(report.anomaly)))
    return out


def _judge(package: Path, items: list[tuple[str, str]], defect_score: Any) -> dict[str, Any]:
    """Every test surface through ``package``: its defect score, decision and latency."""
    with edge_sdk.load(package) as model:
        scores, flagged, ms = [], [], []
        for path, _ in items:
            started = time.perf_counter()
            p = model.predict(path)
            ms.append((time.perf_counter() - started) * 1e3)
            scores.append(defect_score(p))
            flagged.append(p.label != "ok")
        return {"scores": np.array(scores), "flagged": np.array(flagged), "ms": statistics.median(ms),
                "backend": f"{model.backend} {model.info['precision']}"}


def _row(title: str, result: dict[str, Any], truth: list[str], classes: list[str]) -> tuple[str, ...]:
    from converters.patchcore import auroc

    labels = np.array(truth)
    auc = auroc(result["scores"], labels != "ok")
    caught = [f"{np.mean(result['flagged'][labels == c]):.0%}" for c in classes]
    return (title, f"{auc:.4f}", f"{np.mean(result['flagged'][labels == 'ok']):.0%}", *caught,
            f"{result['ms']:.1f} ms", result["backend"])


def _heatmap(package: Path, path: str, out: Path) -> None:
    with edge_sdk.load(package) as model:
        p = model.predict(path)
    img = cv2.imread(path)
    amap = np.asarray(p.extra["anomaly_map"], dtype=np.float32)
    post = model.pipeline.manifest.postprocess
    low, high = float(post.normal_score or 0.0), float(post.threshold or amap.max())
    heat = np.clip((amap - low) / max(high - low, 1e-6), 0, 1.5) / 1.5
    heat = cv2.resize((heat * 255).astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    overlay = cv2.addWeighted(img, 0.55, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.45, 0)
    cv2.putText(overlay, f"{p.label} {p.score:.2f}", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.hstack([img, overlay]))


def run(build: Path, packages: Path | None = None, classifier: Path | None = None) -> None:
    packages = packages or build / "packages"
    anomaly = convert(build, packages)
    image = build / "image"
    items = [(str(p), p.parent.name) for p in sorted((image / "data" / "test").glob("*/*.png"))]
    truth = [label for _, label in items]
    classes = sorted({label for label in truth if label != "ok"})
    print(f"\n== good parts only: the anomaly model was fitted on {len(list((image / 'data' / 'train' / 'ok').glob('*.png')))}"
          f" good surfaces and never saw a defect; {len(items)} held-out test surfaces")
    rows = [_row(f"anomaly {precision}", _judge(path, items, lambda p: p.score), truth, classes)
            for precision, path in anomaly.items()]
    classifier = classifier or packages / "surface-defects.int8.edgepkg"
    if classifier.is_file():
        rows.append(_row("classifier int8 (supervised)", _judge(classifier, items, lambda p: 1.0 - p.scores["ok"]),
                         truth, classes))
    table(("model", "AUROC", "good flagged", *(f"{c} caught" for c in classes), "latency", "backend"), rows)
    example = next(path for path, label in items if label != "ok")
    _heatmap(anomaly["int8"], example, build / "anomaly" / "heatmap.png")
    print(f"anomaly map of {Path(example).parent.name}/{Path(example).name}: {build / 'anomaly' / 'heatmap.png'}")


def main(argv: list[str] | None = None) -> int:
    return run_demo(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
