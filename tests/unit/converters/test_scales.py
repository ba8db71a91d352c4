"""The portable scale file: JSON round trip, validation, TensorRT cache text, hashes."""

from __future__ import annotations

import json
import struct
from typing import Any, Callable

import numpy as np
import pytest

from converters.calibration.scales import (
    ScaleFile,
    TensorScale,
    check_matches,
    data_hash,
    graph_hash,
    parse_trt_cache,
    trt_version_code,
)
from edge_sdk.errors import CalibrationError

GRAPH = b"fp32 onnx bytes"


def _scales(**amax: float) -> ScaleFile:
    tensors = {name: TensorScale(name=name, amax=value, method="entropy") for name, value in amax.items()}
    return ScaleFile(tensors=tensors, calibration_hash=data_hash([np.ones(3)]), graph_hash=graph_hash(GRAPH),
                     samples=32, method="entropy", created_by="edge-sdk test")


@pytest.fixture
def scale_file() -> ScaleFile:
    affine = TensorScale(name="conv1_out", amax=6.5, lo=-0.5, hi=6.5, method="percentile", scheme="affine",
                         histogram={"min": -0.5, "max": 7.25, "count": 4096, "nan_count": 0, "inf_count": 0,
                                    "bins": 2048, "bound": 7.25}, error=0.0125)
    linear = TensorScale(name="input", amax=2.6400001, method="minmax")
    return ScaleFile(tensors={"input": linear, "conv1_out": affine}, calibration_hash=data_hash([np.ones(3)]),
                     graph_hash=graph_hash(GRAPH), samples=64, method="entropy", created_by="edge-sdk 0.1.0")


def test_json_round_trip_is_exact_and_stable(scale_file: ScaleFile) -> None:
    text = scale_file.to_json()
    assert ScaleFile.from_json(text) == scale_file
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert ScaleFile.from_json(text).to_json() == text
    assert json.loads(text)["tensors"]["conv1_out"]["histogram"]["bins"] == 2048


@pytest.mark.parametrize(("version", "header"), [
    ("8.6.1", "TRT-8601-EntropyCalibration2"),
    ("8.5.2", "TRT-8502-EntropyCalibration2"),
    ("8.6", "TRT-8600-EntropyCalibration2"),
    ("8.6.1.6", "TRT-8601-EntropyCalibration2"),
    ("7.1.3", "TRT-7103-EntropyCalibration2"),
    ("10.3.0", "TRT-100300-EntropyCalibration2"),
])
def test_cache_header_follows_tensorrt_version_code(version: str, header: str) -> None:
    assert _scales(a=1.0).to_trt_cache(version).splitlines()[0] == header


def test_cache_version_has_no_default() -> None:
    """TensorRT ignores a cache whose header names another version: the caller must name the device's."""
    with pytest.raises(TypeError):
        _scales(a=1.0).to_trt_cache()  # type: ignore[call-arg]


@pytest.mark.parametrize("version", ["8", "eight", "8.10.0", "", "8.6.1-ga"])
def test_bad_tensorrt_version_is_refused(version: str) -> None:
    with pytest.raises(CalibrationError, match="TensorRT version"):
        trt_version_code(version)


def test_cache_lines_are_big_endian_float32_of_amax_over_127() -> None:
    text = _scales(unit=127.0, small=1.0).to_trt_cache("8.6.1")
    assert text == "TRT-8601-EntropyCalibration2\nsmall: 3c010204\nunit: 3f800000\n"
    assert "3c010204" == struct.pack(">f", np.float32(1.0 / 127.0)).hex()


def test_cache_lines_sorted_with_trailing_newline() -> None:
    text = _scales(zeta=3.0, alpha=1.0, mid=2.0).to_trt_cache("10.3.0")
    assert [line.split(":")[0] for line in text.splitlines()[1:]] == ["alpha", "mid", "zeta"]
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_parse_of_render_round_trips_to_float32(scale_file: ScaleFile) -> None:
    header, scales = parse_trt_cache(scale_file.to_trt_cache("10.3.0"))
    assert header == "TRT-100300-EntropyCalibration2"
    assert scales == {name: float(np.float32(t.amax / 127.0)) for name, t in scale_file.tensors.items()}


def test_parse_reads_a_tensorrt_written_cache() -> None:
    # Lines as TensorRT 8.5 writes them, unnamed layers included; an image input calibrated to ~255.
    text = ("TRT-8510-EntropyCalibration2\nx: 4000890a\n/conv1/Conv_output_0: 3f9db09c\n"
            "(Unnamed Layer* 8) [Constant]_output: 39137939\n")
    header, scales = parse_trt_cache(text)
    assert header == "TRT-8510-EntropyCalibration2"
    assert scales["x"] * 127 == pytest.approx(255.06, abs=0.01)
    assert set(scales) == {"x", "/conv1/Conv_output_0", "(Unnamed Layer* 8) [Constant]_output"}


def test_names_with_colons_survive_the_cache() -> None:
    header, scales = parse_trt_cache(_scales(**{"input:0": 127.0}).to_trt_cache("8.5.2"))
    assert scales == {"input:0": 1.0}


@pytest.mark.parametrize(("text", "line"), [
    ("", "line 1"),
    ("not a header\na: 3f800000\n", "line 1"),
    ("TRT-8601-EntropyCalibration2\na: 3f800000\nb 3f800000\n", "line 3"),
    ("TRT-8601-EntropyCalibration2\na: 3f80000g\n", "line 2"),
    ("TRT-8601-EntropyCalibration2\na: 3f8000000\n", "line 2"),
    ("TRT-8601-EntropyCalibration2\na: 3f800000\na: 3f800000\n", "line 3"),
    ("TRT-8601-EntropyCalibration2\na: 7fc00000\n", "line 2"),
    ("TRT-8601-EntropyCalibration2\na: bf800000\n", "line 2"),
])
def test_malformed_cache_is_refused_with_line_number(text: str, line: str) -> None:
    with pytest.raises(CalibrationError, match=line):
        parse_trt_cache(text)


def test_graph_mismatch_is_refused() -> None:
    scales = _scales(a=1.0)
    check_matches(scales, GRAPH)
    with pytest.raises(CalibrationError, match="another graph; re-calibrate"):
        check_matches(scales, GRAPH + b" pruned")


@pytest.mark.parametrize("amax", [0.0, -1.0, float("nan"), float("inf"), "1.0", True])
def test_invalid_amax_is_refused_naming_the_tensor(amax: float) -> None:
    with pytest.raises(CalibrationError, match="tensor 'conv1_out' has amax"):
        TensorScale(name="conv1_out", amax=amax, method="entropy")


@pytest.mark.parametrize("amax", ["NaN", "-2.5", "0"])
def test_from_json_refuses_invalid_amax_naming_the_tensor(scale_file: ScaleFile, amax: str) -> None:
    data = json.loads(scale_file.to_json())
    data["tensors"]["input"]["amax"] = "AMAX"
    text = json.dumps(data).replace('"AMAX"', amax)
    with pytest.raises(CalibrationError, match="tensor 'input' has amax"):
        ScaleFile.from_json(text)


def test_from_json_refuses_unknown_version(scale_file: ScaleFile) -> None:
    data = json.loads(scale_file.to_json())
    data["version"] = 2
    data["tensors"] = {"input": {"threshold": 1.0}}  # a future layout must not be misread
    with pytest.raises(CalibrationError, match="version 2 is not supported"):
        ScaleFile.from_json(json.dumps(data))


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d["tensors"]["input"].update(method="kl"), "method 'kl'"),
    (lambda d: d["tensors"]["input"].update(colour="red"), "wrong fields"),
    (lambda d: d.update(graph_hash="abc"), "graph_hash 'abc'"),
    (lambda d: d.update(samples=0), "samples is 0"),
    (lambda d: d["tensors"]["conv1_out"].update(lo=7.0), "lo=7.0"),
    (lambda d: d["tensors"]["conv1_out"]["histogram"].update(counts=[1, 2]), "histogram"),
])
def test_from_json_validates_fields(
    scale_file: ScaleFile, mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    data = json.loads(scale_file.to_json())
    mutate(data)
    with pytest.raises(CalibrationError, match=match):
        ScaleFile.from_json(json.dumps(data))


def test_from_json_refuses_non_json() -> None:
    with pytest.raises(CalibrationError, match="not valid JSON"):
        ScaleFile.from_json("{tensors:")


def test_data_hash_covers_dtype_shape_bytes_and_names() -> None:
    zeros = np.zeros(4, np.int8)
    base = data_hash([zeros])
    assert data_hash([zeros.copy()]) == base
    assert data_hash([np.zeros(1, np.int32)]) != base  # same four bytes, other dtype
    assert data_hash([zeros.reshape(2, 2)]) != base
    assert data_hash([np.array([0, 0, 0, 1], np.int8)]) != base
    feeds = {"image": np.ones((1, 3), np.float32), "mask": np.zeros((1, 3), np.float32)}
    assert data_hash([feeds]) == data_hash([dict(reversed(list(feeds.items())))])
    assert data_hash([feeds]) != data_hash([{"image": feeds["mask"], "mask": feeds["image"]}])


def test_data_hash_refuses_object_arrays() -> None:
    with pytest.raises(CalibrationError, match="dtype object"):
        data_hash([np.array(["a", None], dtype=object)])
