"""Uploaded images, decoded defensively.

The format is recognised by its magic bytes (JPEG, PNG, BMP), the declared width and height
are read from the header and checked *before* decoding, so a small file that would inflate to
gigabytes (a decompression bomb) is refused without allocating it; only then does OpenCV
decode it.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from edge_sdk.daemon.kserve import BadRequest

MAX_PIXELS = 40_000_000  # 40 MP: larger than any industrial camera frame we expect


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def image_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header; BadRequest when it is not a supported image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data.startswith(b"\xff\xd8\xff"):
        size = _jpeg_size(data)
        if size is None:
            raise BadRequest("the upload starts like a JPEG but its header is damaged",
                             hint="send a complete JPEG or PNG file", status=415)
        return ("jpeg", *size)
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return "bmp", abs(width), abs(height)
    raise BadRequest(f"the upload ({len(data)} bytes, starting {data[:8]!r}) is not a JPEG, PNG or BMP image",
                     hint="send the image file's bytes as the request body", status=415)


def decode_upload(data: bytes) -> np.ndarray:
    """A BGR image from uploaded bytes, or a 4xx error saying what is wrong with them."""
    if not data:
        raise BadRequest("the request body is empty; expected an image (JPEG, PNG or BMP)")
    kind, width, height = image_size(data)
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise BadRequest(f"the {kind} image declares {width}x{height} pixels; at most {MAX_PIXELS} pixels are accepted",
                         status=413)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BadRequest(f"the {kind} image ({width}x{height}) could not be decoded; it may be truncated or corrupt",
                         status=422)
    return image
