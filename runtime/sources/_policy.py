"""``PolicySource``: which frames of a source a consumer sees — every one ("all") or only the
newest ("latest") — and at most how many per second (``max_fps``)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from edge_sdk.errors import SourceError
from runtime.closing import Releasing
from runtime.frame import Frame, Source, SourceState
from runtime.sources._spec import check_positive

log = logging.getLogger(__name__)

#: Frame policies: "all" passes every frame (the consumer's pace sets the source's);
#: "latest" reads in the background and keeps only the newest frame.
POLICIES = ("all", "latest")
#: How long ``release()`` waits for the background reader to stop.
JOIN_TIMEOUT_S = 5.0
#: Share of the period a frame may come early and still pass ``max_fps`` (capture jitter).
JITTER = 0.1


class RateGate:
    """Passes at most ``max_fps`` frames per second on average, judged by frame timestamps.

    A frame passes when it is due: a period after the last one that passed, on a schedule that
    advances by whole periods, less ``JITTER`` of a period so that a 30 fps camera under
    ``max_fps=30`` loses no frame to jitter while a faster source still averages ``max_fps``.
    """

    def __init__(self, max_fps: float | None) -> None:
        self._period = 1.0 / max_fps if max_fps else 0.0
        self._due: float | None = None
        self._last = 0.0

    def admit(self, timestamp: float) -> bool:
        period = self._period
        if not period:
            return True
        if self._due is None or timestamp < self._last:  # first frame, or the clock went back
            self._due = timestamp + period
        elif timestamp < self._due - period * JITTER:
            return False
        else:
            self._due = max(self._due + period, timestamp + period * (1 - JITTER))
        self._last = timestamp
        return True


class PolicySource(Releasing):
    """Wraps any :class:`~runtime.frame.Source` with a frame policy and a rate limit.

    Delivered frames keep the inner source's ``index``, so gaps show drops. ``state`` is the inner
    state with ``frames`` delivered here and ``dropped`` adding the frames dropped here (overwritten
    before being read under "latest", or over ``max_fps``). Frames arriving less than 1/max_fps
    after the last delivered one are dropped, under both policies (see :class:`RateGate`).
    """

    def __init__(self, source: Source, *, policy: str = "all", max_fps: float | None = None) -> None:
        check_policy(policy)
        check_positive("max_fps", max_fps, allow_none=True)
        self._inner = source
        self.id = source.id
        self._policy = policy
        self._gate = RateGate(max_fps)
        self._cond = threading.Condition()
        self._slot: Frame | None = None  # "latest": the newest unread frame
        self._ended = False
        self._error: Exception | None = None
        self._released = False
        self._thread: threading.Thread | None = None
        self._frames = 0
        self._dropped = 0

    @property
    def inner(self) -> Source:
        return self._inner

    @property
    def is_open(self) -> bool:
        with self._cond:
            if self._released:
                return False
            if self._slot is not None:
                return True
        return self._inner.is_open

    @property
    def state(self) -> SourceState:
        inner = self._inner.state
        with self._cond:
            return replace(inner, status="released" if self._released else inner.status,
                           frames=self._frames, dropped=inner.dropped + self._dropped)

    @property
    def policy(self) -> str:
        return self._policy

    def read(self) -> Frame | None:
        """The next frame the policy lets through; None once the source ended or was released."""
        while True:
            frame = self._next_all() if self._policy == "all" else self._next_latest()
            if frame is None:
                return None
            with self._cond:
                if self._gate.admit(frame.timestamp):
                    self._frames += 1
                    return frame
                self._dropped += 1

    def release(self) -> None:
        """Release the inner source and stop (join) the background reader."""
        with self._cond:
            self._released = True
            self._cond.notify_all()
        self._inner.release()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning("source %s: background reader still inside the inner read() after %.0fs; "
                            "it stops when that read returns", self.id, JOIN_TIMEOUT_S)

    def __repr__(self) -> str:
        return f"PolicySource({self._inner!r}, policy={self._policy!r})"

    def _next_all(self) -> Frame | None:
        if self._released:
            return None
        return self._inner.read()

    def _next_latest(self) -> Frame | None:
        with self._cond:
            if self._thread is None and not self._released:
                self._thread = threading.Thread(target=self._pump, name=f"edge-sdk-source-{self.id}", daemon=True)
                self._thread.start()
            while self._slot is None and not self._ended and not self._released:
                self._cond.wait()
            if self._released:
                return None
            if self._slot is None:
                if self._error is not None:
                    raise self._error
                return None
            frame, self._slot = self._slot, None
            return frame

    def _pump(self) -> None:
        """The "latest" reader: keeps the newest frame in the slot, counting the ones it replaces."""
        try:
            while not self._released:
                frame = self._inner.read()
                if frame is None:
                    break
                with self._cond:
                    if self._slot is not None:
                        self._dropped += 1
                    self._slot = frame
                    self._cond.notify_all()
        except Exception as exc:  # the inner source failed (SourceError) or has a bug: the consumer gets it
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()


def check_policy(policy: object) -> None:
    if policy not in POLICIES:
        raise SourceError(f"frame policy {policy!r} is not known; expected one of {', '.join(POLICIES)}",
                          hint='"all" delivers every frame; "latest" only the newest when the consumer is slow')


class PacedSource:
    """A finite source delivered at ``fps``: frame i is released ``i / fps`` after the first.

    For replaying a recorded video as the camera saw it (``open_source(path, realtime=True)``),
    so latency and drops behave as they would live instead of the file being read as fast as
    the pipeline takes frames.
    """

    def __init__(self, inner: Source, fps: float) -> None:
        check_positive("fps", fps)
        self.inner, self.id, self._period = inner, inner.id, 1.0 / fps
        self._start: float | None = None
        self._count = 0
        self._released = threading.Event()

    def read(self) -> Frame | None:
        now = time.monotonic()
        self._start = now if self._start is None else self._start
        if self._released.wait(max(0.0, self._start + self._count * self._period - now)):
            return None
        self._count += 1
        return self.inner.read()

    def release(self) -> None:
        self._released.set()
        self.inner.release()

    @property
    def is_open(self) -> bool:
        return self.inner.is_open

    @property
    def state(self) -> SourceState:
        return self.inner.state
