"""``CaptureSource``: cameras, network streams, GStreamer pipelines and video files through
``cv2.VideoCapture``, reconnecting live sources with exponential backoff."""

from __future__ import annotations

import logging
import os
import threading
import time

import cv2
import numpy as np

from edge_sdk.errors import SourceError
from runtime.frame import Frame
from runtime.sources._health import Health, Reporting
from runtime.sources._spec import Spec, SourceSpec, check_positive, classify, default_id, redact

log = logging.getLogger(__name__)

class CaptureSource(Reporting):
    """A :class:`~runtime.frame.Source` over ``cv2.VideoCapture``.

    *Live* sources (a camera, a URL, a GStreamer pipeline, or anything with ``live=True``) open on
    the first ``read()``. When opening or reading fails they release the capture, wait (exponential
    backoff from ``backoff_initial`` up to ``backoff_max`` seconds) and reopen; after
    ``max_reconnects`` reopen attempts without a frame (None: never give up) the status becomes
    "failed" and ``read()`` raises :class:`SourceError`. ``state.reconnects`` counts reopen attempts.

    *Finite* sources (a video file, or anything with ``live=False``) open at construction and end,
    status "ended", at the end of the file.

    ``open_timeout`` and ``read_timeout`` (seconds) bound OpenCV's FFmpeg calls for URLs; they also
    bound how long a ``release()`` from another thread waits for a read that is inside OpenCV.
    """

    def __init__(
        self,
        spec: SourceSpec,
        *,
        source_id: str | None = None,
        live: bool | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        max_reconnects: int | None = None,
        open_timeout: float = 10.0,
        read_timeout: float = 10.0,
    ) -> None:
        for name, value in (("backoff_initial", backoff_initial), ("backoff_max", backoff_max),
                            ("open_timeout", open_timeout), ("read_timeout", read_timeout)):
            check_positive(name, value)
        if max_reconnects is not None and (isinstance(max_reconnects, bool) or not isinstance(max_reconnects, int)
                                           or max_reconnects < 0):
            raise SourceError(f"max_reconnects={max_reconnects!r} is not valid; expected an integer >= 0 or None",
                              hint="None retries forever; 0 fails at the first lost connection")
        if live is not None and not isinstance(live, bool):
            raise SourceError(f"live={live!r} is not valid; expected True, False or None (infer from the spec)")
        self._spec = _capture_spec(spec, live)
        self._live = live if live is not None else self._spec.kind != "file"
        self.id = source_id or default_id(self._spec)
        self._backoff = (float(backoff_initial), max(float(backoff_max), float(backoff_initial)))
        self._max_reconnects = max_reconnects
        self._timeouts_ms = (int(open_timeout * 1000), int(read_timeout * 1000))
        self._health = Health(self.id, "connecting")
        self._stop = threading.Event()
        self._io = threading.Lock()  # held around every OpenCV call on self._cap
        self._cap: cv2.VideoCapture | None = None
        self._opened_once = False
        self._retries = 0  # reopen attempts since the last frame
        self._error: SourceError | None = None
        self._index = 0
        if not self._live:
            self._open_finite()

    @property
    def live(self) -> bool:
        return self._live

    def read(self) -> Frame | None:
        """The next frame; None once ended or released. Raises :class:`SourceError` once failed."""
        if self._error is not None:
            raise self._error
        while not self._stop.is_set() and self._health.status != "ended":
            if self._cap is None and not self._connect():
                continue
            ok, image, error = self._grab()
            if ok and image is not None:
                return self._deliver(image)
            if self._stop.is_set():
                break
            if not self._live:
                log.info("source %s: end of %s after %d frames", self.id, self._spec.display, self._index)
                self._health.set(status="ended")
                self._close()
                return None
            self._lost(error or "reading a frame failed (stream lost or ended)")
        return None

    def release(self) -> None:
        """Stop the source; a ``read()`` blocked in another thread returns None promptly."""
        self._stop.set()
        self._health.set(status="released")
        if self._io.acquire(blocking=False):
            try:
                self._close_locked()
            finally:
                self._io.release()
        # Otherwise the reading thread is inside OpenCV: it closes the capture when that call returns.

    def __repr__(self) -> str:
        return f"CaptureSource({self._spec.display!r}, id={self.id!r}, live={self._live})"

    # -- opening and reconnecting ------------------------------------------------------------

    def _open_finite(self) -> None:
        if not self._open_once():
            detail = self._health.snapshot().last_error.partition(": ")[2]
            raise SourceError(f"OpenCV cannot open {self._spec.display!r} as a video"
                              + (f": {detail}" if detail else ""),
                              hint="check that it is a video OpenCV can decode (e.g. .mp4, .avi) "
                                   "and that opencv was built with FFmpeg (cv2.getBuildInformation())")

    def _connect(self) -> bool:
        """Open (or reopen, after a backoff) the capture; False when released meanwhile."""
        if self._opened_once or self._health.snapshot().last_error:
            if self._max_reconnects is not None and self._retries >= self._max_reconnects:
                self._fail()
            delay = min(self._backoff[0] * 2 ** self._retries, self._backoff[1])
            log.debug("source %s: reconnect attempt %d in %.2fs", self.id, self._retries + 1, delay)
            if self._stop.wait(delay):
                return False
            self._retries += 1
            self._health.count(reconnects=1)
        if self._open_once():
            if self._retries:
                log.info("source %s: reconnected to %s after %d attempts", self.id, self._spec.display,
                         self._retries)
            else:
                log.info("source %s: opened %s", self.id, self._spec.display)
            self._opened_once = True
            return True
        if self._health.status != "reconnecting" and not self._stop.is_set():
            self._health.set(status="reconnecting")
            log.warning("source %s: %s; reconnecting", self.id, self._health.snapshot().last_error)
        return False

    def _open_once(self) -> bool:
        """One attempt at opening; records the error and returns False when OpenCV cannot."""
        with self._io:
            if self._stop.is_set():
                return False
            try:
                cap = self._new_capture()
                opened = bool(cap.isOpened())
            except cv2.error as exc:
                cap, opened = None, False
                self._health.set(last_error=f"cannot open {self._spec.display}: {redact(str(exc)).strip()}")
            if opened:
                self._cap = cap
                self._health.set(status="open")
            else:
                if cap is not None:
                    cap.release()
                    self._health.set(last_error=f"cannot open {self._spec.display}")
        if self._stop.is_set():
            self._close()
            return False
        return opened

    def _new_capture(self) -> cv2.VideoCapture:
        kind, target = self._spec.kind, self._spec.target
        if kind == "url":
            open_ms, read_ms = self._timeouts_ms
            return cv2.VideoCapture(target, cv2.CAP_FFMPEG,
                                    [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms])
        if kind == "gstreamer":
            return cv2.VideoCapture(target, cv2.CAP_GSTREAMER)
        return cv2.VideoCapture(target)

    def _lost(self, error: str) -> None:
        self._close()
        self._health.set(status="reconnecting", last_error=error)
        log.warning("source %s: %s; reconnecting", self.id, error)

    def _fail(self) -> None:
        last = self._health.snapshot().last_error
        self._error = SourceError(
            f"source {self.id!r} ({self._spec.display}) failed after {self._retries} reconnect attempts; "
            f"last error: {last}",
            hint="check that the camera or stream is reachable, or raise max_reconnects (None retries forever)")
        self._health.set(status="failed")
        self._close()
        log.error("%s", self._error)
        raise self._error

    # -- reading -------------------------------------------------------------------------------

    def _grab(self) -> tuple[bool, np.ndarray | None, str]:
        with self._io:
            cap = self._cap
            if cap is None or self._stop.is_set():
                return False, None, ""
            try:
                ok, image = cap.read()
                error = ""
            except cv2.error as exc:
                ok, image, error = False, None, f"reading a frame failed: {redact(str(exc)).strip()}"
        if self._stop.is_set():
            self._close()
        return bool(ok), image, error

    def _deliver(self, image: np.ndarray) -> Frame:
        frame = Frame(image=_to_bgr(image), source_id=self.id, index=self._index, timestamp=time.time())
        self._index += 1
        self._retries = 0
        self._health.count(frames=1)
        return frame

    def _close(self) -> None:
        with self._io:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def _capture_spec(spec: SourceSpec, live: bool | None) -> Spec:
    """Classify ``spec`` for a capture; a missing path is an error unless ``live=True``."""
    found = classify(spec, missing_ok=True)
    if found.kind == "file" and not live and not os.path.exists(found.target):
        raise SourceError(f"video file {found.display!r} does not exist",
                          hint="check the path, or pass live=True to wait for a file that will appear")
    if found.kind == "folder":
        raise SourceError(f"{found.display!r} is a folder, not a video",
                          hint="use FolderSource (or open_source) for a folder of images")
    if found.kind == "gstreamer" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        raise SourceError(f"{found.display} needs OpenCV's GStreamer backend, which this OpenCV lacks",
                          hint="on Jetson use JetPack's OpenCV (python3-opencv) or build opencv with "
                               "-DWITH_GSTREAMER=ON; pip's opencv-python wheels have no GStreamer")
    return found


def _to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image
