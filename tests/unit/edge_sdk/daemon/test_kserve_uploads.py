"""KServe v2 JSON tensors and defensive image upload decoding."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

import json

from edge_sdk.daemon.kserve import BadRequest, decode_request, encode_response, split_body, tensor_metadata
from edge_sdk.daemon.uploads import MAX_PIXELS, decode_upload, image_size
from runtime.manifest import TensorSpec

SPECS = (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("mask", "int64", ("batch", "sequence")))
IMAGE = (TensorSpec("image", "float32", ("batch", 3, 4, 4)),)


def test_request_round_trip() -> None:
    body = {"id": "r1", "inputs": [
        {"name": "input_ids", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3, 4, 5, 6]},
        {"name": "mask", "shape": [2, 3], "datatype": "INT64", "data": [[1, 1, 1], [1, 1, 0]]}],
        "outputs": [{"name": "logits"}]}
    request = decode_request(body, SPECS)
    feeds = request.feeds
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert feeds["mask"].shape == (2, 3) and request.outputs == [("logits", False)] and request.id == "r1"
    body_bytes, head = encode_response("words", "1", {"logits": np.ones((2, 2), np.float32), "other": np.zeros(1)},
                                       request)
    assert head is None and json.loads(body_bytes) == {
        "model_name": "words", "model_version": "1", "id": "r1",
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [1.0] * 4}]}
    assert tensor_metadata(IMAGE) == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 4, 4]}]


@pytest.mark.parametrize("body, match", [
    ([], "expected a JSON object"),
    ({"inputs": []}, "no 'inputs'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, "this model's inputs are"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 4], "datatype": "FP32", "data": [0] * 12}]}, "expected rank 4"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 5, 4], "datatype": "FP32", "data": [0] * 60}]},
     "dimension 2 must be 4"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0] * 5}]}, "needs 48"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "INT8", "data": [0] * 48}]}, "expected FP32"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": ["a"] * 48}]},
     "cannot be read as float32"),
    ({"inputs": [{"name": "image", "shape": "1,3", "datatype": "FP32", "data": []}]}, "non-empty list"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32",
                  "parameters": {"binary_data_size": 192}}]}, "the body holds 0 more bytes"),
])
def test_bad_requests_say_what_is_wrong(body: object, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        decode_request(body, IMAGE)


def test_unknown_requested_output() -> None:
    request = decode_request({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32",
                                          "data": [0.0] * 48}], "outputs": [{"name": "nope"}]}, IMAGE)
    with pytest.raises(BadRequest, match=r"output\(s\) \['nope'\] do not exist"):
        encode_response("m", "1", {"logits": np.zeros(1)}, request)


def test_binary_tensor_extension_both_ways() -> None:
    image = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 192}}],
                         "parameters": {"binary_data_output": True}}).encode()
    parsed, tail = split_body(header + image.tobytes(), str(len(header)))
    request = decode_request(parsed, IMAGE, tail)
    np.testing.assert_array_equal(request.feeds["image"], image)
    logits = np.array([[0.5, -1.0]], np.float32)
    body, head = encode_response("m", "1", {"logits": logits}, request)
    assert head is not None and json.loads(body[:head])["outputs"][0]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[head:], np.float32), logits.ravel())
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length is '999'"):
        split_body(header, "999")


def encoded(ext: str, h: int = 30, w: int = 40) -> bytes:
    ok, data = cv2.imencode(ext, np.full((h, w, 3), 100, np.uint8))
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("ext, kind", [(".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp")])
def test_formats_are_sniffed_and_decoded(ext: str, kind: str) -> None:
    data = encoded(ext)
    assert image_size(data) == (kind, 40, 30)
    assert decode_upload(data).shape == (30, 40, 3)


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    png = bytearray(encoded(".png"))
    png[16:24] = struct.pack(">II", 100_000, 100_000)  # the header claims 10 gigapixels
    with pytest.raises(BadRequest, match=f"at most {MAX_PIXELS} pixels") as info:
        decode_upload(bytes(png))
    assert info.value.status == 413


@pytest.mark.parametrize("data, status, match", [
    (b"", 400, "body is empty"),
    (b"GIF89a....", 415, "not a JPEG, PNG or BMP"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", 415, "header is damaged"),
])
def test_bad_uploads(data: bytes, status: int, match: str) -> None:
    with pytest.raises(BadRequest, match=match) as info:
        decode_upload(data)
    assert info.value.status == status


def test_a_truncated_image_is_unprocessable() -> None:
    with pytest.raises(BadRequest, match="could not be decoded") as info:
        decode_upload(encoded(".png")[:70])
    assert info.value.status == 422
