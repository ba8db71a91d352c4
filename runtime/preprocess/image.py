"""Image decoding and preprocessing, exactly as the package manifest declares.

One implementation serves every backend. Inputs may be a file path, encoded
bytes (JPEG, PNG, ...) or a decoded ``numpy`` array. Arrays follow OpenCV's
convention: ``HxWx3`` uint8 in **BGR** order (what ``cv2.imread`` and
``cv2.VideoCapture`` return), or ``HxW`` grayscale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np

from edge_sdk.errors import PipelineError
from runtime.manifest import ImagePreprocess
from runtime.preprocess.jpeg import first_frame

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
MAX_PIXELS = 100_000_000


def decode_image(image: ImageInput, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Return a BGR ``HxWx3`` uint8 array from a path, encoded bytes or an array.

    With ``reduce_to`` (height, width), a JPEG at least twice that size in both directions is
    decoded at 1/2, 1/4 or 1/8 of its size: the largest reduction that still covers it."""
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = np.frombuffer(bytes(image), dtype=np.uint8)
        what = f"{len(data)} bytes"
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise PipelineError(f"image file {str(path)!r} does not exist")
        data = np.fromfile(path, dtype=np.uint8)
        what = f"file {str(path)!r}"
    else:
        raise PipelineError(f"image is a {type(image).__name__}; expected a path, encoded bytes or a numpy array")
    if data.size == 0:
        raise PipelineError(f"image {what} is empty")
    decoded = cv2.imdecode(data, _decode_flag(data, reduce_to))
    if decoded is None:
        raise PipelineError(f"image {what} could not be decoded", hint="pass a JPEG, PNG, BMP or TIFF image")
    return decoded


#: (reduction, OpenCV flag), largest first: libjpeg scales by these in the DCT domain.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def _decode_flag(data: np.ndarray, reduce_to: tuple[int, int] | None) -> int:
    """IMREAD_COLOR, or the reduced decode of a JPEG whose 1/k-size image (libjpeg rounds up) still
    covers ``reduce_to`` in both directions."""
    if reduce_to is None or data[:2].tobytes() != b"\xff\xd8":
        return cv2.IMREAD_COLOR
    frame = first_frame(data[:_HEADER_BYTES].tobytes())
    if frame is None:
        return cv2.IMREAD_COLOR
    h, w = reduce_to
    for k, flag in _REDUCED:
        if -(-frame.height // k) >= h and -(-frame.width // k) >= w:
            return flag
    return cv2.IMREAD_COLOR


#: Bytes of a JPEG searched for its frame header (APPn segments with ICC profiles or thumbnails come first).
_HEADER_BYTES = 1 << 20


def _from_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise PipelineError(f"image array has dtype {image.dtype}; expected uint8 (0-255)",
                            hint="convert with np.clip(x, 0, 255).astype(np.uint8)")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise PipelineError(f"image array has shape {list(image.shape)}; expected HxW, HxWx3 (BGR) or HxWx4 (BGRA)")


def preprocess_image(image: ImageInput, spec: ImagePreprocess, out: np.ndarray | None = None) -> np.ndarray:
    """One image -> one model input *without* the batch axis (CHW or HWC per ``spec.layout``), written
    into ``out`` when given (a batch's row: no copy per image)."""
    bgr = decode_image(image, spec.resize if spec.decode == "reduced" else None)
    if bgr.shape[0] * bgr.shape[1] > MAX_PIXELS or min(bgr.shape[:2]) < 1:
        raise PipelineError(f"image of {bgr.shape[1]}x{bgr.shape[0]} pixels is outside the supported size")
    planar_float = spec.layout == "nchw" and spec.dtype != "uint8"
    order = (0, 1, 2)
    if spec.color == "rgb" and planar_float:
        img, order = bgr, (2, 1, 0)  # planes are read in RGB order below: no colour conversion pass
    elif spec.color == "rgb":
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    elif spec.color == "gray":
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[:, :, None]
    else:
        img = bgr
    h, w = spec.resize
    img = cv2.resize(img, (w, h), interpolation=_INTERPOLATION[spec.interpolation])
    if img.ndim == 2:
        img = img[:, :, None]
    if spec.crop:
        ch, cw = spec.crop
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img[top : top + ch, left : left + cw]
    if spec.dtype == "uint8":
        result = np.ascontiguousarray(img.transpose(2, 0, 1) if spec.layout == "nchw" else img)
        if out is None:
            return result
        out[...] = result
        return out
    return _normalize(img, spec, out, order)


def _normalize(img: np.ndarray, spec: ImagePreprocess, out: np.ndarray | None = None,
               order: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """``(x - mean) / std`` per channel, written straight into the output layout (into ``out`` when given);
    output channel ``c`` is ``img``'s channel ``order[c]`` (planar outputs only).

    Channel by channel over contiguous planes: about 3x faster than broadcasting over the
    interleaved HxWx3 array and transposing, with the same float32 results. Planar outputs are
    computed by OpenCV's vector kernels (the same float32 subtraction and division as numpy's,
    bit for bit; 2.7x faster again on 224x224x3).
    """
    h, w, channels = img.shape
    planar = spec.layout == "nchw"
    float32 = spec.dtype == "float32"
    if out is None or not float32:
        target = np.empty((channels, h, w) if planar else (h, w, channels), np.float32)
    else:
        target = out
    if planar:
        planes = cv2.split(img) if channels > 1 else [img[:, :, 0]]
        for c in range(channels):
            plane = np.ascontiguousarray(planes[order[c]])
            # a float second operand is a scalar to OpenCV (its stubs only list arrays)
            cv2.subtract(plane, float(np.float32(spec.mean[c])), dst=target[c],  # type: ignore[call-overload]
                         dtype=cv2.CV_32F)
            cv2.divide(target[c], float(np.float32(spec.std[c])), dst=target[c])  # type: ignore[call-overload]
    else:
        for c in range(channels):
            plane = target[:, :, c]
            np.subtract(img[:, :, c], np.float32(spec.mean[c]), out=plane, dtype=np.float32)
            np.divide(plane, np.float32(spec.std[c]), out=plane)
    if float32:
        return target
    if out is None:
        return target.astype(spec.dtype)
    out[...] = target
    return out


def preprocess_images(images: Sequence[ImageInput], spec: ImagePreprocess) -> np.ndarray:
    """A batch of images -> one input tensor, each image preprocessed straight into its row."""
    if len(images) == 0:
        raise PipelineError("no images given; expected at least one")
    first = preprocess_image(images[0], spec)
    batch = np.empty((len(images), *first.shape), first.dtype)
    batch[0] = first
    for i, image in enumerate(images[1:], start=1):
        preprocess_image(image, spec, out=batch[i])
    return batch
