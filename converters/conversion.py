"""``convert``: an ONNX model plus its pre/post-processing -> a verified ``*.edgepkg``.

Without ``quantize`` the package is fp32. With ``quantize="int8"`` the model is
calibrated on ``calibration`` and the package also carries an S8S8 graph for
TensorRT, a U8S8 graph for the onnxruntime CPU provider and the scale file.
With ``prune=...`` the graph is pruned first (see ``converters.stages.prune``), so golden
vectors, accuracy and int8 all follow the pruned graph. :func:`convert` is the list of
stages (``converters.stages``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from converters.arguments import Options, parse_options, read_samples
from converters.calibration.readers import calibration_reader
from converters.evaluate import accuracy_points
from converters.graph import ModelSource
from converters.html_report import REPORT_FILE, machine
from converters.ir import name_nodes
from converters.report import ConversionReport
from converters.stages import load
from converters.stages.assemble import assemble
from converters.stages.fp32 import fit_anomaly_threshold, fp32_stage
from converters.stages.int8 import Int8Stage, require_calibration, run_int8
from converters.stages.prune import parse_prune, run_pruning
from edge_sdk.errors import ConversionError
from runtime.manifest import ANOMALY_DETECTION, EMBEDDING_TASK, Manifest
from runtime.package import write_package
from runtime.pipeline import make_encoder

log = logging.getLogger(__name__)


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


def _html_report(manifest: Manifest, files: dict[str, bytes], golden_in: dict[str, Any], output: Any) -> bytes:
    """The package's own report page (see ``converters.html_report``), the fp32 graph and the int8
    graph this CPU serves timed here; listed and hashed in the manifest like any other member."""
    from converters.html_report import render, subject

    return render([subject(Path(os.fspath(output)).name, manifest, files, golden_in)]).encode("utf-8")


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
    ``converters.stages.prune``);
    ``name``, ``version``, ``archive``, ``golden_samples``, ``output_name``, ``threads``;
    ``sign`` (an ed25519 private key file: the package is written signed, see ``runtime.signing``);
    ``report`` (default True: ``reports/report.html`` in the package, see ``converters.html_report``).
    ``task="anomaly-detection"`` builds a PatchCore-class anomaly model onto ``model`` (any CNN) from
    ``normal`` (a folder of good images; also the default calibration data), with ``coreset_ratio``
    and ``feature_layers`` (see ``converters.patchcore``); ``labels`` default to ["ok", "defect"].
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
    if task == ANOMALY_DETECTION and calibration is None:
        calibration = opts.normal  # the backbone is calibrated on the good images
    if opts.quantize or opts.prune is not None:
        require_calibration(calibration)
    proto, manifest, tokenizer_json = load.prepare(model, output, task, labels, preprocess, tokenizer, max_length, opts)
    encoder = make_encoder(manifest, tokenizer_json)
    proto, canonical = load.canonical(proto, manifest, encoder, calibration, validation, opts)
    anomaly: dict[str, Any] | None = None
    if task == "anomaly-score":
        manifest, anomaly = fit_anomaly_threshold(proto, manifest, encoder, validation, opts)
    if task == ANOMALY_DETECTION:
        from converters.stages.anomaly import fit_anomaly_model

        proto, manifest, anomaly = fit_anomaly_model(proto, manifest, encoder, validation, opts)
    pruning: dict[str, Any] | None = None
    if opts.prune is not None:
        proto, pruning = _prune(proto, manifest, encoder, calibration, validation, opts)
    fp32 = fp32_stage(proto, manifest, encoder, calibration, validation, opts)
    int8: Int8Stage | None = None
    if opts.quantize:
        int8 = run_int8(proto, manifest, encoder, task=task, calibration=calibration,  # type: ignore[arg-type]
                        validation=fp32.validation_set, fp32=fp32.evaluation, golden_in=fp32.golden_in,
                        method=opts.method, budget=opts.budget, samples=opts.calibration_samples,
                        smoothing=opts.smoothing, progress=progress)
    manifest, files, notes = assemble(manifest, proto, fp32, int8, tokenizer_json, calibration is not None, pruning)
    manifest = replace(manifest, reports={**manifest.reports, "canonicalization": canonical})
    if anomaly is not None and int8 is not None and anomaly.get("validation") and manifest.postprocess.map_output:
        anomaly = {**anomaly, "auroc_fp32": int8.report["metric_fp32"] / 100.0,
                   "auroc_int8": {g: r["metric_int8"] / 100.0 for g, r in int8.report["per_graph"].items()}}
    if anomaly is not None:
        # fp32 only: int8 graphs are evaluated on the exact reference, whose float kernels say nothing of
        # the serving speed (bench/anomaly.py measures that on the served graph)
        if fp32.evaluation:
            anomaly = {**anomaly, "latency_ms": {"fp32": fp32.evaluation.median_latency_ms}}
        manifest = replace(manifest, reports={**manifest.reports, "anomaly": anomaly})
    manifest = replace(manifest, reports={**manifest.reports, "conversion": {**manifest.reports["conversion"],
                                                                             "machine": machine()}})
    if opts.report:
        files[REPORT_FILE] = _html_report(manifest, files, fp32.golden_in, output)
    package = write_package(manifest, files, output, archive=opts.archive, sign=opts.sign)
    log.info("wrote %s", package.path)
    return ConversionReport(
        package=str(package.path), name=manifest.name, task=task, precision=manifest.precision,
        labels=manifest.postprocess.labels, inputs=tuple(t.to_dict() for t in manifest.inputs),
        outputs=tuple(t.to_dict() for t in manifest.outputs),
        golden_samples=len(next(iter(fp32.golden_in.values()))), seconds=time.perf_counter() - start,
        validation=fp32.evaluation, notes=tuple(notes), int8=manifest.reports.get("int8"),
        pruning=manifest.reports.get("pruning"), canonicalization=canonical, anomaly=anomaly,
    )
