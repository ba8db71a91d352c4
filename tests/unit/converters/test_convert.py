"""convert(): argument checking, golden vectors, validation accuracy, and the written package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from converters import convert
from converters.data import image_samples, text_lines, tsv_samples
from edge_sdk.errors import ConversionError
from runtime.package import Package
from tests import builders


def test_image_package_records_preprocess_golden_and_accuracy(image_package: Path) -> None:
    package = Package.open(image_package)
    m = package.manifest
    assert m.task == "image-classification" and m.precision == "fp32"
    assert m.preprocess.to_dict()["resize"] == [8, 8]
    assert m.postprocess.labels == ("red", "green", "blue")
    assert m.reports["validation"]["accuracy"] == 1.0 and m.reports["validation"]["samples"] == 9
    inputs, outputs = package.golden()
    assert inputs["image"].shape == (4, 3, 8, 8)
    # Golden samples are spread over the label folders (sorted: blue, green, red), then wrap around.
    assert outputs["logits"].argmax(axis=1).tolist() == [2, 1, 0, 2]


def test_text_package_carries_tokenizer(text_package: Path, tokenizer_file: Path) -> None:
    package = Package.open(text_package)
    assert package.read_bytes("tokenizer.json") == tokenizer_file.read_bytes()
    assert package.manifest.preprocess.to_dict()["max_length"] == 16
    assert package.manifest.reports["validation"]["accuracy"] == 1.0


def test_text_model_without_token_types_declares_none(tmp_path: Path, tokenizer_file: Path) -> None:
    onnx.save(builders.text_model(with_token_types=False), tmp_path / "m.onnx")
    report = convert(tmp_path / "m.onnx", tmp_path / "p.edgepkg", task="text-classification",
                     labels=builders.TEXT_LABELS, tokenizer=tokenizer_file)
    assert Package.open(report.package).manifest.preprocess.to_dict()["token_type_ids"] is None
    assert report.validation is None and report.golden_samples == 3


def test_labels_and_preprocess_from_files(tmp_path: Path, image_onnx: Path) -> None:
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    pre = builders.write_json(tmp_path / "pre.json", builders.preprocess_dict())
    report = convert(image_onnx, tmp_path / "c.edgepkg", task="image-classification",
                     labels=tmp_path / "labels.txt", preprocess=pre, name="colours", version="7")
    assert report.labels == ("red", "green", "blue") and report.name == "colours"
    assert Package.open(tmp_path / "c.edgepkg").manifest.version == "7"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "detection"}, "task is 'detection'"),
        ({"labels": ["a", "b"]}, r"output 'logits' has shape \['batch', 3\]; expected \[batch, 2\]"),
        ({"labels": ["a", "a", "b"]}, "unique"),
        ({"preprocess": None}, "needs preprocess"),
        ({"preprocess": {**builders.preprocess_dict(), "resize": [16, 16]}}, "gives 16 on axis 2"),
        ({"preprocess": {**builders.preprocess_dict(), "color": "gray", "mean": [0], "std": [1]}}, "gives 1 on axis 1"),
        ({"preprocess": {**builders.preprocess_dict(), "dtype": "uint8"}}, "preprocess produces uint8"),
        ({"preprocess": {**builders.preprocess_dict(), "mean": [1]}}, "mean"),
        ({"prune": "sparse"}, "prune method is 'sparse'"),
        ({"prune": {"method": "structured"}}, "exactly one of 'ratio'"),
        ({"prune": {"method": "structured", "ratio": 1.5}}, "ratio is 1.5"),
        ({"prune": "2:4"}, "need calibration data"),
        ({"quantize": "int8"}, "need calibration data"),
        ({"quantize": "int4"}, "quantize is 'int4'"),
        ({"quantize": "int8", "method": "kl"}, "'kl' is unknown|method"),
        ({"budget": -1}, "budget is -1"),
        ({"colour": "rgb"}, r"unknown option\(s\) \['colour'\]"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path: Path, image_onnx: Path, kwargs: dict, message: str) -> None:
    args = {"task": "image-classification", "labels": builders.COLOR_LABELS, "preprocess": builders.preprocess_dict()}
    with pytest.raises(ConversionError, match=message):
        convert(image_onnx, tmp_path / "x.edgepkg", **{**args, **kwargs})
    assert not (tmp_path / "x.edgepkg").exists()


def test_bad_model_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "none.onnx", tmp_path / "x", task="image-classification", labels=["a"])
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01junk" * 10)
    with pytest.raises(ConversionError, match="not an ONNX model|fails onnx.checker"):
        convert(tmp_path / "junk.onnx", tmp_path / "x", task="image-classification", labels=["a"])


def test_text_model_checks(tmp_path: Path, text_onnx: Path, image_onnx: Path, tokenizer_file: Path) -> None:
    with pytest.raises(ConversionError, match="needs tokenizer"):
        convert(text_onnx, tmp_path / "x", task="text-classification", labels=builders.TEXT_LABELS)
    with pytest.raises(ConversionError, match=r"inputs must be input_ids.*\['image'\]"):
        convert(image_onnx, tmp_path / "x", task="text-classification", labels=builders.COLOR_LABELS,
                tokenizer=tokenizer_file)


def test_validation_data_errors_name_the_line_and_folder(tmp_path: Path, text_onnx: Path, tokenizer_file: Path,
                                                          image_onnx: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("bearing\tok text\nwear\tunknown label here\n")
    with pytest.raises(ConversionError, match="line 2 has label 'wear'"):
        convert(text_onnx, tmp_path / "x", task="text-classification", labels=builders.TEXT_LABELS,
                tokenizer=tokenizer_file, validation=bad)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((tmp_path / "bad.tsv").read_bytes())
    with pytest.raises(ConversionError, match="has no label sub-folders"):
        convert(image_onnx, tmp_path / "y", task="image-classification", labels=builders.COLOR_LABELS,
                preprocess=builders.preprocess_dict(), validation=flat)


def test_data_readers(tmp_path: Path, image_folder: Path) -> None:
    samples = image_samples(image_folder, builders.COLOR_LABELS)
    assert len(samples) == 9 and {s.label for s in samples} == {"red", "green", "blue"}
    with pytest.raises(ConversionError, match=r"sub-folders \['blue', 'green', 'red'\] that are not labels"):
        image_samples(image_folder, ["ok"])
    (tmp_path / "t.txt").write_text("one\n\n two \n")
    assert [s.item for s in text_lines(tmp_path / "t.txt")] == ["one", "two"]
    (tmp_path / "v.tsv").write_text("no tab here\n")
    with pytest.raises(ConversionError, match="line 1 .* expected 'label<TAB>text'"):
        tsv_samples(tmp_path / "v.tsv", ["a"])
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConversionError, match="not UTF-8"):
        text_lines(tmp_path / "latin.txt")


def test_report_is_json_serialisable(tmp_path: Path, image_onnx: Path, image_folder: Path) -> None:
    report = convert(image_onnx, tmp_path / "r.edgepkg", task="image-classification", labels=builders.COLOR_LABELS,
                     preprocess=builders.preprocess_dict(), calibration=image_folder, golden_samples=2)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["golden_samples"] == 2 and data["validation"] is None
    assert any("golden vectors only" in n for n in data["notes"])
    assert np.isfinite(report.seconds)
