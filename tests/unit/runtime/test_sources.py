"""Frame sources on real OpenCV: a video file, a watched image folder, a live MJPEG-over-HTTP camera
on loopback that drops and comes back, frame policies and rate limits, and ``open_source``."""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

import runtime.sources as sources
from edge_sdk.errors import SourceError
from runtime.frame import Frame, Source, SourceState
from runtime.sources import CaptureSource, FolderSource, PolicySource, RateGate, open_source

STEP = 8  # frame k is filled with k * STEP, so lossy codecs still give k back


def number(image: np.ndarray) -> int:
    return int(round(float(image.mean()) / STEP))


def write_video(path: Path, frames: int = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (64, 48))
    assert writer.isOpened(), "this OpenCV cannot write MJPG .avi"
    for k in range(frames):
        writer.write(np.full((48, 64, 3), k * STEP, np.uint8))
    writer.release()
    return path


def write_png(path: Path, k: int) -> Path:
    """A lossless image whose pixels all hold ``k``."""
    ok, data = cv2.imencode(".png", np.full((12, 16, 3), k, np.uint8))
    assert ok
    data.tofile(str(path))
    return path


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Reader:
    """Reads a source in a thread until None (or an error), collecting frames."""

    def __init__(self, source: Source, per_frame: float = 0.0) -> None:
        self.source, self.per_frame = source, per_frame
        self.frames: list[Frame] = []
        self.error: Exception | None = None
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (frame := self.source.read()) is not None:
                self.frames.append(frame)
                time.sleep(self.per_frame)
        except Exception as exc:  # handed to the test
            self.error = exc
        finally:
            self.ended.set()

    def join(self, timeout: float = 2.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "read() did not return"


# -- a live camera on loopback: MJPEG over HTTP, as IP cameras serve it ------------------------------


class _MjpegHandler(http.server.BaseHTTPRequestHandler):
    server: _MjpegHTTPServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        k = 0
        try:
            while not self.server.closing.is_set():
                if k == self.server.stall_after:  # frozen camera: no more frames, connection kept open
                    self.server.closing.wait()
                    break
                image = np.zeros((48, 64, 3), np.uint8)
                image[..., 0] = 60 * self.server.generation  # blue: which server run
                image[..., 1] = k % 32 * STEP  # green: frame counter
                data = cv2.imencode(".jpg", image)[1].tobytes()
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                 + data + b"\r\n")
                k += 1
                time.sleep(0.01)
        except OSError:  # the client went away
            pass


class _MjpegHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, generation: int, stall_after: int | None) -> None:
        super().__init__(("127.0.0.1", port), _MjpegHandler)
        self.generation = generation
        self.stall_after = stall_after
        self.closing = threading.Event()


class MjpegCamera:
    """Start, stop (dropping every connection) and restart on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.generation = 0
        self._server: _MjpegHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, stall_after: int | None = None) -> None:
        self.generation += 1
        self._server = _MjpegHTTPServer(self.port, self.generation, stall_after)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.closing.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(2)
            self._server = None

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}/line1/cam.mjpg"


@pytest.fixture
def camera() -> Iterator[MjpegCamera]:
    cam = MjpegCamera()
    cam.start()
    yield cam
    cam.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAST: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.2, "open_timeout": 1.0, "stall_timeout": 1.0}


# -- video files -------------------------------------------------------------------------------------------


def test_video_file_gives_every_frame_in_order_then_ends(tmp_path: Path) -> None:
    src = CaptureSource(write_video(tmp_path / "line.avi"))
    assert not src.live and src.id == "line.avi" and src.state.status == "open"
    frames = []
    while (frame := src.read()) is not None:
        frames.append(frame)
    assert [f.index for f in frames] == list(range(30))
    assert [number(f.image) for f in frames] == list(range(30))
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 and f.source_id == "line.avi"
               for f in frames)
    assert src.read() is None
    assert src.state == SourceState("line.avi", "ended", frames=30) and not src.is_open
    src.release()
    assert src.state.status == "ended"


def test_missing_or_wrong_video_file_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"video file '.*nope\.avi' does not exist.*live=True"):
        CaptureSource(tmp_path / "nope.avi")
    with pytest.raises(SourceError, match="is a folder, not a video.*FolderSource"):
        CaptureSource(tmp_path)
    (tmp_path / "notes.avi").write_text("not a video")
    with pytest.raises(SourceError, match=r"OpenCV cannot open '.*notes\.avi'"):
        CaptureSource(tmp_path / "notes.avi")


def test_a_file_forced_live_waits_for_it_and_loops(tmp_path: Path) -> None:
    """live=True on a file: missing at first is a reconnect, and its end is a reconnect too."""
    path = tmp_path / "later.avi"
    src = CaptureSource(path, live=True, **FAST)
    reader = Reader(src)
    assert wait_for(lambda: src.state.status == "reconnecting")
    write_video(tmp_path / "tmp.avi", frames=5).rename(path)
    assert wait_for(lambda: len(reader.frames) >= 12)  # 5 frames, reopened at the end, and again
    src.release()
    reader.join()
    assert [number(f.image) for f in reader.frames[:12]] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert src.state.reconnects >= 3 and src.state.status == "released"


# -- image folders -----------------------------------------------------------------------------------------


def test_folder_reads_images_by_name_skips_undecodable_ones_and_ends(tmp_path: Path) -> None:
    for k in (3, 1, 2):
        write_png(tmp_path / f"img{k}.png", k)
    write_png(tmp_path / "img4.PNG", 4)
    (tmp_path / "img0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "readme.txt").write_text("not an image")
    src = FolderSource(tmp_path)
    frames = []
    while (frame := src.read()) is not None:
        frames.append(frame)
    assert [(f.name, f.index, int(f.image.max())) for f in frames] == [
        ("img1.png", 0, 1), ("img2.png", 1, 2), ("img3.png", 2, 3), ("img4.PNG", 3, 4)]
    state = src.state
    assert (state.status, state.frames, state.dropped) == ("ended", 4, 1)
    assert "img0.jpg" in state.last_error


def test_watched_folder_delivers_new_files_in_order_and_release_ends_the_read(tmp_path: Path) -> None:
    write_png(tmp_path / "a00.png", 0)
    src = FolderSource(tmp_path, watch=True, poll_interval=0.05, settle_timeout=0.3)
    reader = Reader(src)
    assert wait_for(lambda: len(reader.frames) == 1)
    for k in (2, 1):  # one poll sees both; they come in name order
        write_png(tmp_path / f"tmp{k}", k).rename(tmp_path / f"a{k:02d}.png")
    assert wait_for(lambda: len(reader.frames) == 3)
    (tmp_path / "a03.png").write_bytes(b"garbage, not a png")
    slow = cv2.imencode(".png", np.full((12, 16, 3), 4, np.uint8))[1].tobytes()
    with open(tmp_path / "a04.png", "wb") as f:  # written slowly: must not be read half-way
        for i in range(0, len(slow), 16):
            f.write(slow[i:i + 16])
            f.flush()
            time.sleep(0.01)
    write_png(tmp_path / "a05.png", 5)
    assert wait_for(lambda: len(reader.frames) == 5)
    assert wait_for(lambda: src.state.dropped == 1)  # a03.png, once unchanged for the settle timeout
    assert not reader.ended.is_set()
    src.release()
    reader.join(timeout=1.0)
    assert reader.error is None
    assert [f.name for f in reader.frames] == ["a00.png", "a01.png", "a02.png", "a04.png", "a05.png"]
    assert [int(f.image.max()) for f in reader.frames] == [0, 1, 2, 4, 5]
    assert [f.index for f in reader.frames] == list(range(5))
    state = src.state
    assert (state.status, state.frames, state.dropped) == ("released", 5, 1) and "a03.png" in state.last_error


def test_watched_folder_reads_a_name_again_once_it_was_deleted_and_rewritten(tmp_path: Path) -> None:
    write_png(tmp_path / "shot.png", 1)
    src = FolderSource(tmp_path, watch=True, poll_interval=0.03)
    reader = Reader(src)
    assert wait_for(lambda: len(reader.frames) == 1)
    (tmp_path / "shot.png").unlink()
    time.sleep(0.1)  # a few polls see it gone
    write_png(tmp_path / "tmp", 2).rename(tmp_path / "shot.png")
    assert wait_for(lambda: len(reader.frames) == 2)
    src.release()
    reader.join()
    assert [(f.name, int(f.image.max())) for f in reader.frames] == [("shot.png", 1), ("shot.png", 2)]


def test_a_writer_that_pauses_mid_file_loses_no_image_and_empty_files_are_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A camera PC's writer that stalls for half a second (several polls) half-way through a file: the
    half-written file cannot be decoded, and is read again once complete. A 0-byte file is not read, and
    is logged as skipped once it stays empty; written later, it is read."""
    src = FolderSource(tmp_path, watch=True, poll_interval=0.05, settle_timeout=1.0)
    reader = Reader(src)
    images = {k: cv2.imencode(".png", np.random.default_rng(k).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
              for k in range(4)}
    for k, data in images.items():
        with open(tmp_path / f"part{k}.png", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.5)  # ten polls with the file unchanged and incomplete
            f.write(data[len(data) // 2:])
    (tmp_path / "empty.png").write_bytes(b"")
    assert wait_for(lambda: len(reader.frames) == 4, timeout=5)
    assert wait_for(lambda: src.state.dropped == 1, timeout=5)
    assert [f.name for f in reader.frames] == [f"part{k}.png" for k in range(4)]
    assert all(np.array_equal(f.image, cv2.imdecode(np.frombuffer(images[k], np.uint8), cv2.IMREAD_COLOR))
               for k, f in enumerate(reader.frames))
    assert "skipped empty.png: it is empty (0 bytes)" in src.state.last_error
    assert wait_for(lambda: "skipped empty.png" in caplog.text)  # logged just after it is counted
    write_png(tmp_path / "tmp", 9).rename(tmp_path / "empty.png")  # its writer comes back
    assert wait_for(lambda: len(reader.frames) == 5, timeout=5)
    src.release()
    reader.join()
    assert reader.frames[-1].name == "empty.png" and int(reader.frames[-1].image.max()) == 9


def test_a_looping_symlink_does_not_blind_the_folder_and_a_rename_over_is_a_new_image(tmp_path: Path) -> None:
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    write_png(tmp_path / "a.png", 1)
    assert [int(f.image.max()) for f in drain(FolderSource(tmp_path))] == [1]
    src = FolderSource(tmp_path, watch=True, poll_interval=0.03)
    reader = Reader(src)
    assert wait_for(lambda: len(reader.frames) == 1)
    for k in (2, 3):  # a camera PC publishing latest.png by os.replace, again and again
        write_png(tmp_path / "tmp", k).replace(tmp_path / "latest.png")
        assert wait_for(lambda: len(reader.frames) == k)
    src.release()
    reader.join()
    assert [(f.name, int(f.image.max())) for f in reader.frames] == [("a.png", 1), ("latest.png", 2),
                                                                    ("latest.png", 3)]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"image folder '.*missing' does not exist"):
        FolderSource(tmp_path / "missing")
    with pytest.raises(SourceError, match=r"poll_interval=0 is not valid; expected a positive number"):
        FolderSource(tmp_path, poll_interval=0)


# -- live streams -------------------------------------------------------------------------------------------


def test_live_http_stream_reconnects_after_the_camera_drops(camera: MjpegCamera) -> None:
    src = CaptureSource(camera.url(), **FAST)
    assert src.live and src.id == f"127.0.0.1:{camera.port}/line1/cam.mjpg"
    assert src.state.status == "connecting"
    reader = Reader(src)
    assert wait_for(lambda: len(reader.frames) >= 5)
    assert src.state.status == "open"
    camera.stop()
    assert wait_for(lambda: src.state.status == "reconnecting")
    before = len(reader.frames)
    time.sleep(0.3)  # a few refused reopen attempts
    assert src.state.reconnects >= 1 and "cannot open" in src.state.last_error
    camera.start()
    assert wait_for(lambda: len(reader.frames) >= before + 5)
    src.release()
    reader.join()
    assert reader.error is None
    state = src.state
    assert state.status == "released" and state.reconnects >= 2 and state.frames == len(reader.frames)
    blues = [int(f.image[..., 0].mean() + 30) // 60 for f in reader.frames]
    assert blues[:5] == [1] * 5 and blues[-5:] == [2] * 5 and blues == sorted(blues)
    assert [f.index for f in reader.frames] == list(range(len(reader.frames)))


def test_a_frozen_stream_is_reopened_after_the_stall_timeout() -> None:
    cam = MjpegCamera()
    cam.start(stall_after=4)  # every connection sends 4 frames, then nothing
    src = CaptureSource(cam.url(), **{**FAST, "stall_timeout": 0.3})
    try:
        start = time.monotonic()
        frames = [src.read() for _ in range(10)]
        elapsed = time.monotonic() - start
    finally:
        src.release()
        cam.stop()
    assert [f.index for f in frames if f is not None] == list(range(10))
    assert src.state.reconnects == 2 and src.state.stalls == 2 and src.state.last_error == ""  # recovered
    assert 0.6 <= elapsed < 2.0  # two stalls of one stall timeout each


def test_too_many_reconnects_fail_without_showing_the_password() -> None:
    url = f"http://admin:s3cret@127.0.0.1:{closed_port()}/cam"
    src = CaptureSource(url, max_reconnects=2, **FAST)
    start = time.monotonic()
    with pytest.raises(SourceError) as caught:
        src.read()
    assert time.monotonic() - start < 1.5
    message = str(caught.value)
    assert "s3cret" not in message and "admin" not in message
    assert src.id in message and "failed after 2 reconnect attempts" in message and "cannot open" in message
    assert "max_reconnects" in message  # the hint
    state = src.state
    assert (state.status, state.reconnects) == ("failed", 2) and "s3cret" not in state.last_error
    assert "s3cret" not in repr(src) and not src.is_open
    with pytest.raises(SourceError):  # stays failed
        src.read()


def test_release_from_another_thread_ends_a_read_waiting_to_reconnect() -> None:
    src = CaptureSource(f"rtsp://127.0.0.1:{closed_port()}/stream", backoff_initial=5.0)
    reader = Reader(src)
    assert wait_for(lambda: src.state.status == "reconnecting")
    start = time.monotonic()
    src.release()
    reader.join(timeout=1.0)
    assert time.monotonic() - start < 0.5 and reader.frames == [] and reader.error is None
    assert src.state.status == "released"


# -- policies and rate --------------------------------------------------------------------------------------


@pytest.fixture
def fifty_images(tmp_path: Path) -> Path:
    for k in range(50):
        write_png(tmp_path / f"{k:03d}.png", k)
    return tmp_path


def test_latest_policy_drops_stale_frames_for_a_slow_consumer(fifty_images: Path) -> None:
    src = PolicySource(FolderSource(fifty_images), policy="latest")
    frames = []
    while (frame := src.read()) is not None:
        frames.append(frame)
        time.sleep(0.02)
    indices = [f.index for f in frames]
    state = src.state
    assert 1 <= len(frames) < 50 and state.dropped > 0
    assert len(frames) + state.dropped == 50 and state.frames == len(frames)
    assert indices == sorted(set(indices)) and indices[-1] == 49  # the newest is never lost
    assert all(int(f.image.max()) == f.index for f in frames)
    src.release()
    assert state.status == "ended" and src.state.status == "released"
    assert not any(t.name.startswith("edge-sdk-source-") for t in threading.enumerate())


def test_all_policy_with_max_fps_drops_frames_that_come_too_fast(tmp_path: Path) -> None:
    src = open_source(write_video(tmp_path / "fast.avi"), max_fps=1.0)  # 30 frames read in milliseconds
    assert isinstance(src, PolicySource)
    frames = []
    while (frame := src.read()) is not None:
        frames.append(frame)
    assert [f.index for f in frames] == [0] and src.state.dropped == 29 and src.state.frames == 1


class Timed:
    """A source of blank frames with given timestamps (a clock the rate tests control)."""

    def __init__(self, timestamps: list[float]) -> None:
        self.id, self._times, self._index = "timed", timestamps, 0

    def read(self) -> Frame | None:
        if self._index == len(self._times):
            return None
        frame = Frame(np.zeros((2, 2, 3), np.uint8), self.id, self._index, self._times[self._index])
        self._index += 1
        return frame

    def release(self) -> None:
        pass

    @property
    def is_open(self) -> bool:
        return self._index < len(self._times)

    @property
    def state(self) -> SourceState:
        return SourceState(self.id, "open" if self.is_open else "ended", frames=self._index)


def drain(src: Source) -> list[Frame]:
    out = []
    while (frame := src.read()) is not None:
        out.append(frame)
    return out


def test_max_fps_thins_a_fast_stream_to_the_rate() -> None:
    src = PolicySource(Timed([1000 + k / 100 for k in range(100)]), max_fps=10)  # 100 fps for a second
    frames = drain(src)
    times = [f.timestamp for f in frames]
    assert 10 <= len(frames) <= 11 and len(frames) + src.state.dropped == 100
    assert min(np.diff(times)) >= 0.09 - 1e-9 and frames[0].index == 0


def test_max_fps_at_the_camera_rate_loses_nothing_to_jitter() -> None:
    jitter = np.random.default_rng(0).uniform(-0.002, 0.002, 90)
    src = PolicySource(Timed([50 + k / 30 + j for k, j in enumerate(jitter)]), max_fps=30)
    assert len(drain(src)) == 90 and src.state.dropped == 0


def test_rate_gate_survives_the_clock_going_back() -> None:
    gate = RateGate(5)
    assert [gate.admit(t) for t in (100.0, 100.1, 100.2, 50.0, 50.1, 50.2)] == [True, False, True, True,
                                                                                  False, True]
    assert all(RateGate(None).admit(t) for t in (1.0, 1.0, 1.0))


def test_latest_policy_hands_on_the_inner_failure() -> None:
    src = open_source(f"http://127.0.0.1:{closed_port()}/cam", policy="latest", max_reconnects=0, **FAST)
    with pytest.raises(SourceError, match="failed after 0 reconnect attempts"):
        src.read()
    src.release()
    assert src.state.status == "released"


# -- open_source ------------------------------------------------------------------------------------------


def test_open_source_dispatches_on_the_spec(tmp_path: Path) -> None:
    video = write_video(tmp_path / "part.avi", frames=2)
    (tmp_path / "images").mkdir()
    cam = open_source(0)
    assert isinstance(cam, CaptureSource) and cam.id == "cam0" and cam.live and cam.state.status == "connecting"
    cam.release()
    assert open_source("2", source_id="left").id == "left"
    assert isinstance(open_source("1"), CaptureSource) and open_source("1").id == "cam1"
    rtsp = open_source("rtsp://op:hunter2@10.0.0.5:554/line1/main/?token=abc")
    assert isinstance(rtsp, CaptureSource) and rtsp.id == "10.0.0.5:554/line1/main"
    assert "hunter2" not in repr(rtsp) and "token" not in repr(rtsp)
    assert open_source("https://cam.local/snap.mjpg").id == "cam.local/snap.mjpg"
    folder = open_source(tmp_path / "images", watch=True, poll_interval=0.1)
    assert isinstance(folder, FolderSource) and folder.id == "images"
    file = open_source(str(video))
    assert isinstance(file, CaptureSource) and not file.live and file.id == "part.avi"
    with pytest.raises(SourceError, match=r"OpenCV cannot open 'http://127\.0\.0\.1:\d+/rec\.mp4' as a video"):
        open_source(f"http://u:pw@127.0.0.1:{closed_port()}/rec.mp4", live=False, **FAST)  # finite: opened now
    waiting = open_source(tmp_path / "tomorrow.avi", live=True)
    assert isinstance(waiting, CaptureSource) and waiting.live and waiting.id == "tomorrow.avi"
    latest = open_source(video, policy="latest", source_id="press-3")
    assert isinstance(latest, PolicySource) and latest.id == "press-3" and isinstance(latest.inner, CaptureSource)
    delivered = drain(latest)
    assert delivered[-1].index == 1 and latest.state.frames + latest.state.dropped == 2


def test_open_source_gstreamer_pipeline() -> None:
    pipeline = "videotestsrc num-buffers=3 ! videoconvert ! appsink"
    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        src = open_source(pipeline)
        assert isinstance(src, CaptureSource) and src.id == "gst-videotestsrc" and src.live
        src.release()
    else:
        with pytest.raises(SourceError, match="GStreamer backend.*WITH_GSTREAMER"):
            open_source(pipeline)


@pytest.mark.parametrize("spec, message", [
    ("/no/such/place.avi", r"'/no/such/place\.avi' does not exist or is not a form.*a camera index"),
    ("ftp://bob:pw123@host/x.avi", r"'ftp://host/x\.avi' does not exist"),
    (-1, "camera index -1 is negative"),
    (True, "has type bool"),
    (2.5, "has type float"),
])
def test_open_source_refuses_what_it_cannot_open(spec: object, message: str) -> None:
    with pytest.raises(SourceError, match=message) as caught:
        open_source(spec)  # type: ignore[arg-type]
    assert "pw123" not in str(caught.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "newest"}, "frame policy 'newest' is not known; expected one of all, latest"),
    ({"max_fps": 0}, r"max_fps=0 is not valid; expected a positive number or None"),
    ({"max_fps": -5.0}, r"max_fps=-5.0 is not valid"),
    ({"watch": True}, "watch=True applies to image folders"),
    ({"poll_interval": 1}, r"option\(s\) poll_interval do not apply.*CaptureSource"),
    ({"backoff_initial": 0}, "backoff_initial=0 is not valid"),
    ({"max_reconnects": -1}, "max_reconnects=-1 is not valid"),
])
def test_open_source_validates_its_options(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(write_video(tmp_path / "v.avi", frames=1), **kwargs)


def test_public_names() -> None:
    assert all(hasattr(sources, name) for name in sources.__all__)
    for src in (CaptureSource, FolderSource, PolicySource):
        assert {"read", "release", "is_open", "state"} <= set(dir(src))


def test_realtime_replays_a_file_at_its_recorded_rate(tmp_path: Path) -> None:
    path = tmp_path / "rec.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 50.0, (32, 24))
    for k in range(10):
        writer.write(np.full((24, 32, 3), k * STEP, np.uint8))
    writer.release()
    source = open_source(path, realtime=True)
    started = time.monotonic()
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    elapsed = time.monotonic() - started
    assert [f.index for f in frames] == list(range(10))
    assert elapsed >= 9 / 50 * 0.95  # ten frames at 50 fps take 0.18 s, not the microseconds of a file read
    with pytest.raises(SourceError, match="realtime=True replays video files"):
        open_source(tmp_path, realtime=True)
