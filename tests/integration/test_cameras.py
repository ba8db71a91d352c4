"""Cameras as a line runs them, against a real RTSP server (GStreamer's gst-rtsp-server) on loopback:
a hung server or a frozen picture is reported "stalled" within the stall timeout and recovered, a
slow consumer never sees stale frames under "all", FFmpeg's failures get their real reason, and
passwords with raw ``@``, ``/`` and spaces both work and never leak."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from edge_sdk.errors import SourceError
from runtime.frame import Frame
from runtime.sources import CaptureSource, open_source
from tests.rtsp import RtspServer, require_rtsp
from tests.services import free_port

FAST: dict[str, Any] = {"backoff_initial": 0.1, "backoff_max": 0.5, "open_timeout": 3.0}


def wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition`` held, or None if it did not within ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.02)
    return time.monotonic() - start


class Reader:
    """Reads a source in a thread, keeping each frame and its age when read."""

    def __init__(self, source: CaptureSource, per_frame: float = 0.0) -> None:
        self.source, self.per_frame = source, per_frame
        self.frames: list[Frame] = []
        self.ages: list[float] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (frame := self.source.read()) is not None:
                self.ages.append(time.time() - frame.timestamp)
                self.frames.append(frame)
                time.sleep(self.per_frame)
        except Exception as exc:  # handed to the test
            self.error = exc

    def stop(self) -> None:
        self.source.release()
        self.thread.join(5)
        assert not self.thread.is_alive(), "read() did not return after release()"


@pytest.fixture
def rtsp(tmp_path: Path) -> Iterator[RtspServer]:
    require_rtsp()
    with RtspServer(tmp_path / "rtsp", fps=30) as server:
        yield server


def test_a_hung_server_is_reported_stalled_within_the_stall_timeout_and_recovers(rtsp: RtspServer) -> None:
    source = CaptureSource(rtsp.url("/live"), stall_timeout=1.0, **FAST)
    reader = Reader(source)
    try:
        assert wait_for(lambda: len(reader.frames) >= 10, 15) is not None
        assert source.state.status == "open"
        rtsp.freeze()  # the connection stays up, nothing comes: a pulled cable, a hung server
        frozen_at = len(reader.frames)
        detected = wait_for(lambda: source.state.status == "stalled", 5)
        assert detected is not None and detected <= 1.0 + 0.5, f"stall seen after {detected} s"
        assert "no new frame" in source.state.last_error and source.state.stalls >= 1
        assert len(reader.frames) <= frozen_at + 15  # at most what was on the wire when it froze
        stalled_at = len(reader.frames)
        time.sleep(1.5)
        assert len(reader.frames) == stalled_at  # nothing passed off as fresh while frozen
        rtsp.thaw()
        assert wait_for(lambda: len(reader.frames) >= frozen_at + 20, 20) is not None
        state = source.state
        assert state.status == "open" and state.last_error == "" and state.reconnects >= 1
        assert max(reader.ages[-10:]) < 0.5  # the frames after recovery are live ones
    finally:
        rtsp.thaw()
        reader.stop()
    assert reader.error is None


def test_the_same_frame_over_and_over_is_a_stall(rtsp: RtspServer) -> None:
    source = CaptureSource(rtsp.url("/frozen"), stall_timeout=1.0, **FAST)
    reader = Reader(source)
    try:
        assert wait_for(lambda: len(reader.frames) >= 1, 15) is not None
        first = time.monotonic()
        assert wait_for(lambda: source.state.stalls >= 1, 5) is not None
        assert time.monotonic() - first <= 1.0 + 0.5
        assert "the same frame" in source.state.last_error
        held = len(reader.frames)
        time.sleep(3.0)  # reconnects that find the same picture again: still stalled, nothing delivered
        assert len(reader.frames) == held and source.state.status == "stalled"
    finally:
        reader.stop()
    live = CaptureSource(rtsp.url("/live"), stall_timeout=1.0, **FAST)  # a moving picture is never one
    reader = Reader(live)
    try:
        assert wait_for(lambda: len(reader.frames) >= 60, 20) is not None
        assert live.state.stalls == 0 and live.state.status == "open"
    finally:
        reader.stop()


def test_a_server_that_restarts_is_back_within_the_backoff(rtsp: RtspServer) -> None:
    source = CaptureSource(rtsp.url("/live"), **FAST)
    reader = Reader(source)
    try:
        assert wait_for(lambda: len(reader.frames) >= 5, 15) is not None
        rtsp.stop()
        assert wait_for(lambda: source.state.status in ("reconnecting", "stalled"), 5) is not None
        assert wait_for(lambda: "connection refused" in source.state.last_error, 5) is not None
        time.sleep(1.0)
        rtsp.start()
        back = len(reader.frames)
        recovered = wait_for(lambda: len(reader.frames) > back, 15)
        assert recovered is not None and recovered < 0.5 + 3.0  # backoff_max, then an RTSP open
        assert wait_for(lambda: source.state.status == "open" and source.state.last_error == "", 2) is not None
    finally:
        reader.stop()


def test_a_slow_consumer_under_all_gets_fresh_frames_and_counts_the_dropped(rtsp: RtspServer) -> None:
    source = open_source(rtsp.url("/live"), policy="all", buffer=6, **FAST)
    assert isinstance(source, CaptureSource)
    reader = Reader(source, per_frame=0.1)  # 10 fps against a 30 fps camera
    try:
        assert wait_for(lambda: len(reader.frames) >= 30, 20) is not None
    finally:
        reader.stop()
    ages = reader.ages[10:]
    assert max(ages) < 6 / 30 + 0.1 + 0.3, f"frames up to {max(ages):.2f} s old"  # the buffer, one read, slack
    assert source.state.dropped > 30
    indices = [f.index for f in reader.frames]
    assert indices == sorted(indices) and indices[-1] - indices[0] > len(indices)  # gaps: what was dropped


def test_failures_say_why(rtsp: RtspServer, tmp_path: Path) -> None:
    cases = {
        rtsp.url("/no-such-stream"): "has no stream at /no-such-stream (404 Not Found)",
        f"rtsp://127.0.0.1:{free_port()}/live": "connection refused by 127.0.0.1:",
        "rtsp://camera-7.invalid/live": "cannot be resolved",
    }
    for url, reason in cases.items():
        source = CaptureSource(url, max_reconnects=0, **FAST)
        with pytest.raises(SourceError) as caught:
            source.read()
        assert reason in str(caught.value), str(caught.value)
        assert reason in source.state.last_error


def test_credentials_with_raw_at_slash_and_space_work_and_never_leak(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    require_rtsp()
    password = "p@ss/w rd:7"
    with RtspServer(tmp_path / "rtsp", fps=30, user="operator", password=password) as server:
        host = f"127.0.0.1:{server.port}"
        caplog.set_level(logging.DEBUG)
        good = CaptureSource(f"rtsp://operator:{password}@{host}/live", **FAST)
        reader = Reader(good)
        try:
            assert wait_for(lambda: len(reader.frames) >= 5, 15) is not None, good.state.last_error
        finally:
            reader.stop()
        assert good.id == f"{host}/live"
        wrong = CaptureSource(f"rtsp://operator:not-{password}@{host}/live", max_reconnects=0, **FAST)
        with pytest.raises(SourceError) as caught:
            wrong.read()
        assert "refused the user name and password (401 Unauthorized)" in str(caught.value)
        anonymous = CaptureSource(f"rtsp://{host}/live", max_reconnects=0, **FAST)
        with pytest.raises(SourceError, match="needs a user name and password"):
            anonymous.read()
        seen = [good.id, repr(good), str(good.state), str(caught.value), wrong.id, repr(wrong), str(wrong.state),
                caplog.text]
        for secret in ("p@ss", "w rd", "ss/w", password):
            assert not any(secret in text for text in seen), secret


def test_an_open_that_hangs_is_abandoned_and_the_source_still_fails_cleanly(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.fifo"  # opening a FIFO with no writer blocks inside OpenCV, like a hung pipeline
    os.mkfifo(fifo)
    source = CaptureSource(fifo, live=True, open_timeout=0.2, backoff_initial=0.05, backoff_max=0.05)
    try:
        with pytest.raises(SourceError) as caught:
            source.read()
        message = str(caught.value)
        assert "OpenCV calls hang" in message and "did not return within" in message
        assert source.state.status == "failed"
    finally:
        source.release()
        for _ in range(20):  # let the abandoned opens return (a writer comes and goes), so their threads end
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader left
                pass
            time.sleep(0.05)


GST_SCRIPT = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from runtime.sources import open_source
from edge_sdk.errors import SourceError
url, pid = sys.argv[2], int(sys.argv[3])
out = {}
source = open_source("videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 ! videoconvert "
                     "! appsink")
out["testsrc"] = [source.read().image.shape for _ in range(5)][-1]
source.release()
missing = open_source("nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink", max_reconnects=0)
try:
    missing.read()
except SourceError as exc:
    out["missing"] = str(exc)
camera = open_source(f"rtspsrc location={url} latency=0 ! rtpjpegdepay ! jpegdec ! videoconvert ! appsink",
                     stall_timeout=1.0, backoff_initial=0.1, backoff_max=0.5)
for _ in range(10):
    camera.read()
os.kill(pid, signal.SIGSTOP)
start = time.monotonic()
while camera.state.status != "stalled" and time.monotonic() - start < 10:
    time.sleep(0.01)
out["stalled_after_s"] = time.monotonic() - start
os.kill(pid, signal.SIGCONT)
start = time.monotonic()
frames = [camera.read() for _ in range(10)]
out["recovered_s"] = time.monotonic() - start
out["state"] = [camera.state.status, camera.state.stalls, camera.state.last_error]
camera.release()
print(json.dumps(out))
"""


def test_gstreamer_pipelines_with_a_gstreamer_opencv(rtsp: RtspServer) -> None:
    """Debian's python3-opencv (built with GStreamer, as JetPack's is), in the system Python with nothing else:
    a pipeline reads frames, a missing element (no Argus here) fails with the reason and how to check, and an
    rtspsrc pipeline whose server hangs is "stalled" within the stall timeout (the read blocks inside
    GStreamer: the watchdog says so) and recovers when the server does."""
    import json
    import subprocess

    from tests.rtsp import SYSTEM_PYTHON

    check = subprocess.run([SYSTEM_PYTHON, "-c", "import cv2, re; assert re.search(r'GStreamer:\\s*YES', "
                            "cv2.getBuildInformation())"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip("needs an OpenCV built with GStreamer in the system Python (apt-get install python3-opencv)")
    assert rtsp._process is not None
    done = subprocess.run([SYSTEM_PYTHON, "-c", GST_SCRIPT, str(Path(__file__).parents[2]), rtsp.url("/live"),
                           str(rtsp._process.pid)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["testsrc"] == [48, 64, 3]
    assert "cannot open GStreamer pipeline starting with 'nvarguscamerasrc'" in out["missing"]
    assert "gst-inspect-1.0 nvarguscamerasrc" in out["missing"]
    assert out["stalled_after_s"] <= 1.0 + 0.5
    assert out["recovered_s"] < 5 and out["state"][0] == "open" and out["state"][1] >= 1 and out["state"][2] == ""


def test_reconnects_leave_one_log_line_each_not_native_warnings(rtsp: RtspServer) -> None:
    """OpenCV's and FFmpeg's own warnings ("[rtsp @ 0x...] method DESCRIBE failed", "[ WARN:0@...]") would
    repeat on every reconnect; only the source's own lines reach stderr."""
    import subprocess
    import sys

    script = ("import logging, sys; logging.basicConfig(level=logging.WARNING); "
              "from runtime.sources import CaptureSource; "
              f"s = CaptureSource({rtsp.url('/no-such-stream')!r}, max_reconnects=3, backoff_initial=0.05, "
              "backoff_max=0.05)\ntry:\n    s.read()\nexcept Exception as e:\n    print('failed:', e)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")})
    assert "failed:" in done.stdout and "404 Not Found" in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if "@ 0x" in line or "WARN:" in line or "global " in line], done.stderr
    assert 1 <= len([line for line in lines if "no-such-stream" in line]) <= 3, done.stderr  # not one per attempt


def test_all_on_a_camera_faster_than_the_model_keeps_lag_bounded(rtsp: RtspServer, image_package: Path) -> None:
    """The whole stream, a 30 fps camera and a model at ~10 fps: under "all" the lag used to grow without limit
    (frames piled up in FFmpeg and the stream's queues) while the stats said ~3 s; now the source drops the
    oldest beyond its buffer, the stream's queues are short for a live source, and latency counts from capture."""
    from dataclasses import replace

    from runtime.batching import Batching
    from runtime.pipeline import Pipeline
    from runtime.stream import Stream
    from tests.unit.runtime.test_stream import SlowRunner

    with Pipeline.from_package(image_package, "onnxruntime-cpu", threads=1) as pipeline:
        slow = replace(pipeline.selection, runner=SlowRunner(pipeline.selection.runner, 0.1).activate())
        slow_pipeline = Pipeline(pipeline.manifest, slow, pipeline._encode, pipeline.package)
        source = open_source(rtsp.url("/live"), policy="all", buffer=6, **FAST)
        latencies = []
        started = time.monotonic()
        stream = Stream(slow_pipeline, [source], batching=Batching(max_batch=1))
        for result in stream:
            latencies.append(result.latency_ms)
            if time.monotonic() - started > 8:
                break
        stats = stream.stats()
    late = latencies[len(latencies) // 2:]
    bound_ms = (6 + 2 + 2 + 1) * 100 + 500  # the source's buffer and the stream's queues at 10 fps, and slack
    assert max(late) < bound_ms, f"lag {max(late):.0f} ms"
    assert late[-1] < late[0] + 500  # not growing
    assert stats.sources[0].dropped > 50 and stats.latency_p99_ms < bound_ms


def test_latest_on_a_real_camera_is_about_one_inference_old(rtsp: RtspServer, image_package: Path) -> None:
    """A 30 fps RTSP camera and a 100 ms model under "latest": each result comes from about the newest frame
    (one inference, plus up to a frame period of waiting for it), where frames used to wait in the stream's
    queues for several inferences (p50 ~10x one inference)."""
    from dataclasses import replace

    from runtime.batching import Batching
    from runtime.pipeline import Pipeline
    from runtime.stream import Stream
    from tests.unit.runtime.test_stream import SlowRunner

    with Pipeline.from_package(image_package, "onnxruntime-cpu", threads=1) as pipeline:
        slow = replace(pipeline.selection, runner=SlowRunner(pipeline.selection.runner, 0.1).activate())
        slow_pipeline = Pipeline(pipeline.manifest, slow, pipeline._encode, pipeline.package)
        source = open_source(rtsp.url("/live"), policy="latest", **FAST)
        latencies = []
        for result in Stream(slow_pipeline, [source], batching=Batching(max_batch=8, max_wait_ms=4)):
            latencies.append(result.latency_ms)
            if len(latencies) == 40:
                break
    p50 = float(np.median(latencies[10:]))
    assert 100 <= p50 < 100 + 34 + 4 + 60, f"latest: p50 {p50:.0f} ms for a 100 ms model"


def test_many_cameras_opened_at_once_all_come_up(rtsp: RtspServer) -> None:
    """OpenCV runs one FFmpeg open at a time per process: eight cameras started together wait for each
    other's opens. Waiting is no hang: none may be abandoned or failed, all are open soon."""
    sources = [CaptureSource(rtsp.url("/live"), source_id=f"cam{i}", **FAST) for i in range(8)]
    readers = [Reader(s) for s in sources]
    try:
        assert wait_for(lambda: all(len(r.frames) >= 3 for r in readers), 40) is not None, \
            [s.state for s in sources]
        assert all(s.state.status == "open" and r.error is None for s, r in zip(sources, readers))
    finally:
        for reader in readers:
            reader.stop()


def test_hosts_of_every_spelling_keep_the_password_out() -> None:
    from runtime.sources._spec import classify, default_id, display

    for url in ("rtsp://admin:hunter2@cam_1:554/live", "rtsp://admin:hunter2@[fe80::1%25eth0]/live",
                "rtsp://admin:hunter2@[fe80::1%eth0]/live", "rtsp://admin:hun@ter2@cam~3/live"):
        spec = classify(url)
        source = CaptureSource(url, max_reconnects=0, open_timeout=0.5, backoff_initial=0.05)
        texts = [display(url), default_id(spec), source.id, repr(source), str(source.state)]
        assert not any("hunter2" in t or "admin" in t or "ter2" in t for t in texts), texts
        source.release()
    with pytest.raises(SourceError, match="contains a control character") as caught:
        classify("rtsp://admin:p\nss@cam/live")
    assert "pss" not in str(caught.value) and "admin" not in str(caught.value)
