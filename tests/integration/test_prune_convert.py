"""Pruning composed with int8 in one convert call, on a small CNN and a small encoder built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import edge_sdk
from converters.pruning.common import params
from converters.pruning.sparse24 import check_2_4
from edge_sdk.errors import PruningError
from runtime.package import Package
from tests import builders


def _fp32(package: Package) -> onnx.ModelProto:
    return onnx.load_from_string(package.read_bytes(package.manifest.model))


def test_structured_pruning_then_int8_on_a_cnn(tmp_path: Path, image_folder: Path) -> None:
    onnx.save(builders.chain_cnn_model(), tmp_path / "cnn.onnx")
    report = edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "p.edgepkg", task="image-classification",
                              labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(),
                              calibration=image_folder, validation=image_folder,
                              prune={"method": "structured", "ratio": 0.5}, quantize="int8", budget=None)
    pruning = report.pruning
    assert pruning is not None and pruning["params_after"] < pruning["params_before"]
    package = Package.open(report.package)
    assert params(_fp32(package)) == pruning["params_after"]
    assert package.manifest.precision == "int8" and set(package.manifest.graphs) == {"u8s8", "u8s7", "s8s8"}
    w1 = next(i for i in _fp32(package).graph.initializer if i.name == "w1")
    assert list(w1.dims) == [8, 3, 3, 3]  # half of conv1's 16 channels removed physically
    with edge_sdk.load(report.package) as model:  # parity passes on the pruned int8 graph
        assert model.predict(str(image_folder / "red" / "0.png")).label in builders.COLOR_LABELS


def test_ffn_pruning_then_int8_on_an_encoder(tmp_path: Path, tokenizer_file: Path) -> None:
    onnx.save(builders.transformer_model(), tmp_path / "enc.onnx")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(builders.VOCAB[4:], size=rng.integers(2, 8))) for _ in range(40)]
    (tmp_path / "calib.txt").write_text("\n".join(texts))
    report = edge_sdk.convert(tmp_path / "enc.onnx", tmp_path / "e.edgepkg", task="text-classification",
                              labels=builders.TEXT_LABELS, tokenizer=tokenizer_file, calibration=tmp_path / "calib.txt",
                              prune={"method": "structured", "ratio": 0.25}, quantize="int8", budget=None)
    package = Package.open(report.package)
    fp32 = _fp32(package)  # the prepared graph: smoothing renamed the weights, so go through the node
    up = next(n for n in fp32.graph.node if n.name == "mm_f1")
    w1 = next(i for i in fp32.graph.initializer if i.name == up.input[1])
    assert list(w1.dims) == [16, 48]
    assert report.pruning is not None and report.pruning["layers"][0]["recon_after"] <= \
        report.pruning["layers"][0]["recon_before"]


def test_budget_search_never_exceeds_the_budget(tmp_path: Path, image_folder: Path) -> None:
    onnx.save(builders.chain_cnn_model(), tmp_path / "cnn.onnx")
    try:
        report = edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "b.edgepkg", task="image-classification",
                                  labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(),
                                  calibration=image_folder, validation=image_folder,
                                  prune={"method": "structured", "budget": 0.0})
    except PruningError as exc:
        assert "stays within 0.0 points" in str(exc)
        return
    pruning = report.pruning
    assert pruning is not None and pruning["accuracy_before"] - pruning["accuracy_after"] <= 0.0
    assert pruning["budget_steps"][-1]["drop"] <= 0.0


def test_2_4_pruning_is_recorded_for_tensorrt(tmp_path: Path, tokenizer_file: Path) -> None:
    onnx.save(builders.transformer_model(), tmp_path / "enc.onnx")  # its FFN weights are large enough for 2:4
    (tmp_path / "calib.txt").write_text("bearing noise\noil leak at the pump\nthe pump is hot\n")
    report = edge_sdk.convert(tmp_path / "enc.onnx", tmp_path / "s.edgepkg", task="text-classification",
                              labels=builders.TEXT_LABELS, tokenizer=tokenizer_file,
                              calibration=tmp_path / "calib.txt", prune={"method": "2:4"})
    package = Package.open(report.package)
    record = package.manifest.reports["pruning"]
    assert record["pattern"] == "2:4" and set(record["layers"]) == {"mm_f1", "mm_f2"}
    assert check_2_4(_fp32(package), record["layers"]) == []


def test_pruning_without_calibration_is_refused(tmp_path: Path) -> None:
    onnx.save(builders.chain_cnn_model(), tmp_path / "cnn.onnx")
    with pytest.raises(Exception, match="need calibration data"):
        edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "x.edgepkg", task="image-classification",
                         labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(), prune="magnitude")


def test_layer_pruning_bypasses_the_weakest_block(tmp_path: Path, tokenizer_file: Path, image_folder: Path) -> None:
    onnx.save(builders.transformer_model(), tmp_path / "enc.onnx")
    (tmp_path / "calib.txt").write_text("bearing noise\noil leak at the pump\nthe pump is hot\n")
    report = edge_sdk.convert(tmp_path / "enc.onnx", tmp_path / "l.edgepkg", task="text-classification",
                              labels=builders.TEXT_LABELS, tokenizer=tokenizer_file,
                              calibration=tmp_path / "calib.txt", prune={"method": "layers", "count": 1})
    assert report.pruning is not None and report.pruning["params_after"] < report.pruning["params_before"]
    onnx.save(builders.cnn_model(), tmp_path / "res.onnx")  # a CNN: its residual block is bypassed
    report = edge_sdk.convert(tmp_path / "res.onnx", tmp_path / "r.edgepkg", task="image-classification",
                              labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(16),
                              calibration=image_folder, prune={"method": "layers", "count": 1})
    assert report.pruning is not None and [layer["removed"] for layer in report.pruning["layers"]] == [True]
    onnx.save(builders.chain_cnn_model(), tmp_path / "cnn.onnx")
    with pytest.raises(PruningError, match="no residual block"):
        edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "x.edgepkg", task="image-classification",
                         labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(),
                         calibration=image_folder, prune={"method": "layers"})


def test_budget_search_allocates_per_unit_on_a_transformer(tmp_path: Path, tokenizer_file: Path,
                                                           text_validation: Path) -> None:
    onnx.save(builders.transformer_model(), tmp_path / "enc.onnx")
    (tmp_path / "calib.txt").write_text("bearing noise\noil leak at the pump\nthe pump is hot\ngrinding bearing\n")
    report = edge_sdk.convert(tmp_path / "enc.onnx", tmp_path / "t.edgepkg", task="text-classification",
                              labels=builders.TEXT_LABELS, tokenizer=tokenizer_file, calibration=tmp_path / "calib.txt",
                              validation=text_validation, prune={"method": "structured", "budget": 100.0})
    pruning = report.pruning
    assert pruning is not None
    assert {s["kind"] for s in pruning["budget_steps"]} == {"allocation"}
    assert all(s["drop"] <= 100.0 for s in pruning["budget_steps"])  # everything fits: the whole path is taken
    assert pruning["chosen"]["ratios"] == {"ffn:mm_f1": 0.75}
    assert pruning["params_after"] < pruning["params_before"]
    assert any(line.startswith("pruning budget search: step ") and "1 ffn units" in line for line in report.lines())


def test_joint_residual_groups_are_pruned_on_request(tmp_path: Path, image_folder: Path) -> None:
    onnx.save(builders.cnn_model(), tmp_path / "res.onnx")
    common = dict(task="image-classification", labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(16),
                  calibration=image_folder)
    plain = edge_sdk.convert(tmp_path / "res.onnx", tmp_path / "p.edgepkg",
                             prune={"method": "structured", "ratio": 0.5}, **common).pruning
    joint = edge_sdk.convert(tmp_path / "res.onnx", tmp_path / "j.edgepkg",
                             prune={"method": "structured", "ratio": 0.5, "joint": True}, **common).pruning
    assert plain is not None and joint is not None
    assert joint["params_after"] < plain["params_after"]  # the residual stage's channels went too
    assert any("residual" in note for note in plain["notes"])
    with pytest.raises(PruningError, match="prune joint is 'yes'"):
        edge_sdk.convert(tmp_path / "res.onnx", tmp_path / "x.edgepkg",
                         prune={"method": "structured", "ratio": 0.5, "joint": "yes"}, **common)
