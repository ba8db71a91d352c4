"""A package whose manifest describes other inputs than its graph takes, or than its preprocessing
makes, is refused when it is loaded (and so before a daemon swaps it in), naming the mismatch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest

import edge_sdk
from edge_sdk.errors import EdgeSDKError
from runtime.manifest import Manifest
from runtime.package import Package, write_package


def rewritten(source: Path, target: Path, change: Callable[[Manifest], Manifest]) -> Path:
    """A self-consistent copy of ``source`` (files re-hashed) whose manifest says something else."""
    package = Package.open(source)
    write_package(change(package.manifest), {n: package.read_bytes(n) for n in package.manifest.files}, target)
    return target


def first_input(m: Manifest, **kwargs: Any) -> Manifest:
    return replace(m, inputs=(replace(m.inputs[0], **kwargs), *m.inputs[1:]))


def test_the_untouched_packages_load(image_package: Path, text_package: Path) -> None:
    for package in (image_package, text_package):
        with edge_sdk.load(package, backend="onnxruntime-cpu") as model:
            assert model.predict_batch  # loaded and verified


@pytest.mark.parametrize("change, match", [
    # the preprocessing makes 32x32 images, the manifest (and graph) take 8x8
    (lambda m: replace(m, preprocess=replace(m.preprocess, resize=(32, 32))),
     r"has shape \[.*8, 8\] but the preprocessing \(nchw, rgb, 32x32\) makes \['batch', 3, 32, 32\]"),
    (lambda m: replace(m, preprocess=replace(m.preprocess, layout="nhwc")), "preprocessing \\(nhwc"),
    # manifest and preprocessing agree on float16; the graph takes float32
    (lambda m: replace(first_input(m, dtype="float16"), preprocess=replace(m.preprocess, dtype="float16")),
     r"graph input '.*' is tensor\(float\) but the manifest declares float16"),
    # a renamed input: the golden vectors and the manifest agree, the graph does not
    (lambda m: first_input(m, name="pixels"), r"the graph's inputs are \[.*\] but the manifest declares \['pixels'\]"),
])
def test_an_image_manifest_that_does_not_fit_is_refused(image_package: Path, tmp_path: Path,
                                                        change: Callable[[Manifest], Manifest], match: str) -> None:
    lying = rewritten(image_package, tmp_path / "lying.edgepkg", change)
    with pytest.raises(EdgeSDKError, match=match):
        edge_sdk.load(lying, backend="onnxruntime-cpu")


def test_a_text_manifest_with_inputs_the_tokenizer_does_not_make_is_refused(text_package: Path,
                                                                            tmp_path: Path) -> None:
    extra = lambda m: replace(m, inputs=(*m.inputs, replace(m.inputs[0], name="position_ids")))  # noqa: E731
    lying = rewritten(text_package, tmp_path / "lying.edgepkg", extra)
    with pytest.raises(EdgeSDKError, match=r"inputs \[.*'position_ids'.*\] are not the tokenizer's tensors"):
        edge_sdk.load(lying, backend="onnxruntime-cpu")
    # manifest and preprocessing agree on a renamed token input; the graph does not take it
    def renamed(m: Manifest) -> Manifest:
        inputs = tuple(replace(i, name="segment_ids") if i.name == "token_type_ids" else i for i in m.inputs)
        return replace(m, inputs=inputs, preprocess=replace(m.preprocess, token_type_ids="segment_ids"))

    lying = rewritten(text_package, tmp_path / "lying2.edgepkg", renamed)
    with pytest.raises(EdgeSDKError, match=r"the graph's inputs are \[.*\] but the manifest declares"):
        edge_sdk.load(lying, backend="onnxruntime-cpu")
