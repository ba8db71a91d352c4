"""``CaptureSource``: cameras, network streams, GStreamer pipelines and video files through
``cv2.VideoCapture``. A live source is read by its own grabber thread, which drains the camera at its
own rate (so a frame's timestamp is when it was captured, not when a slow consumer asked for it),
detects stalls, and reconnects with exponential backoff; a watchdog abandons an OpenCV call that hangs
(a GStreamer pipeline that never prerolls, a reopen that never returns) so the state machine goes on."""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections import deque

import cv2
import numpy as np

from edge_sdk.errors import SourceError
from runtime.frame import Frame, SourceState
from runtime.sources._health import Health, Reporting
from runtime.sources._probe import why_not_open
from runtime.sources._spec import Spec, SourceSpec, check_positive, classify, default_id, opencv_url, redact

log = logging.getLogger(__name__)

#: Frames a live source holds for a consumer slower than the camera; beyond it the oldest are dropped.
BUFFER = 30
#: A hung OpenCV call is abandoned this long after its deadline (FFmpeg's own timeouts fire first).
GRACE_S = 1.0
#: At most this many grabber threads may be stuck in OpenCV calls at once; then the source fails.
MAX_STUCK = 3
_WAKE_S = 0.1  # how often a waiting read() looks at the grabber
RELEASE_JOIN_S = 2.0  # how long release() waits for the grabber's OpenCV call to return


def quiet_opencv() -> None:
    """Leave failures to the source's own log lines: OpenCV's and FFmpeg's native warnings would
    repeat on every reconnect. A user's own ``OPENCV_LOG_LEVEL`` / ``OPENCV_FFMPEG_LOGLEVEL`` win."""
    if "OPENCV_LOG_LEVEL" not in os.environ:  # cv2.utils.logging in recent builds, cv2.setLogLevel in older ones
        set_level = getattr(getattr(getattr(cv2, "utils", None), "logging", None), "setLogLevel", None) \
            or getattr(cv2, "setLogLevel", None)
        if set_level is not None:
            set_level(2)  # LOG_LEVEL_ERROR
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET: read when FFmpeg first opens


class CaptureSource(Reporting):
    """A :class:`~runtime.frame.Source` over ``cv2.VideoCapture``.

    *Live* sources (a camera, a URL, a GStreamer pipeline, or anything with ``live=True``) start a
    grabber thread on the first ``read()`` that reads frames as the camera delivers them into a buffer
    of ``buffer`` frames; ``read()`` returns them oldest first, and when the consumer is slower than
    the camera the oldest are dropped (``state.dropped``), so a frame is never older than ``buffer``
    frame periods when it leaves the source. When opening or reading fails, the grabber releases the
    capture, waits (exponential backoff from ``backoff_initial`` up to ``backoff_max`` seconds) and
    reopens; after ``max_reconnects`` reopen attempts without a frame (None: never give up) the status
    becomes "failed" and ``read()`` raises :class:`SourceError`. ``state.reconnects`` counts reopen
    attempts; ``state.last_error`` says why the last one was needed, and is cleared by the next frame.

    **Stalls.** No new frame within ``stall_timeout`` seconds (a pulled cable, a hung server: FFmpeg
    keeps the connection), or the very same frame for ``stall_timeout`` seconds (a frozen encoder, an
    NVR's still image of a lost camera) makes the status "stalled" and the source reconnects;
    ``state.stalls`` counts them; frames of the picture it froze on are not delivered, after a
    reconnect either, until a different one comes. For URLs FFmpeg's own timeouts (``open_timeout``,
    ``stall_timeout``) end a hung open or read. Other backends (GStreamer, V4L2) have none: a call
    inside OpenCV that does not return (``open_timeout`` for an open, ``stall_timeout`` for a read,
    plus ``GRACE_S``) is abandoned to its thread and the source reconnects with a new capture.
    ``stall_timeout=None`` turns stall detection off (a camera triggered by the line, which may
    rightly deliver nothing for minutes).

    OpenCV runs one FFmpeg open at a time per process: a camera that accepts the connection and never
    answers holds the others' (re)opens for up to its ``open_timeout`` (5 s) per attempt.

    *Finite* sources (a video file, or anything with ``live=False``) open at construction, are read at
    the consumer's pace, and end, status "ended", at the end of the file.
    """

    def __init__(
        self,
        spec: SourceSpec,
        *,
        source_id: str | None = None,
        live: bool | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 2.0,
        max_reconnects: int | None = None,
        open_timeout: float = 5.0,
        stall_timeout: float | None = 3.0,
        buffer: int = BUFFER,
    ) -> None:
        for name, value in (("backoff_initial", backoff_initial), ("backoff_max", backoff_max),
                            ("open_timeout", open_timeout)):
            check_positive(name, value)
        check_positive("stall_timeout", stall_timeout, allow_none=True)
        check_positive("buffer", buffer, integer=True)
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
        self._open_s = float(open_timeout)
        self._stall_s = None if stall_timeout is None else float(stall_timeout)
        self._health = Health(self.id, "connecting")
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._buffer: deque[Frame] = deque()
        self._buffer_size = buffer
        self._generation = 0  # the grabber thread that owns the source; older ones only clean up
        self._grabber: threading.Thread | None = None
        self._call: tuple[int, str, float] | None = None  # (generation, what, deadline) of the OpenCV call under way
        self._stuck = 0  # abandoned grabber threads still inside OpenCV
        self._cap: cv2.VideoCapture | None = None  # finite sources only
        self._opened_once = False
        self._retries = 0  # reopen attempts since the last frame
        self._error: SourceError | None = None
        self._index = 0
        self._frozen: int | None = None  # the fingerprint of the picture a frozen camera repeats
        quiet_opencv()
        if not self._live:
            self._open_finite()

    @property
    def live(self) -> bool:
        return self._live

    @property
    def state(self) -> SourceState:
        self._watch()
        return self._health.snapshot()

    def read(self) -> Frame | None:
        """The next frame; None once ended or released. Raises :class:`SourceError` once failed."""
        if self._error is not None:
            raise self._error
        if not self._live:
            return self._read_finite()
        with self._cond:
            if self._grabber is None and not self._stop.is_set():
                self._start_grabber()
            while not self._buffer and self._error is None and not self._stop.is_set():
                self._cond.wait(_WAKE_S)
                self._watch_locked()
            if self._buffer:
                frame = self._buffer.popleft()
            elif self._error is not None:
                raise self._error
            else:
                return None
        self._health.count(frames=1)
        return frame

    def release(self) -> None:
        """Stop the source; a ``read()`` blocked in another thread returns None promptly."""
        self._stop.set()
        self._health.set(status="released")
        with self._cond:
            self._generation += 1  # the grabber, inside OpenCV or not, closes its capture and ends
            self._buffer.clear()
            self._cond.notify_all()
            cap, self._cap = self._cap, None
            grabber = self._grabber
        if cap is not None:
            cap.release()
        if grabber is not None and grabber is not threading.current_thread():
            # the grabber ends after its current OpenCV call (a frame period on a live camera); waiting for
            # it keeps an interpreter exit from killing a thread inside OpenCV/GStreamer (an abort)
            grabber.join(RELEASE_JOIN_S)

    def __repr__(self) -> str:
        return f"CaptureSource({self._spec.display!r}, id={self.id!r}, live={self._live})"

    # -- finite sources: read at the consumer's pace -----------------------------------------

    def _open_finite(self) -> None:
        try:
            cap = self._new_capture()
            opened = bool(cap.isOpened())
        except cv2.error as exc:
            raise SourceError(f"OpenCV cannot open {self._spec.display!r} as a video: {redact(str(exc)).strip()}",
                              hint="check that it is a video OpenCV can decode (e.g. .mp4, .avi)") from None
        if not opened:
            cap.release()
            reason = why_not_open(str(self._spec.target), self._open_s) if self._spec.kind == "url" else None
            raise SourceError(f"OpenCV cannot open {self._spec.display!r} as a video" + (f": {reason}" if reason else ""),
                              hint="check that it is a video OpenCV can decode (e.g. .mp4, .avi) "
                                   "and that opencv was built with FFmpeg (cv2.getBuildInformation())")
        self._cap = cap
        self._health.set(status="open")

    def _read_finite(self) -> Frame | None:
        with self._cond:
            cap = self._cap
        if cap is None:
            return None
        try:
            ok, image = cap.read()
        except cv2.error as exc:
            ok, image = False, None
            self._health.set(last_error=f"reading a frame failed: {redact(str(exc)).strip()}")
        if self._stop.is_set():
            return None
        if not ok or image is None:
            log.info("source %s: end of %s after %d frames", self.id, self._spec.display, self._index)
            self._health.set(status="ended")
            with self._cond:
                self._cap = None
            cap.release()
            return None
        frame = self._frame(image)
        self._health.count(frames=1)
        return frame

    # -- live sources: the grabber and its watchdog ----------------------------------------------

    def _start_grabber(self) -> None:
        """(Under ``_cond``.) A grabber thread for a new generation."""
        self._generation += 1
        self._grabber = threading.Thread(target=self._grab_loop, args=(self._generation,), daemon=True,
                                         name=f"edge-sdk-capture-{self.id}")
        self._grabber.start()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._stop.is_set() and self._error is None

    def _watch(self) -> None:
        if self._live:
            with self._cond:
                self._watch_locked()

    def _watch_locked(self) -> None:
        """(Under ``_cond``.) Report a stall, and abandon an OpenCV call that is past its deadline."""
        call = self._call
        if call is None or call[0] != self._generation or self._stop.is_set():
            return
        generation, what, deadline = call
        now = time.monotonic()
        if what == "read" and self._stall_s is not None and now >= deadline - GRACE_S \
                and self._health.status == "open":
            self._stalled(f"no new frame for {self._stall_s:g} s")
        if now < deadline or self._spec.kind == "url":
            # FFmpeg's own interrupt callback ends its opens and reads at their timeouts; and OpenCV runs one
            # FFmpeg open at a time per process, so time spent waiting for another camera's open is no hang
            return
        self._call = None
        self._stuck += 1
        limit = self._open_s if what == "open" else (self._stall_s or 0.0)
        error = f"OpenCV's {what} of {self._spec.display} did not return within {limit + GRACE_S:.0f} s"
        log.warning("source %s: %s; abandoning it and reconnecting with a new capture", self.id, error)
        self._health.set(last_error=error)
        if self._stuck >= MAX_STUCK:
            self._fail_locked(f"{self._stuck} OpenCV calls hang and never returned (last: {error})")
            return
        self._start_grabber()

    def _stalled(self, why: str) -> None:
        if self._health.status == "stalled":
            return
        self._health.set(status="stalled", last_error=why)
        self._health.count(stalls=1)
        log.warning("source %s: stalled: %s; reconnecting", self.id, why)

    def _enter(self, generation: int, what: str, seconds: float) -> bool:
        with self._cond:
            if not self._current(generation):
                return False
            self._call = (generation, what, time.monotonic() + seconds + GRACE_S)
            return True

    def _leave(self, generation: int) -> bool:
        """After an OpenCV call: whether this thread still owns the source (else it only cleans up)."""
        with self._cond:
            if self._call is not None and self._call[0] == generation:
                self._call = None
            current = self._current(generation)
            if not current and generation < self._generation and not self._stop.is_set():
                self._stuck = max(0, self._stuck - 1)
            return current

    def _grab_loop(self, generation: int) -> None:
        cap: cv2.VideoCapture | None = None
        same_since: float | None = None
        last_print = 0
        try:
            while self._current(generation):
                if cap is None:
                    cap = self._connect(generation)
                    same_since, last_print = None, 0
                    continue
                if not self._enter(generation, "read", self._stall_s or 3600.0):
                    break
                started = time.monotonic()
                try:
                    ok, image = cap.read()
                    error = "" if ok else "the stream ended or the connection was lost"
                except cv2.error as exc:
                    ok, image, error = False, None, f"reading a frame failed: {redact(str(exc)).strip()}"
                if not self._leave(generation):
                    break
                if not ok or image is None:
                    waited = time.monotonic() - started
                    if self._stall_s is not None and waited >= 0.9 * self._stall_s:  # FFmpeg's read timeout
                        with self._cond:
                            self._stalled(f"no new frame for {waited:.1f} s")
                        error = ""
                    self._lost(error)
                    cap.release()
                    cap = None
                    continue
                now = time.monotonic()
                stamp = zlib.crc32(np.ascontiguousarray(image[::8, ::8]).data)
                if stamp != last_print:
                    same_since, last_print = now, stamp
                if stamp == self._frozen:  # the picture it froze on, again after a reconnect: still frozen
                    if same_since is not None and now - same_since >= (self._stall_s or 0.0):
                        self._lost("")
                        cap.release()
                        cap = None
                    continue
                if self._stall_s is not None and same_since is not None and now - same_since >= self._stall_s:
                    with self._cond:
                        self._stalled(f"the same frame for {now - same_since:.1f} s (a frozen camera or encoder)")
                    self._frozen = stamp
                    self._lost("")
                    cap.release()
                    cap = None
                    continue
                self._frozen = None
                self._push(generation, image)
        except SourceError:
            pass  # failed: read() raises it
        except Exception as exc:  # a bug here must not leave the consumer waiting forever
            log.exception("source %s: grabber failed", self.id)
            with self._cond:
                self._fail_locked(f"the grabber failed: {type(exc).__name__}: {exc}")
        finally:
            if cap is not None:
                cap.release()

    def _push(self, generation: int, image: np.ndarray) -> None:
        with self._cond:
            if not self._current(generation):
                return
            frame = self._frame(image)
            if len(self._buffer) >= self._buffer_size:
                self._buffer.popleft()
                self._health.count(dropped=1)
            self._buffer.append(frame)
            recovered = self._retries > 0 or self._health.status != "open"
            self._retries = 0
            self._cond.notify_all()
        if recovered:
            self._health.set(status="open", last_error="")

    def _frame(self, image: np.ndarray) -> Frame:
        frame = Frame(image=_to_bgr(image), source_id=self.id, index=self._index, timestamp=time.time())
        self._index += 1
        return frame

    def _connect(self, generation: int) -> cv2.VideoCapture | None:
        """Open (or reopen, after a backoff) a capture; None when this attempt failed or was superseded."""
        if self._opened_once or self._health.snapshot().last_error:
            with self._cond:
                if self._max_reconnects is not None and self._retries >= self._max_reconnects:
                    self._fail_locked(None)
                    return None
                delay = min(self._backoff[0] * 2 ** self._retries, self._backoff[1])
            log.debug("source %s: reconnect attempt %d in %.2fs", self.id, self._retries + 1, delay)
            if self._stop.wait(delay) or not self._current(generation):
                return None
            with self._cond:
                self._retries += 1
            self._health.count(reconnects=1)
        if not self._enter(generation, "open", self._open_s):
            return None
        try:
            cap = self._new_capture()
            opened, why = bool(cap.isOpened()), ""
        except cv2.error as exc:
            cap, opened, why = None, False, redact(str(exc)).strip()
        if not self._leave(generation):
            if cap is not None:
                cap.release()
            return None
        if opened:
            if self._health.status not in ("stalled",):
                self._health.set(status="open")
            log.info("source %s: %s %s", self.id, "reconnected to" if self._opened_once else "opened",
                     self._spec.display)
            self._opened_once = True
            return cap
        if cap is not None:
            cap.release()
        if not why and self._spec.kind == "url":
            why = why_not_open(str(self._spec.target), min(self._open_s, 3.0)) or ""
        elif not why and self._spec.kind == "gstreamer":
            head = str(self._spec.display).split("'")[1] if "'" in self._spec.display else "?"
            why = (f"GStreamer could not start it: is every element installed (gst-inspect-1.0 {head}) and the "
                   "camera free?")
        error = f"cannot open {self._spec.display}" + (f": {why}" if why else "")
        first = self._health.status not in ("reconnecting",) or self._health.snapshot().last_error != error
        self._health.set(status="reconnecting", last_error=error)
        if first:
            log.warning("source %s: %s; reconnecting", self.id, error)
        return None

    def _new_capture(self) -> cv2.VideoCapture:
        kind, target = self._spec.kind, self._spec.target
        if kind == "url":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self._open_s * 1000)]
            if self._stall_s is not None:
                params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self._stall_s * 1000)]
            return cv2.VideoCapture(opencv_url(str(target)), cv2.CAP_FFMPEG, params)
        if kind == "gstreamer":
            return cv2.VideoCapture(target, cv2.CAP_GSTREAMER)
        return cv2.VideoCapture(target)

    def _lost(self, error: str) -> None:
        if self._stop.is_set():
            return
        if self._health.status == "stalled":
            if error:
                self._health.set(last_error=f"{self._health.snapshot().last_error}; {error}")
            return
        self._health.set(status="reconnecting", last_error=error)
        log.warning("source %s: %s; reconnecting", self.id, error)

    def _fail_locked(self, why: str | None) -> None:
        """(Under ``_cond``.) Give up: the status becomes "failed" and every read raises."""
        if self._error is not None:
            return
        last = why or self._health.snapshot().last_error
        self._error = SourceError(
            f"source {self.id!r} ({self._spec.display}) failed after {self._retries} reconnect attempts; "
            f"last error: {last}",
            hint="check that the camera or stream is reachable, or raise max_reconnects (None retries forever)")
        self._health.set(status="failed", last_error=last)
        log.error("%s", self._error)
        self._cond.notify_all()


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
                          hint="on Jetson use JetPack's OpenCV (python3-opencv; see the README's Jetson install) "
                               "or build opencv with -DWITH_GSTREAMER=ON; pip's opencv-python wheels have no "
                               "GStreamer")
    return found


def _to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image
