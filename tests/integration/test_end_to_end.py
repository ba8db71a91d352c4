"""Convert -> package -> copy/extract -> load -> predict on onnxruntime CPU with real JPEG decoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx

import edge_sdk
from runtime.package import extract_package
from tests import builders


def _jpeg_folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(7)
    bgr = {"red": (40, 40, 200), "green": (40, 190, 50), "blue": (200, 60, 40)}
    for label, colour in bgr.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(30, 90, size=2)
            img = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / label / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return root


def test_image_flow_with_dynamic_size_model_and_extraction(tmp_path: Path) -> None:
    onnx.save(builders.image_model(dynamic_hw=True), tmp_path / "m.onnx")
    data = _jpeg_folder(tmp_path / "jpegs")
    pre = {**builders.preprocess_dict(), "resize": [32, 40], "crop": [24, 24], "interpolation": "linear"}
    report = edge_sdk.convert(tmp_path / "m.onnx", tmp_path / "colors.edgepkg", task="image-classification",
                              labels=builders.COLOR_LABELS, preprocess=pre, validation=data, golden_samples=3)
    assert report.validation is not None and report.validation.accuracy == 1.0
    unpacked = extract_package(tmp_path / "colors.edgepkg", tmp_path / "unpacked")
    images = sorted(data.rglob("*.jpg"))
    with edge_sdk.load(tmp_path / "colors.edgepkg") as archived, edge_sdk.load(unpacked.path) as extracted:
        a, b = archived.predict_batch(images), extracted.predict_batch(images)
    assert [p.label for p in a] == [p.parent.name for p in images]
    assert [p.scores for p in a] == [p.scores for p in b]


def test_text_flow_through_the_installed_command(tmp_path: Path, text_onnx: Path, tokenizer_file: Path,
                                                 text_validation: Path) -> None:
    exe = Path(sys.executable).parent / "edge-sdk"
    pkg = tmp_path / "words.edgepkg"
    convert = subprocess.run(
        [str(exe), "convert", str(text_onnx), "-o", str(pkg), "--task", "text-classification", "--labels",
         ",".join(builders.TEXT_LABELS), "--tokenizer", str(tokenizer_file), "--validation", str(text_validation)],
        capture_output=True, text=True, check=True)
    assert "validation: accuracy 1.000 on 4 samples" in convert.stdout
    run = subprocess.run([str(exe), "run", str(pkg), "--text", "a drip of oil", "--text", "bearing noise", "--json"],
                         capture_output=True, text=True, check=True)
    assert [r["label"] for r in json.loads(run.stdout)] == ["leak", "bearing"]
