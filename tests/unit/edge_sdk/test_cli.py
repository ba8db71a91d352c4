"""The edge-sdk command: convert, inspect, run, devices, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk.cli import main
from tests import builders


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_inspect_run_images(tmp_path: Path, image_onnx: Path, image_folder: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    pkg = tmp_path / "colors.edgepkg"
    code, out, _ = _cli(capsys, "convert", str(image_onnx), "-o", str(pkg), "--task", "image-classification",
                        "--labels", "red,green,blue", "--preprocess", json.dumps(builders.preprocess_dict()),
                        "--validation", str(image_folder))
    assert code == 0 and "validation: accuracy 1.000 on 9 samples" in out

    code, out, _ = _cli(capsys, "inspect", str(pkg))
    assert code == 0 and "verified" in out and "labels: red, green, blue" in out and "input: image float32" in out

    code, out, err = _cli(capsys, "run", str(pkg), str(image_folder / "green"), str(image_folder / "red" / "1.png"))
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4
    assert [line.split()[1] for line in lines] == ["green", "green", "green", "red"]
    assert all("onnxruntime-cpu" in line for line in lines)
    assert "skipped tensorrt" in err

    code, out, _ = _cli(capsys, "run", str(pkg), str(image_folder / "blue" / "0.png"), "--json", "--backend", "cpu")
    record = json.loads(out)[0]
    assert record["label"] == "blue" and record["backend"] == "onnxruntime-cpu" and "total" in record["timings_ms"]


def test_convert_and_run_text(tmp_path: Path, text_onnx: Path, tokenizer_file: Path, text_validation: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "labels.txt").write_text("\n".join(builders.TEXT_LABELS))
    pkg = tmp_path / "words"
    code, out, _ = _cli(capsys, "convert", str(text_onnx), "-o", str(pkg), "--task", "text-classification",
                        "--labels", str(tmp_path / "labels.txt"), "--tokenizer", str(tokenizer_file),
                        "--validation", str(text_validation), "--directory", "--json")
    assert code == 0 and json.loads(out)["validation"]["accuracy"] == 1.0 and pkg.is_dir()
    (tmp_path / "reports.txt").write_text("oil leak at flange\n\nbearing grinding\n")
    code, out, _ = _cli(capsys, "run", str(pkg), "--text", "pump is hot", "--text-file", str(tmp_path / "reports.txt"),
                        "--json")
    assert code == 0 and [r["label"] for r in json.loads(out)] == ["overheating", "leak", "bearing"]


def test_devices_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "devices", "--json")
    data = json.loads(out)
    assert code == 0 and "CPUExecutionProvider" in data["onnxruntime_providers"]
    code, out, _ = _cli(capsys, "devices")
    assert code == 0 and out.strip()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "/no/such.edgepkg"], "edge-sdk: error: package '/no/such.edgepkg' does not exist"),
        (["devices", "--root", "/no/such/root"], "/no/such/root"),
        (["run", "/no/such.edgepkg", "x.png"], "does not exist"),
    ],
)
def test_errors_are_one_line_without_traceback(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_preprocess_json_is_named(tmp_path: Path, image_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "convert", str(image_onnx), "-o", str(tmp_path / "x"), "--task",
                        "image-classification", "--labels", "a,b,c", "--preprocess", "{oops")
    assert code == 1 and "--preprocess is not valid JSON" in err


def test_run_without_inputs_is_refused(image_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "run", str(image_package))
    assert code == 1 and "nothing to run" in err


def test_int8_convert_inspect_and_calibration_cache(tmp_path: Path, image_folder: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    onnx.save(builders.cnn_model(size=8), tmp_path / "cnn.onnx")
    pkg = tmp_path / "cnn.edgepkg"
    code, out, err = _cli(capsys, "convert", str(tmp_path / "cnn.onnx"), "-o", str(pkg), "--task",
                          "image-classification", "--labels", "red,green,blue", "--preprocess",
                          json.dumps(builders.preprocess_dict()), "--calibration", str(image_folder),
                          "--quantize", "int8", "--method", "percentile", "--budget", "-1")
    assert code == 0, err
    assert "int8: percentile calibration on 9 samples" in out and "calibration  [" in err
    code, out, _ = _cli(capsys, "inspect", str(pkg))
    assert code == 0 and "(image-classification, int8)" in out and "sensitive: " in out
    code, out, _ = _cli(capsys, "calib-cache", str(pkg), "--trt-version", "8.5.2")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "TRT-8502-EntropyCalibration2" and any(l.startswith("image: ") for l in lines)
    code, out, _ = _cli(capsys, "run", str(pkg), str(image_folder / "red" / "0.png"), "--precision", "fp32")
    assert code == 0 and "onnxruntime-cpu fp32" in out


def test_calibration_cache_needs_an_int8_package(image_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "calib-cache", str(image_package))
    assert code == 1 and "has no scales.json" in err


def test_inspect_says_verified_only_for_a_package_that_serves(image_package: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A self-consistent package whose manifest lists a label more than the graph outputs has good hashes,
    but cannot serve: inspect must not call it verified."""
    from dataclasses import replace

    from runtime.package import Package, write_package

    code, out, _ = _cli(capsys, "inspect", str(image_package))
    assert code == 0 and "verified" in out and "serves: yes, on onnxruntime-cpu (fp32" in out
    package = Package.open(image_package)
    m = package.manifest
    lying = tmp_path / "lying.edgepkg"
    write_package(replace(m, postprocess=replace(m.postprocess, labels=(*m.postprocess.labels, "purple"))),
                  {name: package.read_bytes(name) for name in m.files}, lying)
    code, out, _ = _cli(capsys, "inspect", str(lying))
    assert code == 1 and out.splitlines()[0].endswith("CANNOT SERVE")
    assert "serves: no:" in out and "manifest has 4 labels" in out
    code, out, _ = _cli(capsys, "inspect", str(lying), "--no-load")
    assert code == 0 and out.splitlines()[0].endswith("hashes ok") and "serves: not checked" in out
    code, out, _ = _cli(capsys, "inspect", str(lying), "--json")
    assert code == 1 and json.loads(out)["serves"] is False


def test_inspect_path_imports_no_onnx() -> None:
    code = "import sys, converters.report, converters.calibration.scales; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_calibration_cache_fits_the_packaged_fp32_graph(tmp_path: Path, tokenizer_file: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from runtime.package import Package

    onnx.save(builders.transformer_model(), tmp_path / "enc.onnx")
    (tmp_path / "calib.txt").write_text("bearing noise\noil leak at the pump\nthe pump is hot\n")
    args = ["convert", str(tmp_path / "enc.onnx"), "--task", "text-classification", "--labels",
            ",".join(builders.TEXT_LABELS), "--tokenizer", str(tokenizer_file), "--calibration",
            str(tmp_path / "calib.txt"), "--quantize", "int8", "--budget", "-1", "--json"]
    assert _cli(capsys, *args, "-o", str(tmp_path / "smooth.edgepkg"))[0] == 0
    package = Package.open(tmp_path / "smooth.edgepkg")
    fp32 = onnx.load_from_string(package.read_bytes("model.onnx"))
    assert any(n.name == "h0_smooth_Mul" for n in fp32.graph.node)  # the packaged fp32 graph is the smoothed one
    code, out, _ = _cli(capsys, "calib-cache", str(tmp_path / "smooth.edgepkg"), "--trt-version", "10.3.0")
    assert code == 0 and "\nh0_smooth: " in out
    assert _cli(capsys, *args, "--no-smoothing", "-o", str(tmp_path / "plain.edgepkg"))[0] == 0
    code, out, _ = _cli(capsys, "calib-cache", str(tmp_path / "plain.edgepkg"), "--trt-version", "8.6.1")
    assert code == 0 and out.startswith("TRT-8601-EntropyCalibration2\n") and "h0_smooth" not in out
    if importlib.util.find_spec("tensorrt") is None:  # the header must be the reading TensorRT's: no guess
        code, _, err = _cli(capsys, "calib-cache", str(tmp_path / "plain.edgepkg"))
        assert code == 1 and "no TensorRT is installed here" in err and "10.3.0 on JetPack 6.1/6.2" in err


def test_calibration_cache_refuses_scales_of_another_graph(tmp_path: Path, image_folder: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from converters import convert
    from runtime.package import Package, write_package

    onnx.save(builders.cnn_model(size=8), tmp_path / "cnn.onnx")
    convert(tmp_path / "cnn.onnx", tmp_path / "a.edgepkg", task="image-classification", labels=builders.COLOR_LABELS,
            preprocess=builders.preprocess_dict(), calibration=image_folder, quantize="int8", budget=None)
    package = Package.open(tmp_path / "a.edgepkg")
    files = {name: package.read_bytes(name) for name in package.manifest.files}
    scales = json.loads(files["scales.json"])
    scales["graph_hash"] = "0" * 64
    files["scales.json"] = json.dumps(scales).encode()
    write_package(package.manifest, files, tmp_path / "b.edgepkg")
    code, _, err = _cli(capsys, "calib-cache", str(tmp_path / "b.edgepkg"))
    assert code == 1 and "were made for another graph" in err


def test_inspect_device_and_engine_dry_run(image_package: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    code, out, _ = _cli(capsys, "inspect", str(image_package), "--device")
    assert code == 0 and "would serve with: onnxruntime-cpu (fp32, fp32 graph, parity" in out
    assert "skipped onnxruntime-tensorrt: " in out
    code, out, _ = _cli(capsys, "engine", "build", str(image_package), "--dry-run")
    assert code == 0 and "would build engine fp32-fp16-" in out and "trtexec --onnx=model.onnx" in out
    code, out, _ = _cli(capsys, "engine", "list")
    assert code == 0 and "no engines in" in out
