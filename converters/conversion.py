"""``convert``: an ONNX model plus its pre/post-processing -> a verified ``*.edgepkg``.

Without ``quantize`` the package is fp32. With ``quantize="int8"`` the model is
calibrated on ``calibration`` and the package also carries an S8S8 graph for
TensorRT, a U8S8 graph for the onnxruntime CPU provider and the scale file.
With ``prune=...`` the graph is pruned first (see ``converters.prune_stage``), so golden
vectors, accuracy and int8 all follow the pruned graph.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from converters.anomaly import fit_threshold
from converters.calibration.methods import CalibrationMethod
from converters.calibration.readers import ArrayReader, calibration_reader
from converters.convert_int8 import GRAPH_FILES, Int8Stage, require_calibration, run_int8
from converters.smoothing import DEFAULT_ALPHA
from converters.data import Sample, image_samples, text_lines, tsv_samples
from converters.evaluate import Evaluation, accuracy_points, evaluate
from converters.prune_stage import parse_prune, run_pruning
from converters.canonical import canonicalize
from converters.graph import ModelSource, io_specs, load_onnx
from converters.qdq import name_nodes
from converters.report import ConversionReport
from edge_sdk.errors import ConversionError, EdgeSDKError
from runtime.manifest import POOLINGS, ImagePreprocess, Manifest, Postprocess, TensorSpec, TextPreprocess
from runtime.package import golden_bytes, write_package
from runtime.pipeline import Pipeline, make_encoder
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import Selection

log = logging.getLogger(__name__)

TASKS = ("image-classification", "text-classification", "anomaly-score")
IMAGE_TASKS = ("image-classification", "anomaly-score")
EMBEDDING_TASK = "text-embedding"  # converted by converters.knowledge
TEXT_ROLES = ("input_ids", "attention_mask", "token_type_ids")
QUANTIZE = (None, "int8")
_SYNTHETIC_TEXTS = ("pump vibration high at drive end bearing", "all parameters within limits", "oil leak seen under unit")


@dataclass(frozen=True)
class Options:
    """The keyword options ``convert`` accepts beyond its named parameters."""

    name: str | None = None
    version: str = "1"
    archive: bool = True
    golden_samples: int = 4
    output_name: str | None = None
    threads: int | None = None
    quantize: str | None = None
    method: str = "auto"
    budget: float | None = 1.0
    calibration_samples: int = 256
    smoothing: float | None = DEFAULT_ALPHA
    prune: str | dict[str, Any] | None = None
    # task "text-embedding": an incidents CSV to index, and how token vectors become one vector
    knowledge_base: str | os.PathLike[str] | None = None
    pooling: str = "mean"
    normalize: bool = True
    # task "anomaly-score": score >= threshold is the fault; None = fitted on the validation data
    threshold: float | None = None


def _options(options: Mapping[str, Any]) -> Options:
    known = set(Options.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConversionError(f"unknown option(s) {unknown}", hint=f"known options: {', '.join(sorted(known))}")
    opts = Options(**options)
    if opts.golden_samples < 1:
        raise ConversionError(f"golden_samples is {opts.golden_samples}; expected at least 1")
    if opts.quantize not in QUANTIZE:
        raise ConversionError(f"quantize is {opts.quantize!r}; expected 'int8' or None (fp32)")
    if opts.budget is not None and not opts.budget >= 0:
        raise ConversionError(f"budget is {opts.budget!r}; expected accuracy points >= 0 (e.g. 1.0) or None")
    if opts.smoothing is not None and not 0.0 <= opts.smoothing <= 1.0:
        raise ConversionError(f"smoothing is {opts.smoothing!r}; expected a migration strength in [0, 1] or None")
    if opts.calibration_samples < 1:
        raise ConversionError(f"calibration_samples is {opts.calibration_samples}; expected at least 1")
    if opts.threshold is not None and (isinstance(opts.threshold, bool) or not isinstance(opts.threshold, (int, float))
                                       or not np.isfinite(opts.threshold)):
        raise ConversionError(f"threshold is {opts.threshold!r}; expected a finite anomaly score (or None to fit it)")
    if opts.pooling not in POOLINGS:
        raise ConversionError(f"pooling is {opts.pooling!r}; expected one of {', '.join(POOLINGS)}")
    CalibrationMethod.parse(opts.method)
    if opts.prune is not None:
        parse_prune(opts.prune)
    return opts


def _labels(labels: Sequence[str] | str | os.PathLike[str] | None, task: str) -> tuple[str, ...]:
    if labels is None:
        raise ConversionError(f"task {task!r} needs labels", hint="pass labels=[...] or the path of a labels.txt")
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.is_file():
            raise ConversionError(f"labels file {str(path)!r} does not exist", hint="pass a list or a labels.txt path")
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        items = [str(label) for label in labels]
    if not items or len(set(items)) != len(items):
        raise ConversionError(f"labels {items[:10]} must be a non-empty list of unique names")
    return tuple(items)


def _image_preprocess(preprocess: Mapping[str, Any] | str | os.PathLike[str] | None) -> ImagePreprocess:
    if preprocess is None:
        raise ConversionError("an image model needs preprocess",
                              hint='e.g. {"resize": [224, 224], "mean": [127, 127, 127], "std": [128, 128, 128]}')
    if isinstance(preprocess, (str, os.PathLike)):
        try:
            preprocess = json.loads(Path(preprocess).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"preprocess file {str(preprocess)!r} cannot be read as JSON: {exc}") from None
    try:
        return ImagePreprocess.from_dict(dict(preprocess))  # type: ignore[arg-type]
    except EdgeSDKError as exc:
        raise ConversionError(exc.message, exc.hint) from None


def _check_image_input(inputs: Sequence[TensorSpec], pre: ImagePreprocess) -> None:
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ConversionError(f"an image model needs one rank-4 input; this graph has {[t.to_dict() for t in inputs]}")
    spec = inputs[0]
    if spec.dtype != pre.dtype:
        raise ConversionError(f"input '{spec.name}' is {spec.dtype} but preprocess produces {pre.dtype}",
                              hint=f'set "dtype": "{spec.dtype}" in preprocess')
    h, w = pre.output_hw
    want = (pre.channels, h, w) if pre.layout == "nchw" else (h, w, pre.channels)
    for axis, (dim, expected) in enumerate(zip(spec.shape[1:], want), start=1):
        if isinstance(dim, int) and dim != expected:
            raise ConversionError(
                f"input '{spec.name}' has shape {list(spec.shape)}, but preprocess ({pre.layout}, {pre.color}, "
                f"{h}x{w}) gives {expected} on axis {axis}",
                hint="make resize/crop, color and layout agree with the model's input",
            )


def _text_preprocess(inputs: Sequence[TensorSpec], max_length: int) -> TextPreprocess:
    names = {t.name: t for t in inputs}
    unknown = sorted(set(names) - set(TEXT_ROLES))
    if unknown or "input_ids" not in names:
        raise ConversionError(f"a text model's inputs must be input_ids [+ attention_mask, token_type_ids]; "
                              f"this graph has {sorted(names)}", hint="rename the graph inputs when exporting")
    for t in inputs:
        if t.dtype not in ("int64", "int32") or len(t.shape) != 2:
            raise ConversionError(f"text input '{t.name}' is {t.dtype} {list(t.shape)}; expected int64 [batch, sequence]")
    if not isinstance(max_length, int) or max_length < 2:
        raise ConversionError(f"max_length is {max_length!r}; expected an int >= 2")
    return TextPreprocess(max_length=max_length, attention_mask="attention_mask" if "attention_mask" in names else None,
                          token_type_ids="token_type_ids" if "token_type_ids" in names else None)


def _tokenizer(tokenizer: str | os.PathLike[str] | None) -> str:
    if tokenizer is None:
        raise ConversionError("a text model needs tokenizer", hint="pass the path of its tokenizer.json")
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"tokenizer {str(path)!r} does not exist", hint="pass a tokenizer.json file")
    return path.read_text(encoding="utf-8")


def _pick_output(outputs: Sequence[TensorSpec], name: str | None, labels: Sequence[str]) -> TensorSpec:
    candidates = [o for o in outputs if name in (None, o.name)]
    if len(candidates) != 1:
        raise ConversionError(f"cannot choose the scores output among {[o.name for o in outputs]}",
                              hint="pass output_name=... naming the [batch, classes] output")
    out = candidates[0]
    if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != len(labels)):
        raise ConversionError(f"output '{out.name}' has shape {list(out.shape)}; expected [batch, {len(labels)}] "
                              f"for the {len(labels)} labels")
    return out


def _anomaly_output(outputs: Sequence[TensorSpec], opts: Options,
                    labels: tuple[str, ...]) -> tuple[TensorSpec, Postprocess]:
    candidates = [o for o in outputs if opts.output_name in (None, o.name)]
    if len(candidates) != 1:
        raise ConversionError(f"cannot choose the anomaly score output among {[o.name for o in outputs]}",
                              hint="pass output_name=... naming the [batch] or [batch, 1] score output")
    out = candidates[0]
    if not (len(out.shape) == 1 or (len(out.shape) == 2 and out.shape[1] in (1, "1"))):
        raise ConversionError(f"output '{out.name}' has shape {list(out.shape)}; an anomaly model outputs one "
                              "score per input: [batch] or [batch, 1]")
    if len(labels) != 2:
        raise ConversionError(f"an anomaly-score model has labels {list(labels)}; expected two: [normal, fault]",
                              hint='e.g. labels=["ok", "defect"], matching the validation sub-folders')
    post = Postprocess(output=out.name, labels=labels, softmax=False, kind="anomaly",
                       threshold=0.0 if opts.threshold is None else float(opts.threshold))
    return out, post


def _fit_anomaly_threshold(proto: Any, manifest: Manifest, encoder: Any, validation: Any,
                           opts: Options) -> tuple[Manifest, dict[str, Any]]:
    """The declared threshold, or the one with the best balanced accuracy on the validation data."""
    post = manifest.postprocess
    if opts.threshold is not None:
        return manifest, {"threshold": post.threshold, "rule": "given"}
    samples = _samples(manifest.task, validation, post.labels, labelled=True)
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


def _samples(task: str, source: Any, labels: Sequence[str], labelled: bool) -> list[Sample]:
    if source is None:
        return []
    if task in IMAGE_TASKS:
        samples = image_samples(source, labels)
        if labelled and samples[0].label is None:
            raise ConversionError(f"validation folder {str(source)!r} has no label sub-folders",
                                  hint="put each image in a sub-folder named after its label")
        return samples
    return tsv_samples(source, labels) if labelled else text_lines(source)


def _golden_feeds(
    task: str, encoder: Any, validation: Sequence[Sample], calibration: Any, inputs: Sequence[TensorSpec],
    labels: Sequence[str], count: int,
) -> dict[str, np.ndarray]:
    """Golden feeds from validation data, else calibration data (raw inputs or tensors), else synthetic."""
    if not validation and calibration is not None and Path(calibration).suffix in (".npy", ".npz"):
        reader = calibration_reader(calibration, task=task, inputs=inputs, encode=encoder, limit=count)
        if isinstance(reader, ArrayReader):
            return dict(reader.arrays)
    pool = validation or _samples(task, calibration, labels, labelled=False)
    return encoder(_golden_items(task, pool, count))  # type: ignore[no-any-return]


def _golden_items(task: str, pool: Sequence[Sample], count: int) -> list[Any]:
    """Up to ``count`` inputs, spread over the labels; synthetic ones when no data was given."""
    if not pool:
        if task in IMAGE_TASKS:
            rng = np.random.default_rng(0)
            return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(count)]
        return list(_SYNTHETIC_TEXTS[:count])
    by_label: dict[str | None, list[Sample]] = {}
    for s in pool:
        by_label.setdefault(s.label, []).append(s)
    picked: list[Any] = []
    for i in range(max(len(v) for v in by_label.values())):
        picked.extend(group[i].item for group in by_label.values() if i < len(group))
    return picked[:count]



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
    label_list = _labels(labels, task)
    proto = name_nodes(load_onnx(model))  # reports and scales refer to nodes by name
    inputs, outputs = io_specs(proto)
    if task == "anomaly-score":
        out_spec, postprocess = _anomaly_output(outputs, opts, label_list)
    else:
        out_spec = _pick_output(outputs, opts.output_name, label_list)
        postprocess = Postprocess(output=out_spec.name, labels=label_list)
    tokenizer_json: str | None = None
    pre: ImagePreprocess | TextPreprocess
    if task in IMAGE_TASKS:
        pre = _image_preprocess(preprocess)
        _check_image_input(inputs, pre)
    else:
        pre = _text_preprocess(inputs, max_length)
        tokenizer_json = _tokenizer(tokenizer)
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
        validation_set = _samples(manifest.task, validation, labels, labelled=True)
        golden_in = _golden_feeds(manifest.task, encoder, validation_set, calibration, manifest.inputs, labels,
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
    samples = _samples(manifest.task, validation, labels, labelled=True)
    feeds = _golden_feeds(manifest.task, encoder, samples, calibration, manifest.inputs, labels, 8)
    canonical, report = canonicalize(proto, [feeds])
    return (proto if canonical is proto else name_nodes(canonical)), report


def _prune(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
           opts: Options) -> tuple[Any, dict[str, Any]]:
    """Prune before anything else is measured: golden vectors, accuracy and int8 follow the pruned graph."""
    spec = parse_prune(opts.prune)  # type: ignore[arg-type]
    reader = calibration_reader(calibration, task=manifest.task, inputs=manifest.inputs, encode=encoder,
                                limit=opts.calibration_samples)
    labelled = _samples(manifest.task, validation, manifest.postprocess.labels, labelled=True)
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
    opts = _options(options)
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
