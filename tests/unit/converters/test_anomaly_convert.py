"""Anomaly-score packages: converted with a fitted or given threshold, run through the same pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.errors import ConversionError
from runtime.package import Package
from tests import builders


@pytest.fixture
def anomaly_onnx(tmp_path: Path) -> Path:
    return builders.save(builders.anomaly_model(), tmp_path / "anomaly.onnx")


@pytest.fixture
def parts(tmp_path: Path) -> Path:
    return builders.write_anomaly_folder(tmp_path / "parts")


def test_threshold_is_fitted_on_validation_and_decides_on_the_device(tmp_path: Path, anomaly_onnx: Path,
                                                                     parts: Path) -> None:
    out = tmp_path / "parts.edgepkg"
    report = edge_sdk.convert(anomaly_onnx, out, task="anomaly-score", labels=["ok", "defect"],
                              preprocess=builders.preprocess_dict(), validation=parts)
    manifest = Package.open(out).manifest
    post = manifest.postprocess
    assert manifest.task == "anomaly-score" and post.kind == "anomaly" and post.labels == ("ok", "defect")
    fit = manifest.reports["anomaly"]
    assert fit["threshold"] == post.threshold and fit["balanced_accuracy"] == 1.0 and fit["samples"] == 12
    assert report.validation is not None and report.validation.accuracy == 1.0
    with edge_sdk.load(out, backend="onnxruntime-cpu") as model:
        for label in ("ok", "defect"):
            for image in sorted((parts / label).glob("*.png")):
                p = model.predict(image)
                assert p.label == label and p.over_threshold == (label == "defect")
                assert p.extra["anomaly_score"] == p.score and p.extra["threshold"] == post.threshold
                assert p.scores[label] == 1.0


def test_a_given_threshold_is_kept(tmp_path: Path, anomaly_onnx: Path, parts: Path) -> None:
    out = tmp_path / "strict.edgepkg"
    edge_sdk.convert(anomaly_onnx, out, task="anomaly-score", labels=["ok", "defect"],
                     preprocess=builders.preprocess_dict(), threshold=10.0)
    assert Package.open(out).manifest.postprocess.threshold == 10.0
    with edge_sdk.load(out) as model:  # nothing reaches 10 after normalisation to about [-1, 1]
        assert {model.predict(p).label for p in parts.rglob("*.png")} == {"ok"}


def test_cli_converts_an_anomaly_model(tmp_path: Path, anomaly_onnx: Path, parts: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pre = builders.write_json(tmp_path / "pre.json", builders.preprocess_dict())
    out = tmp_path / "cli.edgepkg"
    assert main(["convert", str(anomaly_onnx), "-o", str(out), "--task", "anomaly-score", "--labels", "ok,defect",
                 "--preprocess", str(pre), "--threshold", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "anomaly-score"
    assert Package.open(out).manifest.postprocess.threshold == 0.25


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": ["ok", "scratch", "crack"]}, "expected two"),
    ({"labels": ["ok", "defect"]}, "needs threshold=<score> or validation data"),
    ({"labels": ["ok", "defect"], "threshold": float("nan")}, "expected a finite anomaly score"),
])
def test_anomaly_conversion_errors(tmp_path: Path, anomaly_onnx: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        edge_sdk.convert(anomaly_onnx, tmp_path / "x.edgepkg", task="anomaly-score",
                         preprocess=builders.preprocess_dict(), **kwargs)


def test_a_classifier_output_is_not_an_anomaly_score(tmp_path: Path, image_onnx: Path) -> None:
    with pytest.raises(ConversionError, match=r"one score per input: \[batch\] or \[batch, 1\]"):
        edge_sdk.convert(image_onnx, tmp_path / "x.edgepkg", task="anomaly-score", labels=["ok", "defect"],
                         preprocess=builders.preprocess_dict(), threshold=0.5)
