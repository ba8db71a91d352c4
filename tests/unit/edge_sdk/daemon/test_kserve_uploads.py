"""KServe v2 JSON tensors and defensive image upload decoding."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from typing import Any, Callable

import cv2
import numpy as np
import pytest

from edge_sdk.daemon import uploads
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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- the JPEG header is read as libjpeg reads it --------------------------------------------------


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` (as cv2 writes it: no fill bytes) with its frame header (SOF0) declaring another size."""
    i = 2
    while jpeg[i + 1] != 0xC0:
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    return jpeg[:i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9:]


def hide_size(jpeg: bytes) -> bytes:
    """A legal 0xFF fill byte after SOI, then an APP11 segment whose payload holds a fake 16x16 SOF.

    A parser that takes the fill byte for a marker reads 0xEB and the high byte of the APP11 length as
    a length and lands inside the payload, on the fake frame header; libjpeg skips the fill byte and
    the whole APP11 segment and reads the true frame header that follows.
    """
    length = 0xF000
    landing = 2 + 2 + ((0xEB << 8) | (length >> 8))
    fake_sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    payload = bytearray(length - 2)
    at = landing - 7  # the payload starts after SOI, the fill byte, the APP11 marker and its length
    payload[at:at + len(fake_sof)] = fake_sof
    return jpeg[:2] + b"\xff" + b"\xff\xeb" + struct.pack(">H", length) + bytes(payload) + jpeg[2:]


def no_decoding(*args: Any) -> None:
    raise AssertionError("cv2.imdecode was reached: the header check let the upload through")


def test_a_fill_byte_and_a_fake_frame_in_app11_do_not_hide_the_true_size() -> None:
    data = hide_size(encoded(".jpg", h=48, w=64))
    seen = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # what libjpeg reads
    assert seen is not None and seen.shape == (48, 64, 3)
    assert image_size(data) == ("jpeg", 64, 48)
    assert decode_upload(data).shape == (48, 64, 3)


def test_a_large_jpeg_hiding_its_size_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = hide_size(jpeg_with_size(encoded(".jpg"), 8000, 8000))
    monkeypatch.setattr(uploads.cv2, "imdecode", no_decoding)
    with pytest.raises(BadRequest, match="declares 8000x8000 pixels") as info:
        decode_upload(data)
    assert info.value.status == 413


def test_fill_bytes_and_standalone_markers_are_skipped() -> None:
    jpeg = encoded(".jpg")
    data = jpeg[:2] + b"\xff\xff\xff\x01" + b"\xff\xd3" + jpeg[2:]  # fill bytes, TEM, RST3: no lengths
    assert image_size(data) == ("jpeg", 40, 30)
    assert decode_upload(data).shape == (30, 40, 3)


@pytest.mark.parametrize("edit, match", [
    (lambda j: j[:2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + j[2:], "0xFFDA at byte 2 comes before any frame"),
    (lambda j: j[:2] + b"\xff\xd9" + j[2:], "0xFFD9 at byte 2 comes before any frame"),
    (lambda j: j[:2] + b"\xff\xd8" + j[2:], "0xFFD8 at byte 2 comes before any frame"),
    (lambda j: j[:20] + b"\x00" + j[20:], "byte 20 is 0x00 where a marker"),
    (lambda j: j[:2] + b"\xff\xe1\x00\x00" + j[2:], "segment at byte 2 declares 0 bytes"),
    (lambda j: j[:2] + b"\xff\xe1\x00\x01" + j[2:], "segment at byte 2 declares 1 bytes"),
    (lambda j: j[:2] + b"\xff\xff\x00" + j[2:], "not followed by a marker"),
    (lambda j: j[:30], "declares 67 bytes; expected 2 to 8"),
])
def test_a_jpeg_header_libjpeg_would_not_read_like_us_is_415(edit: Callable[[bytes], bytes], match: str) -> None:
    with pytest.raises(BadRequest, match=match) as info:
        decode_upload(edit(encoded(".jpg")))
    assert info.value.status == 415 and "header is damaged" in info.value.message


@pytest.mark.parametrize("ext, filler, match", [
    (".jpg", b"\xff\xfe\x00\x02", "more than 1024 segments come before the first scan"),  # empty comments
    (".png", png_chunk(b"tEXt", b""), "more than 1024 chunks before its image data"),
])
def test_a_header_padded_with_thousands_of_empty_segments_is_415(ext: str, filler: bytes, match: str) -> None:
    image = encoded(ext)
    at = 2 if ext == ".jpg" else 33  # after SOI, after IHDR
    with pytest.raises(BadRequest, match=match) as info:
        decode_upload(image[:at] + filler * 2000 + image[at:])
    assert info.value.status == 415


def test_a_malformed_frame_header_is_415() -> None:
    jpeg = bytearray(encoded(".jpg"))
    sof = jpeg.index(b"\xff\xc0")  # cv2 writes SOF0 after the tables, none of which holds 0xFFC0
    jpeg[sof + 11] = 0x50  # the first component's sampling factors: 5x0
    with pytest.raises(BadRequest, match=r"sampled \[\(5, 0\)") as info:
        decode_upload(bytes(jpeg))
    assert info.value.status == 415


def test_multi_scan_jpegs_count_their_coefficient_buffer() -> None:
    image = np.full((48, 64, 3), 100, np.uint8)
    progressive = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    full = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    headers = {name: uploads.read_header(cv2.imencode(".jpg", image, params)[1].tobytes())
               for name, params in (("baseline", []), ("progressive", progressive), ("444", progressive + full))}
    assert headers["baseline"].buffer_bytes == 0
    assert headers["progressive"].buffer_bytes == 64 * 48 * 2 * 3 // 2  # 4:2:0: a quarter for each chroma
    assert headers["444"].buffer_bytes == 64 * 48 * 2 * 3 and "progressive" in headers["444"].depth


# --- PNG and BMP headers --------------------------------------------------------------------------


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    return png[:16] + struct.pack(">II", width, height) + png[24:]


def test_a_16_bit_png_too_costly_to_decode_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, png = cv2.imencode(".png", np.zeros((30, 40, 3), np.uint16))
    data = with_png_size(png.tobytes(), 6000, 6000)  # 36 MP: under MAX_PIXELS, but 9 bytes a pixel to decode
    monkeypatch.setattr(uploads.cv2, "imdecode", no_decoding)
    with pytest.raises(BadRequest) as info:
        decode_upload(data)
    assert info.value.status == 413 and info.value.hint and "8-bit" in info.value.hint
    assert "the png image (6000x6000, 16-bit RGB) needs 332388608 bytes" in info.value.message
    assert f"over the {uploads.MAX_DECODE_BYTES}-byte" in info.value.message


def test_an_8_bit_image_of_max_pixels_is_within_the_per_decode_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, png = cv2.imencode(".png", np.zeros((30, 40, 4), np.uint8))
    data = with_png_size(png.tobytes(), 8000, MAX_PIXELS // 8000)
    assert uploads.read_header(data).decode_bytes <= uploads.MAX_DECODE_BYTES
    monkeypatch.setattr(uploads.cv2, "imdecode", lambda buf, flags: np.zeros((1, 1, 3), np.uint8))
    assert decode_upload(data).shape == (1, 1, 3)  # handed to the decoder, not refused


def test_an_animated_png_counts_its_frame_buffers() -> None:
    png = encoded(".png")
    animated = png[:33] + png_chunk(b"acTL", struct.pack(">II", 2, 0)) + png[33:]  # acTL after IHDR
    assert uploads.read_header(png).buffer_bytes == 0
    assert uploads.read_header(animated).buffer_bytes == 3 * 40 * 30 * 3


@pytest.mark.parametrize("colour, bits", [(2, 4), (5, 8), (3, 16)])
def test_a_png_with_an_impossible_colour_type_or_depth_is_415(colour: int, bits: int) -> None:
    png = bytearray(encoded(".png"))
    png[24:26] = bytes([bits, colour])
    with pytest.raises(BadRequest, match=f"colour type {colour} with bit depth {bits}; PNG allows") as info:
        decode_upload(bytes(png))
    assert info.value.status == 415


def test_a_bmp_with_the_12_byte_core_header_is_read_as_opencv_reads_it() -> None:
    pixels = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)
    rows = pixels[::-1].tobytes()  # bottom-up, 12-byte rows need no padding
    bmp = b"BM" + struct.pack("<IHHI", 26 + len(rows), 0, 0, 26) + struct.pack("<IHHHH", 12, 4, 3, 1, 24) + rows
    assert image_size(bmp) == ("bmp", 4, 3)
    np.testing.assert_array_equal(decode_upload(bmp), pixels)


# --- the decode budget ----------------------------------------------------------------------------


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert condition()


def test_a_decode_that_does_not_fit_the_budget_is_503_with_retry_after() -> None:
    data = encoded(".png")
    budget = uploads.DecodeBudget(capacity=64 * uploads.MiB, wait_s=0)
    with budget.reserve(budget.capacity - 1000):
        with pytest.raises(uploads.Busy, match=r"needs \d+ bytes and 67107864 of the 67108864-byte") as info:
            decode_upload(data, budget=budget)
    assert info.value.status == 503 and info.value.retry_after_s == 1 and "Retry-After" in (info.value.hint or "")
    assert budget.in_flight == 0 and decode_upload(data, budget=budget).shape == (30, 40, 3)


def test_a_waiting_decode_proceeds_once_the_budget_is_given_back() -> None:
    data = encoded(".png")
    budget = uploads.DecodeBudget(capacity=64 * uploads.MiB, wait_s=60)
    results: list[np.ndarray] = []
    with budget.reserve(budget.capacity):
        worker = threading.Thread(target=lambda: results.append(decode_upload(data, budget=budget)))
        worker.start()
        eventually(lambda: budget.waiting == 1)
        assert not results  # held back while the budget is full
    worker.join(30)
    assert [r.shape for r in results] == [(30, 40, 3)] and budget.in_flight == 0 and budget.waiting == 0


def test_concurrent_decodes_hold_at_most_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(".png")
    need = uploads.read_header(data).decode_bytes
    budget = uploads.DecodeBudget(capacity=2 * need + need // 2, wait_s=60)
    inside, most, lock, go = [0], [0], threading.Lock(), threading.Event()

    def slow_decode(buf: np.ndarray, flags: int) -> np.ndarray:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        go.wait(30)
        with lock:
            inside[0] -= 1
        return np.zeros((30, 40, 3), np.uint8)

    monkeypatch.setattr(uploads.cv2, "imdecode", slow_decode)
    results: list[np.ndarray] = []
    workers = [threading.Thread(target=lambda: results.append(decode_upload(data, budget=budget))) for _ in range(4)]
    for w in workers:
        w.start()
    eventually(lambda: inside[0] == 2 and budget.waiting == 2)
    assert budget.in_flight == 2 * need
    go.set()
    for w in workers:
        w.join(30)
    assert len(results) == 4 and most[0] == 2 and budget.in_flight == 0


def test_a_decode_larger_than_the_whole_budget_is_413() -> None:
    budget = uploads.DecodeBudget(capacity=uploads.MiB)
    with pytest.raises(BadRequest, match=r"the png image \(40x30, 8-bit RGB\) needs \d+ bytes, more than the whole "
                                         r"1048576-byte decode budget") as info:
        decode_upload(encoded(".png"), budget=budget)
    assert info.value.status == 413 and budget.in_flight == 0


def test_the_budget_is_given_back_when_a_decode_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = uploads.DecodeBudget()
    with pytest.raises(BadRequest, match="could not be decoded"):
        decode_upload(encoded(".png")[:70], budget=budget)
    assert budget.in_flight == 0
    held: list[int] = []

    def broken(buf: np.ndarray, flags: int) -> None:
        held.append(budget.in_flight)
        raise cv2.error("decoder failure")

    monkeypatch.setattr(uploads.cv2, "imdecode", broken)
    with pytest.raises(BadRequest, match=r"could not be decoded \(decoder failure\)") as info:
        decode_upload(encoded(".png"), budget=budget)
    assert info.value.status == 422 and held == [uploads.read_header(encoded(".png")).decode_bytes]
    assert budget.in_flight == 0


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"wait_s": -1}, {"retry_after_s": 0}])
def test_a_decode_budget_with_impossible_settings_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="expected capacity >= 1 byte"):
        uploads.DecodeBudget(**kwargs)  # type: ignore[arg-type]
