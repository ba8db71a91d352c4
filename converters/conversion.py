"""``convert``: an ONNX model plus its pre/post-processing -> a verified ``*.edgepkg``.

Without ``quantize`` the package is fp32. With ``quantize="int8"`` the model is
calibrated on ``calibration`` and the package also carries an S8S8 graph for
TensorRT, a U8S8 graph for the onnxruntime CPU provider and the scale file.
With ``prune=...`` the graph is pruned first (see ``converters.prune_stage``), so golden
vectors, accuracy and int8 all follow the pruned graph.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from converters.anomaly import fit_threshold
from converters.arguments import (
    TASKS, Options, anomaly_output, check_image_input, golden_feeds, image_preprocess,
    parse_labels, parse_options, pick_output, read_samples, read_tokenizer, text_preprocess,
)
from converters.calibration.readers import calibration_reader
from converters.canonical import canonicalize
from converters.convert_int8 import GRAPH_FILES, Int8Stage, require_calibration, run_int8
from converters.data import Sample
from converters.evaluate import Evaluation, accuracy_points, evaluate
from converters.prune_stage import parse_prune, run_pruning
from converters.graph import ModelSource, io_specs, load_onnx
from converters.qdq import name_nodes
from converters.report import ConversionReport
from edge_sdk.errors import ConversionError
from runtime.manifest import EMBEDDING_TASK, IMAGE_TASKS, ImagePreprocess, Manifest, Postprocess, TextPreprocess
from runtime.package import golden_bytes, write_package
from runtime.pipeline import Pipeline, make_encoder
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import Selection

log = logging.getLogger(__name__)

def _fit_anomaly_threshold(proto: Any, manifest: Manifest, encoder: Any, validation: Any,
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


@dataclass(frozen=True)
class _Fp32Stage:
    validation_set: list[Sample]
    golden_in: dict[str, np.ndarray]
    golden_out: dict[str, np.ndarray]
    evaluation: Evaluation | None


def _prepare(
    model: ModelSource, output: Any, task: str, labels: Any, preprocess: Any, tokenizer: Any, max_length: int,
    opts: Options,
) -> tuple[Any, Manifest, str | None]:
    """Load and check the graph and the user's pre/post-processing; the manifest without files."""
    if task not in TASKS:
        raise ConversionError(f"task is {task!r}; expected one of {', '.join((*TASKS, EMBEDDING_TASK))}")
    label_list = parse_labels(labels, task)
    proto = name_nodes(load_onnx(model))  # reports and scales refer to nodes by name
    inputs, outputs = io_specs(proto)
    if task == "anomaly-score":
        out_spec, postprocess = anomaly_output(outputs, opts, label_list)
    else:
        out_spec = pick_output(outputs, opts.output_name, label_list)
        postprocess = Postprocess(output=out_spec.name, labels=label_list)
    tokenizer_json: str | None = None
    pre: ImagePreprocess | TextPreprocess
    if task in IMAGE_TASKS:
        pre = image_preprocess(preprocess)
        check_image_input(inputs, pre)
    else:
        pre = text_preprocess(inputs, max_length)
        tokenizer_json = read_tokenizer(tokenizer)
    manifest = Manifest(
        name=opts.name or Path(output).name.split(".")[0] or "model", version=opts.version, task=task,
        model="model.onnx", inputs=inputs, outputs=(out_spec,), preprocess=pre,
        postprocess=postprocess, files={},
        created_by="edge-sdk converters",
    )
    return proto, manifest, tokenizer_json


def _fp32_stage(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
                opts: Options) -> _Fp32Stage:
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
    return _Fp32Stage(validation_set, golden_in, golden_out, evaluation)


def _canonical(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
               opts: Options) -> tuple[Any, dict[str, Any]]:
    """The canonical graph every pass works on (see converters.canonical), checked on real inputs."""
    labels = manifest.postprocess.labels
    samples = read_samples(manifest.task, validation, labels, labelled=True)
    feeds = golden_feeds(manifest.task, encoder, samples, calibration, manifest.inputs, labels, 8)
    canonical, report = canonicalize(proto, [feeds])
    return (proto if canonical is proto else name_nodes(canonical)), report


def _prune(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
           opts: Options) -> tuple[Any, dict[str, Any]]:
    """Prune before anything else is measured: golden vectors, accuracy and int8 follow the pruned graph."""
    spec = parse_prune(opts.prune)  # type: ignore[arg-type]
    reader = calibration_reader(calibration, task=manifest.task, inputs=manifest.inputs, encode=encoder,
                                limit=opts.calibration_samples)
    labelled = read_samples(manifest.task, validation, manifest.postprocess.labels, labelled=True)
    metric = (lambda m: accuracy_points(manifest, m, encoder, labelled)) if labelled else None
    pruned, report = run_pruning(spec, proto, list(reader), metric)
    return name_nodes(pruned), report


def _assemble(
    manifest: Manifest, proto: Any, fp32: _Fp32Stage, int8: Int8Stage | None, tokenizer_json: str | None,
    has_calibration: bool, pruning: dict[str, Any] | None = None,
) -> tuple[Manifest, dict[str, bytes], list[str]]:
    """The final manifest (precision, graphs, reports) and every file of the package."""
    precision = "int8" if int8 else "fp32"
    notes = [] if int8 else ["precision fp32: pass quantize='int8' with calibration data for int8 graphs"]
    if has_calibration and not int8:
        notes.append("calibration data was used for golden vectors only")
    reports: dict[str, Any] = {"conversion": {"precision": precision, "notes": notes}}
    if fp32.evaluation:
        reports["validation"] = fp32.evaluation.to_dict()
    if pruning:
        reports["pruning"] = pruning
    # With int8 the fp32 graph is the prepared one (smoothed / equalized, same function), so that
    # the scale file and a TensorRT calibration cache rendered from it fit model.onnx.
    files = {"model.onnx": int8.fp32_model if int8 else proto.SerializeToString(),
             "golden.npz": golden_bytes(fp32.golden_in, fp32.golden_out, int8.golden if int8 else None)}
    if int8:
        reports["int8"] = {**int8.report, "validation": int8.evaluation.to_dict() if int8.evaluation else None}
        files.update(int8.files)
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json.encode("utf-8")
    manifest = replace(manifest, reports=reports, precision=precision, graphs=dict(GRAPH_FILES) if int8 else {})
    return manifest, files, notes


def convert(
    model: ModelSource,
    output: str | os.PathLike[str],
    *,
    task: str,
    labels: Sequence[str] | str | os.PathLike[str] | None = None,
    preprocess: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    calibration: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **options: Any,
) -> ConversionReport:
    """Convert an ONNX model into a verified package at ``output`` and report on it.

    Options: ``quantize="int8"`` with ``method`` (auto, entropy, percentile, mse,
    minmax), ``budget`` (allowed accuracy drop in points), ``calibration_samples`` and
    ``smoothing`` (transformer migration strength, None to skip); ``prune`` (see
    ``converters.prune_stage``);
    ``name``, ``version``, ``archive``, ``golden_samples``, ``output_name``, ``threads``.
    ``task="text-embedding"`` needs no labels and takes ``pooling`` (mean, cls, none), ``normalize``
    and ``knowledge_base`` (an incidents CSV to index; see ``converters.knowledge``).
    ``progress(stage, done, total)`` is called during calibration and sensitivity analysis.
    """
    start = time.perf_counter()
    opts = parse_options(options)
    if task == EMBEDDING_TASK:
        from converters.knowledge import convert_embedding  # it builds on this module

        return convert_embedding(model, output, labels=labels, preprocess=preprocess, tokenizer=tokenizer,
                                 max_length=max_length, calibration=calibration, validation=validation, opts=opts)
    if opts.knowledge_base is not None or opts.pooling != Options.pooling or opts.normalize != Options.normalize:
        raise ConversionError(f"knowledge_base, pooling and normalize are for task 'text-embedding'; task is {task!r}",
                              hint="convert the embedding model with task='text-embedding', knowledge_base=...")
    if opts.quantize or opts.prune is not None:
        require_calibration(calibration)
    proto, manifest, tokenizer_json = _prepare(model, output, task, labels, preprocess, tokenizer, max_length, opts)
    encoder = make_encoder(manifest, tokenizer_json)
    proto, canonical = _canonical(proto, manifest, encoder, calibration, validation, opts)
    anomaly: dict[str, Any] | None = None
    if task == "anomaly-score":
        manifest, anomaly = _fit_anomaly_threshold(proto, manifest, encoder, validation, opts)
    pruning: dict[str, Any] | None = None
    if opts.prune is not None:
        proto, pruning = _prune(proto, manifest, encoder, calibration, validation, opts)
    fp32 = _fp32_stage(proto, manifest, encoder, calibration, validation, opts)
    int8: Int8Stage | None = None
    if opts.quantize:
        int8 = run_int8(proto, manifest, encoder, task=task, calibration=calibration,  # type: ignore[arg-type]
                        validation=fp32.validation_set, fp32=fp32.evaluation, golden_in=fp32.golden_in,
                        method=opts.method, budget=opts.budget, samples=opts.calibration_samples,
                        smoothing=opts.smoothing, progress=progress)
    manifest, files, notes = _assemble(manifest, proto, fp32, int8, tokenizer_json, calibration is not None, pruning)
    manifest = replace(manifest, reports={**manifest.reports, "canonicalization": canonical})
    if anomaly is not None:
        manifest = replace(manifest, reports={**manifest.reports, "anomaly": anomaly})
    package = write_package(manifest, files, output, archive=opts.archive)
    log.info("wrote %s", package.path)
    return ConversionReport(
        package=str(package.path), name=manifest.name, task=task, precision=manifest.precision,
        labels=manifest.postprocess.labels, inputs=tuple(t.to_dict() for t in manifest.inputs),
        outputs=tuple(t.to_dict() for t in manifest.outputs),
        golden_samples=len(next(iter(fp32.golden_in.values()))), seconds=time.perf_counter() - start,
        validation=fp32.evaluation, notes=tuple(notes), int8=manifest.reports.get("int8"),
        pruning=manifest.reports.get("pruning"), canonicalization=canonical,
    )
