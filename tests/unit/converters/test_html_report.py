"""The HTML conversion report: written into every package by convert, and by ``edge-sdk report`` for
several packages side by side; its figures come from the package's own records and a timing here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import edge_sdk
from converters.calibration.scales import ScaleFile
from converters.html_report import CALIBRATION_FILE, REPORT_FILE, machine, points, subject_from_package
from edge_sdk.cli import main
from edge_sdk.errors import ConversionError
from runtime.package import Package
from tests import builders

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CNN as fp32, pruned and int8 packages, calibrated and validated on a colour folder."""
    root = tmp_path_factory.mktemp("report")
    model = builders.save(builders.cnn_model(size=16), root / "cnn.onnx")
    images = builders.write_image_folder(root / "images", per_class=6, size=32)
    common = dict(task="image-classification", labels=LABELS, preprocess=builders.preprocess_dict(16),
                  calibration=images, validation=images, name="colors")
    out = {}
    for variant, extra in {"fp32": {}, "pruned": {"prune": {"method": "structured", "ratio": 0.25}},
                           "int8": {"quantize": "int8", "budget": None}}.items():
        out[variant] = root / f"colors.{variant}.edgepkg"
        edge_sdk.convert(model, out[variant], **common, **extra)  # type: ignore[arg-type]
    return out


def _page(package: Path) -> str:
    return Package.open(package).read_bytes(REPORT_FILE).decode("utf-8")


def _images(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)


def test_every_package_carries_its_report_with_the_plots_its_records_allow(converted: dict[str, Path]) -> None:
    int8 = _page(converted["int8"])
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", int8).lower()
    assert int8.startswith("<!DOCTYPE html>") and "<script" not in text and "http" not in text  # loads nothing
    assert {"accuracy against latency and size", "per-layer int8 sensitivity", "calibration histograms with thresholds",
            "confusion matrices"} <= set(_images(int8))
    assert machine()["isa"] in int8  # the machine the latency column was timed on
    for graph in ("u8s8", "u8s7", "s8s8"):
        assert f"colors int8 {graph}" in int8
    pruned = _page(converted["pruned"])
    assert "<h3>Pruning</h3>" in pruned and "colors pruned fp32" in pruned and "parameters" in pruned
    assert "calibration histograms with thresholds" not in _images(pruned)  # no int8: no calibration plots
    assert "<h3>Pruning</h3>" not in _page(converted["fp32"])


def test_the_confusion_matrix_counts_every_validation_sample(converted: dict[str, Path]) -> None:
    validation = Package.open(converted["fp32"]).manifest.reports["validation"]
    confusion = validation["confusion"]
    assert set(confusion) == set(LABELS)
    assert sum(sum(row.values()) for row in confusion.values()) == validation["samples"] == 18
    hits = sum(confusion[label].get(label, 0) for label in LABELS)
    assert hits / validation["samples"] == pytest.approx(validation["accuracy"])


def test_the_calibration_record_holds_the_thresholds_the_graphs_use(converted: dict[str, Path]) -> None:
    package = Package.open(converted["int8"])
    record = json.loads(package.read_bytes(CALIBRATION_FILE))
    scales = ScaleFile.from_json(package.read_bytes("scales.json").decode("utf-8")).tensors
    assert record["tensors"] and record["method"] == "auto"
    for t in record["tensors"]:
        assert t["linear"]["amax"] == pytest.approx(scales[t["tensor"]].amax)
        assert set(t["candidates"]) == {"entropy", "percentile", "mse", "minmax"}
        assert t["candidates"]["minmax"]["amax"] == pytest.approx(t["max_abs"])
        assert all(0 < c["amax"] <= t["max_abs"] * (1 + 1e-6) for c in t["candidates"].values())
        assert len(t["counts"]) == 256 and sum(t["counts"]) == pytest.approx(t["values"], rel=1e-3)
        assert t["span"] >= t["linear"]["amax"]  # the chosen threshold lies inside the plotted axis


def test_points_name_each_graph_with_its_own_metric_and_leave_untimed_graphs_empty(converted: dict[str, Path]) -> None:
    s = subject_from_package(converted["int8"])
    by_graph = {p.graph: p for p in points(s)}
    int8 = s.reports["int8"]
    assert set(by_graph) == {"fp32", "u8s8", "u8s7", "s8s8"}
    assert by_graph["fp32"].metric == int8["metric_fp32"]
    for graph in ("u8s8", "u8s7", "s8s8"):
        assert by_graph[graph].metric == int8["per_graph"][graph]["metric_int8"]
        assert by_graph[graph].size == Package.open(converted["int8"]).manifest.files[f"model.int8.{graph}.onnx"].size
    served = machine()["cpu_int8_graph"]
    assert by_graph["fp32"].latency_ms is not None and by_graph["fp32"].latency_ms > 0
    assert by_graph[served].latency_ms is not None and by_graph["s8s8"].latency_ms is None
    assert "TensorRT" in by_graph["s8s8"].note
    untimed = subject_from_package(converted["int8"], timed=False)
    assert all(p.latency_ms is None for p in points(untimed))


def test_edge_sdk_report_sets_packages_side_by_side(converted: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "site" / "colors.report.html"
    assert main(["report", str(converted["fp32"]), str(converted["pruned"]), str(converted["int8"]), "-o", str(out),
                 "--title", "colors <fp32 | pruned | int8>"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert "<h1>colors &lt;fp32 | pruned | int8&gt;</h1>" in page
    for name in ("colors.fp32.edgepkg", "colors.pruned.edgepkg", "colors.int8.edgepkg"):
        assert f"<h2>{name}</h2>" in page
    rows = re.findall(r"<tr><td>(colors[^<]*)</td>", page)
    assert rows[:3] == ["colors fp32", "colors pruned fp32", "colors fp32 (in the int8 package)"] and len(rows) == 6
    assert not list(out.parent.glob(".*.tmp"))  # written whole, then renamed


def test_bad_report_arguments_are_refused_clearly(converted: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nothing.edgepkg"), "-o", str(tmp_path / "r.html")]) == 1
    assert "does not exist" in capsys.readouterr().err
    not_a_package = tmp_path / "model.onnx"
    not_a_package.write_bytes(b"\x08\x07 not a zip")
    assert main(["report", str(not_a_package), "-o", str(tmp_path / "r.html")]) == 1
    assert "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_hostile_labels_are_escaped(tmp_path: Path) -> None:
    model = builders.save(builders.image_model(), tmp_path / "m.onnx")
    out = tmp_path / "x.edgepkg"
    edge_sdk.convert(model, out, task="image-classification", preprocess=builders.preprocess_dict(),
                     labels=["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "ok\x1b[2J"])
    page = _page(out)
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page


def test_report_false_leaves_it_out_and_a_missing_matplotlib_is_named(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = builders.save(builders.image_model(), tmp_path / "m.onnx")
    out = tmp_path / "plain.edgepkg"
    edge_sdk.convert(model, out, task="image-classification", labels=builders.COLOR_LABELS,
                     preprocess=builders.preprocess_dict(), report=False)
    assert REPORT_FILE not in Package.open(out).manifest.files
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ConversionError, match="needs matplotlib") as caught:
        edge_sdk.convert(model, tmp_path / "again.edgepkg", task="image-classification", labels=builders.COLOR_LABELS,
                         preprocess=builders.preprocess_dict())
    assert caught.value.hint is not None and "report=False" in caught.value.hint
    assert not (tmp_path / "again.edgepkg").exists()
