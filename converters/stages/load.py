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
from runtime.manifest import EMBEDDING_TASK, IMAGE_TASKS, ImagePreprocess, Manifest, Postprocess, TextPreprocess


def prepare(
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


def canonical(proto: Any, manifest: Manifest, encoder: Any, calibration: Any, validation: Any,
               opts: Options) -> tuple[Any, dict[str, Any]]:
    """The canonical graph every pass works on (see converters.canonical), checked on real inputs."""
    labels = manifest.postprocess.labels
    samples = read_samples(manifest.task, validation, labels, labelled=True)
    feeds = golden_feeds(manifest.task, encoder, samples, calibration, manifest.inputs, labels, 8)
    canonical, report = canonicalize(proto, [feeds])
    return (proto if canonical is proto else name_nodes(canonical)), report
