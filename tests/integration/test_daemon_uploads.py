"""Uploads that lie about their size or their cost, against the real daemon and real OpenCV: a JPEG
that hides its frame size behind a fill byte and a fake frame header in APP11, a 16-bit PNG cheap to
send and costly to decode; and the decode-bytes estimate held against the memory OpenCV really takes."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

from edge_sdk.daemon.uploads import read_header
from tests.integration.test_daemon import BGR, DaemonProcess, call, png, write_config
from tests.services import free_port
from tests.unit.edge_sdk.daemon.test_kserve_uploads import hide_size, jpeg_with_size, png_chunk, with_png_size


@pytest.fixture
def daemon(tmp_path: Path, image_package: Path) -> Iterator[DaemonProcess]:
    port = free_port()
    d = DaemonProcess(write_config(tmp_path, port=port, models={"colors": image_package}), port).start()
    yield d
    d.kill()


def test_the_daemon_refuses_uploads_that_hide_their_size_or_cost(daemon: DaemonProcess) -> None:
    ok, jpeg = cv2.imencode(".jpg", np.full((24, 24, 3), BGR["red"], np.uint8))
    predict = "/v1/models/colors/predict"
    status, body, _ = call(daemon, "POST", predict, hide_size(jpeg.tobytes()), "image/jpeg")
    assert status == 200 and body["predictions"][0]["label"] == "red"  # fill byte and APP11 are legal
    status, body, _ = call(daemon, "POST", predict, hide_size(jpeg_with_size(jpeg.tobytes(), 8000, 8000)),
                           "image/jpeg")
    assert status == 413 and "declares 8000x8000 pixels" in body["error"]
    ok, deep = cv2.imencode(".png", np.zeros((24, 24, 3), np.uint16))
    status, body, _ = call(daemon, "POST", predict, with_png_size(deep.tobytes(), 6000, 6000), "image/png")
    assert status == 413 and "(6000x6000, 16-bit RGB) needs" in body["error"] and "limit per decode" in body["error"]
    assert "8-bit" in body["hint"]
    status, body, _ = call(daemon, "POST", predict, png("green"), "image/png")
    assert status == 200 and body["predictions"][0]["label"] == "green"


MEASURE = r"""
import ctypes, sys
import cv2, numpy as np

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

data, warm = (open(path, "rb").read() for path in sys.argv[1:3])
cv2.imdecode(np.frombuffer(warm, np.uint8), cv2.IMREAD_COLOR)  # the codec's code and tables, loaded once
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak (VmHWM) restarts from here
before = status("VmRSS")
image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
assert image is not None and image.shape[2] == 3, "the image did not decode"
print(status("VmHWM") - before)
"""


def animated(still: bytes) -> bytes:
    """``still`` as the first frame of a two-frame APNG (the second repeats it)."""
    chunks, i = [], 8
    while i < len(still):
        (length,), kind = struct.unpack(">I", still[i:i + 4]), still[i + 4:i + 8]
        chunks.append((kind, still[i + 8:i + 8 + length]))
        i += 12 + length
    ihdr, idat = chunks[0][1], b"".join(body for kind, body in chunks if kind == b"IDAT")
    width, height = struct.unpack(">II", ihdr[:8])

    def fctl(seq: int) -> bytes:
        return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, 1, 10, 0, 0))

    return (still[:8] + png_chunk(b"IHDR", ihdr) + png_chunk(b"acTL", struct.pack(">II", 2, 0)) + fctl(0)
            + png_chunk(b"IDAT", idat) + fctl(1) + png_chunk(b"fdAT", struct.pack(">I", 2) + idat)
            + png_chunk(b"IEND", b""))


def encode(ext: str, channels: int, dtype: Any, params: list[int], height: int, width: int) -> bytes:
    image = np.zeros((height, width, channels), dtype)
    image[::7, ::5] = 200  # every page of every buffer gets written
    ok, data = cv2.imencode(ext, image, params)
    assert ok
    return data.tobytes()


PROGRESSIVE = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
FULL_CHROMA = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
CASES: dict[str, tuple[Callable[[int, int], bytes], str]] = {
    "png 8-bit gray": (lambda h, w: encode(".png", 1, np.uint8, [], h, w), ".png"),
    "png 16-bit RGBA": (lambda h, w: encode(".png", 4, np.uint16, [], h, w), ".png"),
    "apng 8-bit RGB": (lambda h, w: animated(encode(".png", 3, np.uint8, [], h, w)), ".png"),
    "apng 16-bit RGBA": (lambda h, w: animated(encode(".png", 4, np.uint16, [], h, w)), ".png"),
    "jpeg baseline": (lambda h, w: encode(".jpg", 3, np.uint8, [], h, w), ".jpg"),
    "jpeg progressive 4:2:0": (lambda h, w: encode(".jpg", 3, np.uint8, PROGRESSIVE, h, w), ".jpg"),
    "jpeg progressive 4:4:4": (lambda h, w: encode(".jpg", 3, np.uint8, PROGRESSIVE + FULL_CHROMA, h, w), ".jpg"),
    "bmp 32-bit": (lambda h, w: encode(".bmp", 4, np.uint8, [], h, w), ".bmp"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_decode_bytes_bound_the_memory_opencv_takes(case: str, tmp_path: Path) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("measuring a decode's peak memory needs Linux's /proc/self/clear_refs")
    make, _ = CASES[case]
    data, warm = tmp_path / "image", tmp_path / "warm"
    data.write_bytes(make(2000, 2500))
    warm.write_bytes(make(16, 16))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(data), str(warm)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak, estimate = int(done.stdout.split()[-1]), read_header(data.read_bytes()).decode_bytes
    assert estimate >= peak, f"{case}: OpenCV took {peak} bytes, the header estimate is {estimate}"

