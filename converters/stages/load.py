"""Stage 1 of ``convert()``: load and check the graph, describe the package, canonicalize."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converters.arguments import (
    TASKS, Options, anomaly_output, check_image_input, golden_feeds, image_preprocess, parse_labels, pick_output,
    read_samples, read_tokenizer, text_preprocess,
)
from converters.canonical import canonicalize
from converters.graph import ModelSource, io_specs, load_onnx
from converters.ir import name_nodes
from edge_sdk.errors import ConversionError
from runtime.manifest import (ANOMALY_DETECTION, EMBEDDING_TASK, IMAGE_TASKS, ImagePreprocess, Manifest, Postprocess,
                              TextPreprocess)


DEFECT_LABELS = ("ok", "defect")


def prepare(
    model: ModelSource, output: Any, task: str, labels: Any, preprocess: Any, tokenizer: Any, max_length: int,
    opts: Options,
) -> tuple[Any, Manifest, str | None]:
    """Load and check the graph and the user's pre/post-processing; the manifest without files."""
    if task not in TASKS:
        raise ConversionError(f"task is {task!r}; expected one of {', '.join((*TASKS, EMBEDDING_TASK))}")
    label_list = parse_labels(labels if labels is not None or task != ANOMALY_DETECTION else DEFECT_LABELS, task)
    if task == ANOMALY_DETECTION and len(label_list) != 2:
        raise ConversionError(f"an anomaly-detection model has labels {list(label_list)}; expected two: [good, defect]",
                              hint=f"e.g. labels={list(DEFECT_LABELS)} (the default), matching the validation sub-folders")
    if task != ANOMALY_DETECTION and opts.normal is not None:
        raise ConversionError(f"normal= (good images) is for task {ANOMALY_DETECTION!r}; task is {task!r}",
                              hint=f"convert with task={ANOMALY_DETECTION!r} to build an anomaly model from good images")
    if task == ANOMALY_DETECTION and opts.prune is not None:
        raise ConversionError("prune= does not apply to an anomaly-detection model (its head holds the memory bank)",
                              hint="prune the backbone in its own convert, then build the anomaly model on it")
    proto = name_nodes(load_onnx(model))  # reports and scales refer to nodes by name
    inputs, outputs = io_specs(proto)
    if task == ANOMALY_DETECTION:  # the backbone's outputs go; fit_anomaly_model writes score and map
        out_spec = outputs[0]
        postprocess = Postprocess(output=out_spec.name, labels=label_list, softmax=False, kind="anomaly",
                                  threshold=0.0)
    elif task == "anomaly-score":
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


def canonical(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
               opts: Options) -> tuple[Any, dict[str, Any]]:
    """The canonical graph every pass works on (see converters.canonical), checked on real inputs."""
    labels = manifest.postprocess.labels
    samples = read_samples(manifest.task, validation, labels, labelled=True)
    feeds = golden_feeds(manifest.task, encoder, samples, calibration, manifest.inputs, labels, 8)
    canonical, report = canonicalize(proto, [feeds])
    return (proto if canonical is proto else name_nodes(canonical)), report
