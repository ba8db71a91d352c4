"""edge_sdk.load / Model: predictions, batches, info and verification."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_sdk
from edge_sdk.errors import BackendUnavailableError, PackageIntegrityError, PipelineError
from runtime.package import golden_bytes


def test_image_model_predicts_paths_bytes_and_arrays(image_package: Path, image_folder: Path) -> None:
    with edge_sdk.load(image_package, backend="onnxruntime-cpu", threads=1) as model:
        red = image_folder / "red" / "0.png"
        for item in (red, str(red), red.read_bytes(), cv2.imread(str(red))):
            p = model.predict(item)
            assert p.label == "red" and p.backend == "onnxruntime-cpu" and p.model == "colors"
            assert 0.5 < p.score <= 1.0 and sum(p.scores.values()) == pytest.approx(1.0)
            assert p.timings.total_ms > 0
        batch = model.predict_batch(sorted(image_folder.rglob("*.png")), max_batch=4)
        assert [p.label for p in batch] == ["blue"] * 3 + ["green"] * 3 + ["red"] * 3
        assert {p.batch_size for p in batch} == {4, 1}


def test_text_model_predicts(text_package: Path) -> None:
    with edge_sdk.load(text_package) as model:
        assert model.predict("oil is dripping from the pump").label == "leak"
        labels = [p.label for p in model.predict_batch(["grinding bearing noise", "pump temperature too hot"])]
        assert labels == ["bearing", "overheating"]
        with pytest.raises(PipelineError, match="not a single str"):
            model.predict_batch("a text")  # type: ignore[arg-type]


def test_info_reports_backend_skips_and_parity(image_package: Path) -> None:
    with edge_sdk.load(image_package) as model:
        info = json.loads(json.dumps(model.info))
    assert info["name"] == "colors" and info["labels"] == ["red", "green", "blue"]
    assert info["backend"] == "onnxruntime-cpu"
    assert [s["backend"] for s in info["skipped_backends"]] == ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda",
                                                               "openvino-cpu"]  # fp32 CNN: never OpenVINO's
    assert info["parity"]["samples"] == 4 and info["parity"]["max_abs_diff"] <= info["parity"]["tolerance"]
    assert info["reports"]["validation"]["accuracy"] == 1.0


def test_golden_mismatch_refuses_to_serve(tmp_path: Path, image_package: Path) -> None:
    # Rebuild the archive with wrong golden outputs but consistent hashes: parity must catch it.
    with zipfile.ZipFile(image_package) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in zf.namelist()}
    from runtime.manifest import Manifest
    from runtime.package import Package, write_package

    inputs, outputs = Package.open(image_package).golden()
    members["golden.npz"] = golden_bytes(inputs, {k: v + 1.0 for k, v in outputs.items()})
    members.pop("manifest.json")
    bad = write_package(Manifest.from_dict(manifest), members, tmp_path / "bad.edgepkg")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-cpu: failed the golden-vector check: .*differs"):
        edge_sdk.load(bad.path)
    with edge_sdk.load(bad.path, verify=False) as model:
        assert model.info["parity"] is None


def test_tampered_package_is_refused_at_load(tmp_path: Path, image_package: Path) -> None:
    with zipfile.ZipFile(image_package) as zf:
        info = zf.getinfo("model.onnx")
    data = bytearray(image_package.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF  # inside model.onnx
    (tmp_path / "t.edgepkg").write_bytes(bytes(data))
    with pytest.raises(PackageIntegrityError):
        edge_sdk.load(tmp_path / "t.edgepkg")


def test_unavailable_backend_is_explained(image_package: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        edge_sdk.load(image_package, backend="tensorrt")


def test_gray_array_input(image_package: Path) -> None:
    with edge_sdk.load(image_package) as model:
        assert set(model.predict(np.full((8, 8), 200, np.uint8)).scores) == {"red", "green", "blue"}


def test_images_decode_beside_the_model_when_it_leaves_cores_idle(image_package: Path, image_folder: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    import os

    files = sorted(str(p) for p in image_folder.rglob("*.png"))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with edge_sdk.load(image_package, backend="onnxruntime-cpu", threads=1) as split, \
            edge_sdk.load(image_package, backend="onnxruntime-cpu") as whole:
        assert split.pipeline.decode_workers() == 3 and whole.pipeline.decode_workers() == 0
        prefetched = split.predict_batch(files, max_batch=2)  # several batches: the next one decodes ahead
        plain = whole.predict_batch(files, max_batch=2)
        assert [p.label for p in prefetched] == [p.label for p in plain]
        np.testing.assert_allclose([list(p.scores.values()) for p in prefetched],
                                   [list(p.scores.values()) for p in plain], rtol=0, atol=1e-6)
        assert all(p.batch_size == 2 or p is prefetched[-1] for p in prefetched)
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG not really")
        with pytest.raises(PipelineError, match="broken.png.*could not be decoded"):
            split.predict_batch([*files[:3], str(broken), *files[3:]], max_batch=2)
