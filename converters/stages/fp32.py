"""Stage 3 of ``convert()``: what the fp32 graph does, through the runtime's own pipeline: the anomaly
threshold (anomaly-score models), golden vectors and validation accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from converters.anomaly import fit_threshold
from converters.arguments import Options, golden_feeds, read_samples
from converters.data import Sample
from converters.evaluate import Evaluation, evaluate
from edge_sdk.errors import ConversionError
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import Selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fp32Stage:
    validation_set: list[Sample]
    golden_in: dict[str, np.ndarray]
    golden_out: dict[str, np.ndarray]
    evaluation: Evaluation | None


def fit_anomaly_threshold(proto: Any, manifest: Manifest, encoder: Any, validation: Any,
                           opts: Options) -> tuple[Manifest, dict[str, Any]]:
    """The declared threshold, or the one with the best balanced accuracy on the validation data."""
    post = manifest.postprocess
    if opts.threshold is not None:
        return manifest, {"threshold": post.threshold, "rule": "given"}
    samples = read_samples(manifest.task, validation, post.labels, labelled=True)
    if not samples:
        raise ConversionError("an anomaly-score model needs threshold=<score> or validation data to fit one",
                              hint=f"pass validation= a folder with {post.labels[0]}/ and {post.labels[1]}/ images")
    runner = OnnxRuntimeRunner(proto.SerializeToString(), manifest.inputs, manifest.outputs,
                               threads=opts.threads).activate()
    try:
        pipeline = Pipeline(manifest, Selection("onnxruntime-cpu", runner, ()), encoder)
        scores = [p.score for p in pipeline.predict_batch([s.item for s in samples])]
    finally:
        runner.deactivate()
    fit = fit_threshold(scores, [s.label == post.labels[1] for s in samples])
    log.info("anomaly threshold %.6g: balanced accuracy %.3f on %d validation samples",
             fit.threshold, fit.balanced_accuracy, fit.samples)
    return replace(manifest, postprocess=replace(post, threshold=fit.threshold)), fit.to_dict()


def fp32_stage(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
                opts: Options) -> Fp32Stage:
    """Golden vectors and validation accuracy of the fp32 graph, through the runtime's own pipeline."""
    labels = manifest.postprocess.labels
    runner = OnnxRuntimeRunner(proto.SerializeToString(), manifest.inputs, manifest.outputs,
                               threads=opts.threads).activate()
    pipeline = Pipeline(manifest, Selection("onnxruntime-cpu", runner, ()), encoder)
    try:
        validation_set = read_samples(manifest.task, validation, labels, labelled=True)
        golden_in = golden_feeds(manifest.task, encoder, validation_set, calibration, manifest.inputs, labels,
                                  opts.golden_samples)
        golden_out = runner.infer(golden_in)
        evaluation = evaluate(pipeline, validation_set) if validation_set else None
    finally:
        runner.deactivate()
    return Fp32Stage(validation_set, golden_in, golden_out, evaluation)
