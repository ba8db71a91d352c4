"""Uploaded images, decoded defensively.

The format is recognised by its magic bytes (JPEG, PNG, BMP) and its header is read the way the
decoder will read it, so the width, height and sample layout are known *before* decoding:

* a small file that would inflate to gigabytes (a decompression bomb) is refused without
  allocating it (``MAX_PIXELS``);
* the bytes OpenCV needs to decode it (:attr:`ImageHeader.decode_bytes`) are capped per decode
  (``MAX_DECODE_BYTES``), so a legal but costly file (16-bit, progressive, animated) is 413;
* every decode in flight reserves those bytes from one process-wide :class:`DecodeBudget`, so
  concurrent uploads cannot add up past it: one that does not fit waits briefly, then is refused
  with 503 and ``Retry-After`` (:class:`edge_sdk.daemon.limits.Busy`).

Only then does OpenCV decode the bytes.
"""

from __future__ import annotations

import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from edge_sdk.daemon.kserve import BadRequest
from edge_sdk.daemon.limits import Busy
from runtime.preprocess.jpeg import EOI as _EOI
from runtime.preprocess.jpeg import MAX_SEGMENTS as _MAX_SEGMENTS
from runtime.preprocess.jpeg import SOF as _SOF
from runtime.preprocess.jpeg import SOI as _SOI
from runtime.preprocess.jpeg import SOS as _SOS
from runtime.preprocess.jpeg import JpegDamaged as _Damaged
from runtime.preprocess.jpeg import jpeg_frame as _jpeg_frame
from runtime.preprocess.jpeg import jpeg_segments as _jpeg_segments

MiB = 1 << 20
MAX_PIXELS = 40_000_000  # 40 MP: larger than any industrial camera frame we expect
#: An 8-bit RGBA or CMYK image of MAX_PIXELS fits (7 bytes a pixel, see ImageHeader.decode_bytes);
#: a 16-bit or a 4:4:4 progressive one that large does not.
MAX_DECODE_BYTES = 288 * MiB
_DECODER_STATE = 8 * MiB  # codec state and row buffers: 1.5 to 3 MiB measured (OpenCV 5.0)

#: PNG colour type -> (name, samples a pixel once expanded: a palette may carry alpha, allowed bit depths)
_PNG_COLOUR = {0: ("gray", 1, (1, 2, 4, 8, 16)), 2: ("RGB", 3, (8, 16)), 3: ("palette", 4, (1, 2, 4, 8)),
               4: ("gray+alpha", 2, (8, 16)), 6: ("RGBA", 4, (8, 16))}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares, read before decoding."""

    kind: str  # "jpeg", "png" or "bmp"
    width: int
    height: int
    depth: str  # for messages: "16-bit RGB", "8-bit, 3 components, progressive", "24 bits a pixel"
    pixel_bytes: int  # bytes a pixel takes at the file's own depth
    buffer_bytes: int = 0  # a whole-image buffer besides the pixels: multi-scan JPEG coefficients, APNG frames

    @property
    def decode_bytes(self) -> int:
        """The memory OpenCV needs to decode this image with IMREAD_COLOR, an upper bound.

        The 8-bit BGR output (3 bytes a pixel), plus the larger of the decoder's working image (the
        file's own depth, at least the BGR it converts to: OpenCV 5 decodes into one and copies it out)
        and any whole-image buffer (held while the output fills), plus the decoder's small state.
        """
        pixels = self.width * self.height
        return 3 * pixels + max(pixels * max(self.pixel_bytes, 3), self.buffer_bytes) + _DECODER_STATE


class DecodeBudget:
    """Decoder memory, in bytes, that all decodes in flight may hold together.

    A decode reserves what its header says it needs and gives it back when done, failed or not. One
    that does not fit waits up to ``wait_s`` for others to finish, then is refused with ``Busy``
    (503, ``Retry-After``); one larger than the whole budget could never fit and is 413. Waiters are
    not queued in order: a large decode may lose to smaller ones until its wait runs out.
    """

    def __init__(self, capacity: int = 512 * MiB, wait_s: float = 5.0, retry_after_s: int = 1) -> None:
        if capacity < 1 or wait_s < 0 or retry_after_s < 1:
            raise ValueError(f"DecodeBudget(capacity={capacity}, wait_s={wait_s}, retry_after_s={retry_after_s}): "
                             "expected capacity >= 1 byte, wait_s >= 0 and retry_after_s >= 1")
        self.capacity, self.wait_s, self.retry_after_s = capacity, wait_s, retry_after_s
        self._changed = threading.Condition()
        self._in_flight = 0
        self._waiting = 0

    @property
    def in_flight(self) -> int:
        """Bytes reserved now."""
        with self._changed:
            return self._in_flight

    @property
    def waiting(self) -> int:
        """Reservations waiting for room now."""
        with self._changed:
            return self._waiting

    @contextmanager
    def reserve(self, nbytes: int, what: str = "the decode") -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block; ``what`` names the work in errors."""
        if nbytes > self.capacity:
            raise BadRequest(f"{what} needs {nbytes} bytes, more than the whole {self.capacity}-byte decode budget",
                             hint="send a smaller image, or give the daemon a larger decode budget", status=413)
        with self._changed:
            if self._in_flight + nbytes > self.capacity:
                self._waiting += 1
                try:
                    fits = self._changed.wait_for(lambda: self._in_flight + nbytes <= self.capacity, self.wait_s)
                finally:
                    self._waiting -= 1
                if not fits:
                    raise Busy(f"the image decoders are busy: {what} needs {nbytes} bytes and {self._in_flight} "
                               f"of the {self.capacity}-byte decode budget stayed in use for {self.wait_s} s",
                               hint="retry after the Retry-After delay, or send smaller images",
                               retry_after_s=self.retry_after_s)
            self._in_flight += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= nbytes
                self._changed.notify_all()


DECODE_BUDGET = DecodeBudget()  # shared by every decode in this process


def _jpeg_header(data: bytes) -> ImageHeader:
    """The first frame header (SOF), the one libjpeg decodes; 415 when there is none.

    The coefficient buffer counts when the decode takes several scans: a progressive frame, or a
    first scan (SOS) that does not carry every component. When the first scan cannot be read the
    costlier decode is assumed; libjpeg then fails on the damaged data anyway.
    """
    frame, one_scan, reason = None, False, "it has no frame header (SOF)"
    try:
        for marker, at, length in _jpeg_segments(data):
            if frame is None and marker in _SOF:
                frame = _jpeg_frame(data, marker, at, length)
            elif marker in (_SOS, _EOI, _SOI):
                if frame is None:
                    raise _Damaged(f"marker 0xFF{marker:02X} at byte {at - 2} comes before any frame header (SOF)")
                one_scan = marker == _SOS and not frame.progressive and length >= 3 and data[at + 2] == frame.components
                break
    except _Damaged as exc:
        reason = str(exc)
    if frame is None:
        raise BadRequest(f"the upload starts like a JPEG but its header is damaged: {reason}",
                         hint="send a complete JPEG or PNG file", status=415)
    depth = f"{frame.precision}-bit, {frame.components} components" + (", progressive" if frame.progressive else "")
    return ImageHeader("jpeg", frame.width, frame.height, depth, frame.components * (2 if frame.precision > 8 else 1),
                       0 if one_scan else frame.coefficients)


def _png_animated(data: bytes) -> bool:
    """Whether an animation control chunk (acTL) comes before the first IDAT, as OpenCV looks for it.

    When the chunks run out before either, the decoder, walking the same lengths, fails there too.
    """
    i = 8
    for _ in range(_MAX_SEGMENTS):
        if i + 8 > len(data):
            return False
        (length,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        if kind in (b"acTL", b"IDAT"):
            return kind == b"acTL"
        i += 12 + length
    raise BadRequest(f"the PNG has more than {_MAX_SEGMENTS} chunks before its image data; real files have a few",
                     hint="send a PNG written by a conforming encoder", status=415)


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 29 or data[12:16] != b"IHDR":
        raise BadRequest(f"the upload starts like a PNG but its first chunk is {data[12:16]!r}, not a complete IHDR",
                         hint="send a complete PNG or JPEG file", status=415)
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    if colour not in _PNG_COLOUR or bits not in _PNG_COLOUR[colour][2]:
        allowed = "; ".join(f"{c} ({name}) with {'/'.join(map(str, b))}" for c, (name, _, b) in _PNG_COLOUR.items())
        raise BadRequest(f"the PNG header declares colour type {colour} with bit depth {bits}; PNG allows {allowed}",
                         hint="send a PNG written by a conforming encoder", status=415)
    name, samples, _ = _PNG_COLOUR[colour]
    pixel_bytes = samples * (2 if bits == 16 else 1)
    # OpenCV decodes an animated PNG through three whole-frame buffers at the file's depth
    frames = 3 * width * height * pixel_bytes if _png_animated(data) else 0
    return ImageHeader("png", width, height, f"{bits}-bit {name}", pixel_bytes, frames)


def _bmp_header(data: bytes) -> ImageHeader:
    """The header OpenCV reads: BITMAPCOREHEADER (12 bytes) or one of at least 36 bytes (INFO, V4, V5)."""
    (size,) = struct.unpack("<I", data[14:18])
    if size >= 36 and len(data) >= 30:
        width, height, bpp = struct.unpack("<ii2xH", data[18:30])
    elif size == 12 and len(data) >= 26:
        width, height, bpp = struct.unpack("<HH2xH", data[18:26])
    else:
        raise BadRequest(f"the upload starts like a BMP but its {len(data)} bytes hold no complete info header "
                         f"(declared size {size}; expected 12 or at least 36)",
                         hint="send a complete BMP, PNG or JPEG file", status=415)
    return ImageHeader("bmp", abs(width), abs(height), f"{bpp} bits a pixel", max(1, -(-bpp // 8)))


def read_header(data: bytes) -> ImageHeader:
    """The image an upload's header declares; BadRequest (415) when it is not a supported image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_header(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_header(data)
    if data.startswith(b"BM") and len(data) >= 18:
        return _bmp_header(data)
    raise BadRequest(f"the upload ({len(data)} bytes, starting {data[:8]!r}) is not a JPEG, PNG or BMP image",
                     hint="send the image file's bytes as the request body", status=415)


def image_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header; BadRequest when it is not a supported image."""
    header = read_header(data)
    return header.kind, header.width, header.height


def decode_upload(data: bytes, *, budget: DecodeBudget = DECODE_BUDGET,
                  max_decode_bytes: int = MAX_DECODE_BYTES) -> np.ndarray:
    """A BGR image from uploaded bytes, or a 4xx (or 503, busy) error saying what is wrong with them."""
    if not data:
        raise BadRequest("the request body is empty; expected an image (JPEG, PNG or BMP)")
    header = read_header(data)
    kind, width, height = header.kind, header.width, header.height
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise BadRequest(f"the {kind} image declares {width}x{height} pixels; at most {MAX_PIXELS} pixels are accepted",
                         status=413)
    need = header.decode_bytes
    what = f"the {kind} image ({width}x{height}, {header.depth})"
    if need > max_decode_bytes:
        raise BadRequest(f"{what} needs {need} bytes ({need // MiB} MiB) to decode, over the {max_decode_bytes}-byte "
                         f"({max_decode_bytes // MiB} MiB) limit per decode",
                         hint="send a smaller image, 8-bit rather than 16-bit, baseline rather than progressive "
                              "JPEG, or a still rather than animated PNG", status=413)
    with budget.reserve(need, what):
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error as exc:
            reason = getattr(exc, "err", None) or exc
            raise BadRequest(f"{what} could not be decoded ({reason}); it may be truncated or corrupt",
                             hint="send the complete file", status=422) from None
    if image is None:
        raise BadRequest(f"the {kind} image ({width}x{height}) could not be decoded; it may be truncated or corrupt",
                         hint="send the complete file", status=422)
    return image
