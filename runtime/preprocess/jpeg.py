"""JPEG headers read the way libjpeg reads them: the frame a decode will produce, before decoding.

The daemon uses this to bound an upload's decode (:mod:`edge_sdk.daemon.uploads`); the image
preprocessing uses it to decode a large frame at a reduced size when the model's input is much
smaller (``decode="reduced"``, :mod:`runtime.preprocess.image`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Iterator

SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length follows
SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
_FILL = re.compile(rb"\xff+")
#: JPEG segments before the first scan (PNG chunks before the first IDAT, for the daemon): real files
#: have a few dozen (ICC profiles and XMP split over APPn); walking more only spends CPU.
MAX_SEGMENTS = 1024


class JpegDamaged(Exception):
    """A JPEG header the decoder would not read as we do; the message says where and why."""


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(marker, offset of its length field, length)`` for each marker after SOI, as libjpeg walks them.

    Any run of 0xFF fill bytes may precede a marker. TEM, RST0-7, SOI and EOI have no length (0);
    every other marker is followed by a two-byte big-endian length that counts itself. libjpeg would
    skip stray non-0xFF bytes between segments with a warning; we refuse them, so we never guess.
    """
    i = 2
    for _ in range(MAX_SEGMENTS):
        if i >= len(data):
            raise JpegDamaged(f"the data ends at byte {i} before a frame header (SOF)")
        fill = _FILL.match(data, i)
        if fill is None:
            raise JpegDamaged(f"byte {i} is 0x{data[i]:02X} where a marker (0xFF) must start")
        start, i = i, fill.end()
        if i >= len(data) or data[i] == 0x00:
            raise JpegDamaged(f"the 0xFF bytes at byte {start} are not followed by a marker")
        marker, i = data[i], i + 1
        if marker in STANDALONE or marker in (SOI, EOI):
            yield marker, i, 0
            continue
        length = int.from_bytes(data[i:i + 2], "big") if i + 2 <= len(data) else 0
        if length < 2 or i + length > len(data):
            raise JpegDamaged(f"the 0xFF{marker:02X} segment at byte {i - 2} declares {length} bytes; "
                              f"expected 2 to {len(data) - i}")
        yield marker, i, length
        i += length
    raise JpegDamaged(f"more than {MAX_SEGMENTS} segments come before the first scan; real files have a few dozen")


@dataclass(frozen=True)
class JpegFrame:
    width: int
    height: int
    precision: int
    components: int
    progressive: bool
    coefficients: int  # bytes of DCT coefficients a multi-scan decode buffers


def jpeg_frame(data: bytes, marker: int, at: int, length: int) -> JpegFrame:
    """The image a start-of-frame segment declares, with the checks libjpeg makes."""
    if length < 8 or length != 8 + 3 * data[at + 7]:
        raise JpegDamaged(f"the frame header (SOF) at byte {at - 2} is {length} bytes; expected 8 + 3 per component")
    precision, height, width, count = struct.unpack(">BHHB", data[at + 2:at + 8])
    factors = [(data[at + 9 + 3 * c] >> 4, data[at + 9 + 3 * c] & 15) for c in range(count)]
    if count < 1 or not all(1 <= h <= 4 and 1 <= v <= 4 for h, v in factors):
        raise JpegDamaged(f"the frame header (SOF) declares {count} components sampled {factors}; "
                          "expected 1 or more, each factor 1 to 4")
    # 64 two-byte coefficients for each 8x8 block of each component, counted in whole MCUs
    mcus = -(-width // (8 * max(h for h, _ in factors))) * -(-height // (8 * max(v for _, v in factors)))
    return JpegFrame(width, height, precision, count, marker in PROGRESSIVE,
                     sum(mcus * h * v * 64 * 2 for h, v in factors))


def first_frame(data: bytes) -> JpegFrame | None:
    """The first frame header (the one libjpeg decodes) of JPEG ``data``; None when ``data`` is not a
    JPEG or its header cannot be read as libjpeg would (the decoder then decides)."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        for marker, at, length in jpeg_segments(data):
            if marker in SOF:
                return jpeg_frame(data, marker, at, length)
            if marker in (SOS, EOI, SOI):
                return None
    except (JpegDamaged, IndexError, struct.error):
        return None
    return None
