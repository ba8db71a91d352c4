"""The user's side of ``convert``: its options, labels, pre-processing, tokenizer, output choice and data.

Each function turns one argument of :func:`converters.convert` into what the conversion stages use,
or refuses it with a message naming the value and the fix. Shared by the classifier conversion
(``converters.conversion``) and the embedding conversion (``converters.knowledge``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from converters.calibration.methods import CalibrationMethod
from converters.calibration.readers import ArrayReader, calibration_reader
from converters.data import Sample, image_samples, text_lines, tsv_samples
from converters.stages.prune import parse_prune
from converters.smoothing import DEFAULT_ALPHA
from edge_sdk.errors import ConversionError, EdgeSDKError
from runtime.manifest import (
    CONVERT_TASKS, IMAGE_TASKS, POOLINGS, ImagePreprocess, Postprocess, TensorSpec, TextPreprocess,
)

TASKS = CONVERT_TASKS  # text-embedding (EMBEDDING_TASK) is converted by converters.knowledge
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
    # task "anomaly-detection": a folder of good images; the share of their patch features the memory
    # bank keeps (greedy coreset); the backbone tensors the patches come from (None: chosen)
    normal: str | os.PathLike[str] | None = None
    coreset_ratio: float = 0.05
    feature_layers: Sequence[str] | None = None
    # write the HTML conversion report into the package (reports/report.html; needs matplotlib, the
    # convert extra): plots of accuracy, latency, sensitivity, calibration, pruning, confusion
    report: bool = True
    # sign the package: a private key file (edge-sdk keys generate) or a runtime.signing.SigningKey;
    # parse_options reads the file before any work starts
    sign: Any = None


def parse_options(options: Mapping[str, Any]) -> Options:
    known = set(Options.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConversionError(f"unknown option(s) {unknown}", hint=f"known options: {', '.join(sorted(known))}")
    opts = Options(**options)
    if opts.report and importlib.util.find_spec("matplotlib") is None:
        raise ConversionError("report=True needs matplotlib to draw the conversion report's plots",
                              hint="pip install 'edge-sdk[convert]' (it brings matplotlib), or pass report=False "
                                   "(--no-report) to convert without the report")
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
    ratio = opts.coreset_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ConversionError(f"coreset_ratio is {ratio!r}; expected the share of good patches to keep, in (0, 1]",
                              hint="e.g. 0.05 (the default); 1.0 keeps every patch")
    if opts.feature_layers is not None and (isinstance(opts.feature_layers, str) or not opts.feature_layers
                                            or not all(isinstance(n, str) and n for n in opts.feature_layers)):
        raise ConversionError(f"feature_layers is {opts.feature_layers!r}; expected a list of tensor names",
                              hint='e.g. ["add_530", "add_728"], or None to choose them')
    if opts.pooling not in POOLINGS:
        raise ConversionError(f"pooling is {opts.pooling!r}; expected one of {', '.join(POOLINGS)}")
    CalibrationMethod.parse(opts.method)
    if opts.prune is not None:
        parse_prune(opts.prune)
    if opts.sign is not None:
        from runtime.signing import SigningKey, load_signing_key

        if not isinstance(opts.sign, SigningKey):
            opts = replace(opts, sign=load_signing_key(opts.sign, extra="convert"))
    return opts


def parse_labels(labels: Sequence[str] | str | os.PathLike[str] | None, task: str) -> tuple[str, ...]:
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


def image_preprocess(preprocess: Mapping[str, Any] | str | os.PathLike[str] | None) -> ImagePreprocess:
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


def check_image_input(inputs: Sequence[TensorSpec], pre: ImagePreprocess) -> None:
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


def text_preprocess(inputs: Sequence[TensorSpec], max_length: int) -> TextPreprocess:
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


def read_tokenizer(tokenizer: str | os.PathLike[str] | None) -> str:
    if tokenizer is None:
        raise ConversionError("a text model needs tokenizer", hint="pass the path of its tokenizer.json")
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"tokenizer {str(path)!r} does not exist", hint="pass a tokenizer.json file")
    return path.read_text(encoding="utf-8")


def pick_output(outputs: Sequence[TensorSpec], name: str | None, labels: Sequence[str]) -> TensorSpec:
    candidates = [o for o in outputs if name in (None, o.name)]
    if len(candidates) != 1:
        raise ConversionError(f"cannot choose the scores output among {[o.name for o in outputs]}",
                              hint="pass output_name=... naming the [batch, classes] output")
    out = candidates[0]
    if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != len(labels)):
        raise ConversionError(f"output '{out.name}' has shape {list(out.shape)}; expected [batch, {len(labels)}] "
                              f"for the {len(labels)} labels")
    return out


def anomaly_output(outputs: Sequence[TensorSpec], opts: Options,
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


def read_samples(task: str, source: Any, labels: Sequence[str], labelled: bool) -> list[Sample]:
    if source is None:
        return []
    if task in IMAGE_TASKS:
        samples = image_samples(source, labels)
        if labelled and samples[0].label is None:
            raise ConversionError(f"validation folder {str(source)!r} has no label sub-folders",
                                  hint="put each image in a sub-folder named after its label")
        return samples
    return tsv_samples(source, labels) if labelled else text_lines(source)


def golden_feeds(
    task: str, encoder: Any, validation: Sequence[Sample], calibration: Any, inputs: Sequence[TensorSpec],
    labels: Sequence[str], count: int,
) -> dict[str, np.ndarray]:
    """Golden feeds from validation data, else calibration data (raw inputs or tensors), else synthetic."""
    if not validation and calibration is not None and Path(calibration).suffix in (".npy", ".npz"):
        reader = calibration_reader(calibration, task=task, inputs=inputs, encode=encoder, limit=count)
        if isinstance(reader, ArrayReader):
            return dict(reader.arrays)
    pool = validation or read_samples(task, calibration, labels, labelled=False)
    return encoder(golden_items(task, pool, count))  # type: ignore[no-any-return]


def golden_items(task: str, pool: Sequence[Sample], count: int) -> list[Any]:
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
