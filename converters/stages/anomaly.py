"""Stage 2b of ``convert()`` for ``task="anomaly-detection"``: a PatchCore-class anomaly model fitted
on a folder of good images (see :mod:`converters.patchcore`), the backbone and the head one graph.

The good images are split: every ``HOLDOUT``-th is held out of the memory bank. With labelled
validation data (sub-folders ``ok/`` and ``defect/``, the labels) the threshold is the one with the
best balanced accuracy there; without it, the ``QUANTILE`` quantile of the held-out good scores.
Either way the typical good score (the held-out median) goes into the manifest, so every device
normalises and decides alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import onnx

from converters import ir, patchcore
from converters.anomaly import fit_threshold
from converters.arguments import Options, read_samples
from converters.data import Sample, image_samples
from edge_sdk.errors import ConversionError
from runtime.manifest import Manifest, Postprocess, TensorSpec

log = logging.getLogger(__name__)

HOLDOUT = 8  # every 8th good image scores the threshold / the typical good score instead of joining the bank
QUANTILE = 0.99  # threshold without validation data: this quantile of the held-out good scores
BATCH = 16
HISTOGRAM_BINS = 20


def _batches(encoder: Any, items: Sequence[str]) -> list[dict[str, np.ndarray]]:
    return [encoder(list(items[i:i + BATCH])) for i in range(0, len(items), BATCH)]


def _run(model: onnx.ModelProto, encoder: Any, items: Sequence[str], output: int = 0) -> np.ndarray:
    outs = ir.outputs_on(model, _batches(encoder, items))
    per_batch = len(model.graph.output)
    return np.concatenate(outs[output::per_batch]).astype(np.float32)


def _good_images(normal: Any) -> list[str]:
    if normal is None:
        raise ConversionError("task 'anomaly-detection' needs normal= a folder of good images",
                              hint="e.g. normal='data/good' (200 images of good parts is plenty)")
    items = [s.item for s in image_samples(normal)]
    if len(items) < 2:
        raise ConversionError(f"normal folder {str(normal)!r} holds {len(items)} image; expected at least 2",
                              hint="give the good images the memory bank is built from")
    return items


def _histogram(scores: np.ndarray, defect: np.ndarray, threshold: float) -> dict[str, Any]:
    lo, hi = float(min(scores.min(), threshold)), float(max(scores.max(), threshold))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, HISTOGRAM_BINS + 1)
    return {"edges": [float(e) for e in edges], "threshold": threshold,
            "ok": np.histogram(scores[~defect], edges)[0].tolist(),
            "defect": np.histogram(scores[defect], edges)[0].tolist()}


def evaluate_scores(scores: np.ndarray, defect: np.ndarray, threshold: float) -> dict[str, Any]:
    """Image AUROC, F1 at ``threshold`` and the score histograms of good vs defect images."""
    out: dict[str, Any] = {"samples": int(len(scores)), "defects": int(defect.sum())}
    if defect.any() and (~defect).any():
        out["auroc"] = patchcore.auroc(scores, defect)
    out.update(patchcore.f1_at(scores, defect, threshold))
    out["histogram"] = _histogram(scores, defect, threshold)
    return out


def fit_anomaly_model(proto: onnx.ModelProto, manifest: Manifest, encoder: Any, validation: Any,
                      opts: Options) -> tuple[onnx.ModelProto, Manifest, dict[str, Any]]:
    """The backbone ``proto`` with the PatchCore head, the manifest describing its two outputs, and the
    fit report (layers, bank, threshold rule, AUROC/F1 and histograms on the validation data)."""
    start = time.perf_counter()
    pre = manifest.preprocess
    size = tuple(pre.resize) if getattr(pre, "resize", None) else None  # type: ignore[union-attr]
    if size is None:
        raise ConversionError("anomaly detection needs a fixed input size: preprocess resize=[H, W]")
    layout = getattr(pre, "layout", "nchw")
    if layout != "nchw":
        raise ConversionError(f"anomaly detection reads NCHW feature maps; preprocess layout is {layout!r}",
                              hint='give the backbone an NCHW input: preprocess layout "nchw"')
    images = _good_images(opts.normal)
    held = images[HOLDOUT - 1::HOLDOUT] or images[-1:]
    fit = [p for p in images if p not in set(held)]
    layers = patchcore.feature_layers(proto, (int(size[0]), int(size[1])), opts.feature_layers)
    raw = _run(patchcore.patch_graph(proto, layers), encoder, fit[::4] or fit)
    weights = patchcore.layer_weights(raw, layers)
    patches = patchcore.patch_graph(proto, layers, weights)
    features = _run(patches, encoder, fit)
    bank_in = features.reshape(-1, features.shape[-1])
    count = max(1, int(round(opts.coreset_ratio * len(bank_in))))
    t0 = time.perf_counter()
    chosen = patchcore.greedy_coreset(bank_in, count)
    coreset_s = time.perf_counter() - t0
    model = ir.name_nodes(patchcore.head_graph(patches, layers, bank_in[chosen]))
    held_scores = _run(model, encoder, held)
    typical = float(np.median(held_scores))
    labels = manifest.postprocess.labels
    samples: list[Sample] = read_samples(manifest.task, validation, labels, labelled=True)
    report: dict[str, Any] = {
        "method": "patchcore", "layers": [m.to_dict() for m in layers], "layer_weights": weights,
        "layers_chosen": "given" if opts.feature_layers else "stage outputs at strides "
                         + ", ".join(str(s) for s in patchcore.STRIDES),
        "grid": [patchcore.grid_layer(layers).height, patchcore.grid_layer(layers).width],
        "good_images": len(images), "bank_images": len(fit), "held_out_images": len(held),
        "patches": int(len(bank_in)), "memory_bank": int(count), "feature_dim": int(bank_in.shape[1]),
        "coreset_ratio": opts.coreset_ratio, "coreset_seconds": coreset_s, "normal_score": typical,
        "held_out_scores": {"median": typical, "max": float(held_scores.max())},
    }
    scores = _run(model, encoder, [s.item for s in samples]) if samples else np.zeros(0, np.float32)
    defect = np.array([s.label == labels[1] for s in samples], dtype=bool)
    if opts.threshold is not None:
        threshold, rule = float(opts.threshold), "given"
    elif samples:
        fitted = fit_threshold(scores, defect)
        threshold, rule = fitted.threshold, "max balanced accuracy on the validation data"
    else:
        threshold = float(np.quantile(held_scores, QUANTILE))
        rule = (f"{QUANTILE:.0%} quantile of the scores of {len(held)} held-out good images "
                "(no validation data: pass validation= with ok/ and defect/ images to fit it on defects)")
    report.update(threshold=threshold, threshold_rule=rule)
    normal_score: float | None = typical
    if not threshold > typical:  # a given (or degenerate) threshold at or below a good part's score
        report["normal_score"] = normal_score = None
        report["notes"] = ["the threshold is not above the typical good score: predictions carry no normalised score"]
    if samples:
        report["validation"] = evaluate_scores(scores, defect, threshold)
    report["fit_seconds"] = time.perf_counter() - start
    dims = model.graph.output[1].type.tensor_type.shape.dim
    hm, wm = int(dims[1].dim_value), int(dims[2].dim_value)
    outputs = (TensorSpec(patchcore.SCORE, "float32", ("batch",)),
               TensorSpec(patchcore.MAP, "float32", ("batch", hm, wm)))
    post = Postprocess(output=patchcore.SCORE, labels=labels, softmax=False, kind="anomaly", threshold=threshold,
                       map_output=patchcore.MAP, normal_score=normal_score)
    log.info("anomaly model: %d-patch memory bank (%d dims) from %d good images; threshold %.4g (%s)",
             count, bank_in.shape[1], len(fit), threshold, rule)
    return model, replace(manifest, outputs=outputs, postprocess=post), report
