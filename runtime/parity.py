"""Parity before serving: a backend must reproduce the package's golden outputs before it serves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edge_sdk.errors import InferenceError, PackageError, PackageIntegrityError
from runtime.manifest import ImagePreprocess, Manifest, TextPreprocess
from runtime.package import Package
from runtime.runners.base import Runner

log = logging.getLogger(__name__)

#: Largest difference allowed per precision, as a share of the largest reference output, or absolute
#: when every output is below 1 (the divisor is ``max(1, largest |output|)``: probabilities and
#: small logits are not judged on a scale that makes rounding noise look large).
#: Integer kernels round differently across instruction sets and TensorRT tactics.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}


@dataclass(frozen=True)
class Parity:
    """How closely a backend reproduces the package's golden outputs of one graph."""

    samples: int
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_inputs(manifest: Manifest) -> None:
    """The manifest's inputs are what its preprocessing produces: an image model takes one tensor of the
    preprocessed size, channels, layout and dtype; a text model takes token tensors the tokenizer step
    names. (That the graph itself takes these inputs is each runner's check, e.g. onnxruntime's session.)"""
    pre, where = manifest.preprocess, f"package {manifest.name}"
    hint = "re-convert the model; the manifest's inputs and preprocess must describe the same tensors"
    if isinstance(pre, ImagePreprocess):
        if len(manifest.inputs) != 1:
            raise PackageError(f"{where}: an image model has one input; the manifest lists "
                               f"{[i.name for i in manifest.inputs]}", hint=hint)
        spec = manifest.inputs[0]
        h, w = pre.output_hw
        want: tuple[Any, ...] = (pre.channels, h, w) if pre.layout == "nchw" else (h, w, pre.channels)
        dims = tuple(spec.shape[1:])
        if len(spec.shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(dims, want)):
            expected = ["batch", *want]
            raise PackageError(f"{where}: input {spec.name!r} has shape {list(spec.shape)} but the preprocessing "
                               f"({pre.layout}, {pre.color}, {h}x{w}) makes {expected}", hint=hint)
        if spec.dtype != pre.dtype:
            raise PackageError(f"{where}: input {spec.name!r} is {spec.dtype} but the preprocessing makes {pre.dtype}",
                               hint=hint)
    elif isinstance(pre, TextPreprocess):
        made = {n for n in (pre.input_ids, pre.attention_mask, pre.token_type_ids) if n}
        names = {i.name for i in manifest.inputs}
        if pre.input_ids not in names or not names <= made:
            raise PackageError(f"{where}: inputs {sorted(names)} are not the tokenizer's tensors {sorted(made)} "
                               f"(input_ids {pre.input_ids!r} among them)", hint=hint)
        for spec in manifest.inputs:
            if spec.dtype not in ("int64", "int32") or len(spec.shape) != 2:
                raise PackageError(f"{where}: token input {spec.name!r} is {spec.dtype} {list(spec.shape)}; expected "
                                   "int64 or int32 [batch, sequence]", hint=hint)


def check_outputs(manifest: Manifest, outputs: Mapping[str, np.ndarray]) -> None:
    """What the graph really outputs agrees with what the manifest says it means: one score per label
    for classes, one score (and a [batch, h, w] map) per input for anomaly models. A package whose
    manifest was rewritten to match its golden vectors but not its graph is refused here."""
    post = manifest.postprocess
    if post.kind == "embedding" or post.output not in outputs:
        return
    out = np.asarray(outputs[post.output])
    batch = out.shape[0] if out.ndim else 0
    if post.kind == "classes" and (out.ndim != 2 or out.shape[1] != len(post.labels)):
        raise PackageError(f"package {manifest.name}: output {post.output!r} has shape {list(out.shape)} but the "
                           f"manifest has {len(post.labels)} labels; expected [batch, {len(post.labels)}]",
                           hint="re-convert the model with labels matching its outputs")
    if post.kind == "anomaly":
        if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
            raise PackageError(f"package {manifest.name}: anomaly output {post.output!r} has shape {list(out.shape)}; "
                               "expected one score per input", hint="re-convert the model")
        if post.map_output:
            amap = outputs.get(post.map_output)
            shape = [] if amap is None else list(np.asarray(amap).shape)
            if len(shape) != 3 or shape[0] != batch:
                raise PackageError(f"package {manifest.name}: anomaly map {post.map_output!r} has shape {shape}; "
                                   "expected [batch, h, w]", hint="re-convert the model")


def check_parity(package: Package, runner: Runner, graph: str, precision: str | None = None,
                 tolerance: float | None = None) -> Parity:
    """Run the golden feeds on ``runner`` and compare with the stored outputs of ``graph``; raise on mismatch.

    ``precision`` is what the runner computes in ("fp32", "fp16", "int8"; default: the graph's): an fp16
    engine built from the fp32 graph is judged against the fp32 golden outputs with the fp16 tolerance."""
    precision = precision or ("fp32" if graph == "fp32" else "int8")
    if precision not in TOLERANCE:
        raise InferenceError(f"precision {precision!r} has no parity tolerance; expected one of {list(TOLERANCE)}")
    limit = TOLERANCE[precision] if tolerance is None else tolerance
    inputs, expected = package.golden(graph)
    if not inputs or not expected:
        raise PackageIntegrityError(f"package {package.manifest.name} has no golden vectors for its {graph} graph")
    got = runner.infer(inputs)
    check_outputs(package.manifest, got)
    worst = 0.0
    for name, ref in expected.items():
        if name not in got or got[name].shape != ref.shape:
            raise InferenceError(f"golden output {name!r} is missing or has another shape on {runner.backend}")
        scale = max(1.0, float(np.abs(ref).max()))
        worst = max(worst, float(np.abs(got[name].astype(np.float64) - ref).max()) / scale)
    parity = Parity(samples=len(next(iter(inputs.values()))), max_abs_diff=worst, tolerance=limit)
    if not parity.ok:
        raise InferenceError(
            f"{runner.backend} output ({precision} on the {graph} graph) differs from the package's golden outputs "
            f"by {worst:.3g} "
            f"(tolerance {limit:g}); refusing to serve it",
            hint="re-convert the package or select another backend",
        )
    log.info("parity on %s (%s on %s): %d samples, max relative diff %.2e", runner.backend, precision, graph,
             parity.samples, worst)
    return parity
