"""Streaming execution: sources -> preprocess -> dynamic batching -> runner replicas -> postprocess -> sinks.

Each stage runs in its own thread(s) and hands work to the next through a bounded
queue, so a slow stage pushes back on the ones before it instead of growing memory:
with the ``"all"`` frame policy the sources wait; with ``"latest"`` they drop stale
frames (see ``runtime.sources``). OpenCV and onnxruntime release the GIL, so
preprocessing workers and runner replicas overlap on separate cores.

A sink is a plain callable ``sink(prediction, frame)``; one that raises is counted and
logged, and the stream goes on. With several replicas, results of one source may
arrive out of order (each carries its frame, so a consumer can reorder by
``frame.index``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from edge_sdk.errors import EdgeSDKError, PipelineError
from runtime.closing import Closing
from runtime.batching import END, Batching, next_batch
from runtime.frame import Frame, Source, SourceState
from runtime.manifest import ImagePreprocess
from runtime.pipeline import Pipeline
from runtime.prediction import Prediction, Timings
from runtime.preprocess.image import preprocess_image
from runtime.runners.base import Runner
from runtime.select import replicate

log = logging.getLogger(__name__)

Sink = Callable[[Prediction, Frame], None]
_LATENCY_WINDOW = 4096
QUEUE, LATEST_QUEUE = 32, 2  # frames held between stages by default: "all" sources, and any "latest" source
_POLL_S = 0.05


@dataclass(frozen=True)
class ROI:
    """A region of interest of a source's frames, in pixels: one camera watching several parts."""

    name: str
    x: int
    y: int
    w: int
    h: int

    @classmethod
    def parse(cls, name: str, box: Any) -> ROI:
        """``name`` and ``[x, y, width, height]`` (ints, width and height > 0)."""
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
                and box[0] >= 0 and box[1] >= 0 and box[2] > 0 and box[3] > 0):
            raise PipelineError(f"region {name!r} is {box!r}; expected [x, y, width, height] in pixels "
                                "with x, y >= 0 and width, height > 0")
        return cls(str(name), *(int(v) for v in box))

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The region's pixels; a region that reaches outside the frame is refused, not clipped (a clipped
        region would be squeezed into the model's input with another aspect ratio and scale)."""
        h, w = image.shape[:2]
        if self.x + self.w > w or self.y + self.h > h:
            raise PipelineError(f"region {self.name!r} [{self.x}, {self.y}, {self.w}, {self.h}] reaches "
                                f"({self.x + self.w}, {self.y + self.h}), outside the {w}x{h} frame",
                                hint="declare regions inside the camera's resolution (x + width <= frame width, "
                                     "y + height <= frame height)")
        return image[self.y : self.y + self.h, self.x : self.x + self.w]


def parse_rois(rois: Mapping[str, Any] | None) -> dict[str, tuple[ROI, ...]]:
    """``{source_id: {roi_name: [x, y, w, h]}}`` -> ROI tuples per source."""
    out: dict[str, tuple[ROI, ...]] = {}
    for source_id, regions in (rois or {}).items():
        if not isinstance(regions, Mapping) or not regions:
            raise PipelineError(f"regions of source {source_id!r} are {regions!r}; "
                                "expected {name: [x, y, width, height], ...}")
        out[str(source_id)] = tuple(r if isinstance(r, ROI) else ROI.parse(n, r) for n, r in regions.items())
    return out


@dataclass(frozen=True)
class StreamResult:
    """One prediction from a stream: the frame it came from, the region (if any) and the latency."""

    frame: Frame
    prediction: Prediction
    roi: str | None
    latency_ms: float  # from the frame's timestamp to the end of postprocessing


@dataclass(frozen=True)
class StreamStats:
    """Counters of a stream so far; ``fps`` is predictions per second since start."""

    elapsed_s: float
    frames: int
    predictions: int
    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    dropped: int
    batches: int
    mean_batch: float
    errors: int
    last_error: str
    sink_failures: Mapping[str, int]
    queue_depths: Mapping[str, int]
    per_replica: tuple[int, ...]
    sources: tuple[SourceState, ...]

    def line(self) -> str:
        """A one-line progress summary for terminals and logs."""
        return (f"{self.frames} frames  {self.predictions} predictions  {self.fps:.1f} fps  "
                f"latency p50 {self.latency_p50_ms:.1f} ms p99 {self.latency_p99_ms:.1f} ms  "
                f"dropped {self.dropped}  batch {self.mean_batch:.1f}  errors {self.errors}")


class _Credit:
    """A frame of a "latest" source in flight: the source's reader takes its next frame (the newest one
    then) once every item made from this frame has been inferred or has failed."""

    def __init__(self, slots: threading.Semaphore, items: int) -> None:
        self._slots, self._left, self._lock = slots, items, threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._slots.release()


@dataclass
class _Item:
    frame: Frame
    roi: str | None
    tensor: np.ndarray
    preprocess_ms: float
    credit: _Credit | None = None


def _live(source: Source) -> bool:
    """Whether ``source`` (or the source it wraps) is a live camera or stream."""
    while True:
        if getattr(source, "live", False):
            return True
        inner = getattr(source, "inner", None)
        if inner is None or inner is source:
            return False
        source = inner


@dataclass
class _Counters:
    frames: int = 0
    predictions: int = 0
    batches: int = 0
    errors: int = 0
    last_error: str = ""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))
    sink_failures: dict[str, int] = field(default_factory=dict)


class _Countdown:
    """The last of ``n`` producers to finish closes the downstream queue for ``consumers`` readers."""

    def __init__(self, n: int, put: Callable[[Any], bool], consumers: int) -> None:
        self._left, self._put, self._consumers = n, put, consumers
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for _ in range(self._consumers):
                self._put(END)


def _sink_name(sink: Sink) -> str:
    return getattr(sink, "__name__", None) or type(sink).__name__


class Stream(Closing):
    """A running image pipeline over one or more sources. Iterate it, or ``run()`` it with sinks."""

    def __init__(
        self,
        pipeline: Pipeline,
        sources: Sequence[Source],
        *,
        sinks: Sequence[Sink] = (),
        batching: Batching = Batching(),
        replicas: int = 1,
        threads: int | None = None,
        rois: Mapping[str, Any] | None = None,
        queue_size: int | None = None,
        preprocess_workers: int | None = None,
        verify: bool = True,
        close_pipeline: bool = False,
    ) -> None:
        spec = pipeline.manifest.preprocess
        if not isinstance(spec, ImagePreprocess):
            raise PipelineError(f"package {pipeline.manifest.name} is a {pipeline.manifest.task} model; "
                                "streams run image models", hint="use predict_batch for texts")
        if not sources:
            raise PipelineError("no sources given; expected at least one (a camera, URL, video file or folder)")
        ids = [s.id for s in sources]
        if len(set(ids)) != len(ids):
            raise PipelineError(f"source ids {ids} are not unique", hint="give each source its own source_id")
        if queue_size is not None and (isinstance(queue_size, bool) or not isinstance(queue_size, int)
                                       or queue_size < 1):
            raise PipelineError(f"queue_size is {queue_size!r}; expected None (the default) or an int >= 1")
        self.rois = parse_rois(rois)
        unknown = sorted(set(self.rois) - set(ids))
        if unknown:
            raise PipelineError(f"regions are declared for unknown source(s) {unknown}; the sources are {ids}")
        self.pipeline, self.sources, self.sinks, self.batching = pipeline, tuple(sources), tuple(sinks), batching
        self._spec = spec
        self._runners, self._own_runners = self._make_runners(replicas, threads, verify)
        workers = preprocess_workers or max(1, len(self._runners))
        latest = any(getattr(s, "policy", "all") == "latest" for s in sources)
        # "latest": one frame per runner in flight per source, so the newest frame is the next to reach the model
        self._slots = {s.id: threading.Semaphore(len(self._runners)) for s in sources
                       if getattr(s, "policy", "all") == "latest"}
        if queue_size is None:  # frames wait in these queues too: short for live sources, or they serve stale frames
            queue_size = LATEST_QUEUE if latest or any(_live(s) for s in sources) else QUEUE
        self._frames: queue.Queue[Any] = queue.Queue(queue_size)
        self._ready: queue.Queue[Any] = queue.Queue(queue_size)
        self._batches: queue.Queue[Any] = queue.Queue(len(self._runners) if latest else max(2, len(self._runners)))
        self._results: queue.Queue[Any] = queue.Queue(queue_size)
        self._output: queue.Queue[Any] | None = None
        self._abort, self._lock, self._c = threading.Event(), threading.Lock(), _Counters()
        self._per_replica = [0] * len(self._runners)
        self._threads: list[threading.Thread] = []
        self._workers = workers
        self._started = 0.0
        self._finished = threading.Event()
        self._close_pipeline = close_pipeline  # the stream owns the pipeline (edge_sdk.stream opened it)

    def _make_runners(self, replicas: int, threads: int | None, verify: bool) -> tuple[list[Runner], bool]:
        if replicas < 1:
            raise PipelineError(f"replicas is {replicas}; expected at least 1")
        if replicas == 1 and threads is None:
            return [self.pipeline.selection.runner], False
        if self.pipeline.package is None:
            raise PipelineError("replicas need the pipeline's package", hint="build it with Pipeline.from_package")
        per = threads or max(1, (os.cpu_count() or 1) // replicas)
        return replicate(self.pipeline.package, self.pipeline.selection, replicas, threads=per, verify=verify), True

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Stream:
        if self._threads:
            raise PipelineError("this stream was already started", hint="create a new Stream to run again")
        self._started = time.monotonic()
        close_frames = _Countdown(len(self.sources), lambda x: self._put(self._frames, x), self._workers)
        close_ready = _Countdown(self._workers, lambda x: self._put(self._ready, x), 1)
        close_results = _Countdown(len(self._runners), lambda x: self._put(self._results, x), 1)
        targets: list[tuple[str, Callable[[], None]]] = []
        targets += [(f"read-{s.id}", lambda s=s: self._read(s, close_frames)) for s in self.sources]  # type: ignore[misc]
        targets += [(f"preprocess-{i}", lambda: self._preprocess(close_ready)) for i in range(self._workers)]
        targets.append(("batch", self._batch))
        targets += [(f"infer-{i}", lambda i=i: self._infer(i, close_results))  # type: ignore[misc]
                    for i in range(len(self._runners))]
        targets.append(("sinks", self._deliver))
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"edge-sdk-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every source has ended and every result was delivered; False on timeout."""
        return self._finished.wait(timeout)

    def run(self, timeout: float | None = None) -> StreamStats:
        """Start (if needed), process until the sources end (or ``timeout`` seconds), stop, return the stats."""
        if not self._threads:
            self.start()
        try:
            self.wait(timeout)
        finally:
            self.close()
        return self.stats()

    def interrupt(self) -> None:
        """Stop without waiting for anything (safe from a signal handler or a timer): the stages drop
        what they hold, an iteration ends, and ``close()`` (which the iteration calls) releases the rest."""
        self._abort.set()

    def stop(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Release the sources; with ``drain`` finish the frames already read, else drop them."""
        for source in self.sources:
            if source.is_open:  # an ended source keeps saying "ended"
                source.release()
        if not drain:
            self._abort.set()
        if self._threads and not self._finished.wait(timeout):
            self._abort.set()
        for thread in self._threads:
            thread.join(timeout)

    def close(self) -> None:
        """Stop (draining) and free the replicas this stream created."""
        self.stop(drain=True)
        if self._own_runners:
            for runner in self._runners:
                runner.deactivate()
            self._own_runners = False
        if self._close_pipeline:
            self.pipeline.close()
            self._close_pipeline = False

    def __iter__(self) -> Iterator[StreamResult]:
        """Start and yield results as they come; leaving the loop early stops the stream."""
        if self._threads:
            raise PipelineError("iterate a stream before starting it", hint="use either iteration or run()")
        self._output = queue.Queue(max(1, self._results.maxsize))
        self.start()
        try:
            while True:
                item = self._get(self._output)
                if item is END or item is None:
                    return
                yield item
        finally:
            if not self._finished.is_set():
                self.stop(drain=False)
            self.close()

    # -- stages ------------------------------------------------------------------------------
    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        while not self._abort.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue[Any]) -> Any:
        while not self._abort.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def _error(self, where: str, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, EdgeSDKError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._c.errors += 1
            self._c.last_error = f"{where}: {message}"
            first = self._c.errors <= 5
        (log.warning if first else log.debug)("%s failed: %s", where, message)

    def _read(self, source: Source, done: _Countdown) -> None:
        slots, regions = self._slots.get(source.id), len(self.rois.get(source.id) or (None,))
        try:
            while not self._abort.is_set():
                if slots is not None and not self._acquire(slots):
                    break
                try:
                    frame = source.read()
                except EdgeSDKError as exc:
                    self._error(f"source {source.id}", exc)
                    break
                if frame is None:
                    break
                with self._lock:
                    self._c.frames += 1
                if not self._put(self._frames, (frame, None if slots is None else _Credit(slots, regions))):
                    break
        finally:
            done.done()

    def _acquire(self, slots: threading.Semaphore) -> bool:
        while not self._abort.is_set():
            if slots.acquire(timeout=_POLL_S):
                return True
        return False

    def _preprocess(self, done: _Countdown) -> None:
        try:
            while True:
                got = self._get(self._frames)
                if got is END or got is None:
                    break
                frame, credit = got
                for roi in self.rois.get(frame.source_id) or (None,):
                    t0 = time.perf_counter()
                    try:
                        image = frame.image if roi is None else roi.crop(frame.image)
                        tensor = preprocess_image(image, self._spec)
                    except Exception as exc:
                        self._error(f"preprocess of {frame.source_id}#{frame.index}", exc)
                        if credit is not None:
                            credit.done()
                        continue
                    item = _Item(frame, None if roi is None else roi.name, tensor, (time.perf_counter() - t0) * 1e3,
                                 credit)
                    if not self._put(self._ready, item):
                        return
        finally:
            done.done()

    def _batch(self) -> None:
        ended = False
        while not ended:
            items, ended = next_batch(self._ready, self.batching, self._abort)
            if items and not self._put(self._batches, items):
                break
        for _ in self._runners:
            self._put(self._batches, END)

    def _infer(self, index: int, done: _Countdown) -> None:
        runner, name = self._runners[index], self.pipeline.manifest.inputs[0].name
        try:
            while True:
                items = self._get(self._batches)
                if items is END or items is None:
                    break
                try:
                    t0 = time.perf_counter()
                    outputs = self.pipeline.infer({name: np.stack([it.tensor for it in items])}, runner)
                    t1 = time.perf_counter()
                    scores = self.pipeline.scores(outputs)
                    post_ms = (time.perf_counter() - t1) * 1e3
                    timings = [Timings(it.preprocess_ms, (t1 - t0) * 1e3, post_ms) for it in items]
                    predictions = self.pipeline.wrap(scores, timings, self.pipeline.maps(outputs))
                except Exception as exc:
                    self._error(f"inference of a batch of {len(items)} on replica {index}", exc)
                    continue
                finally:
                    for it in items:
                        if it.credit is not None:
                            it.credit.done()
                with self._lock:
                    self._c.batches += 1
                    self._per_replica[index] += 1
                for it, p in zip(items, predictions):
                    if it.roi is not None:
                        p = replace(p, extra=MappingProxyType({**p.extra, "roi": it.roi}))
                    if not self._put(self._results, (it, p)):
                        return
        finally:
            done.done()

    def _deliver(self) -> None:
        try:
            while True:
                got = self._get(self._results)
                if got is END or got is None:
                    break
                item, prediction = got
                latency = max(0.0, (time.time() - item.frame.timestamp) * 1e3)
                with self._lock:
                    self._c.predictions += 1
                    self._c.latencies.append(latency)
                for sink in self.sinks:
                    try:
                        sink(prediction, item.frame)
                    except Exception as exc:  # a failing sink is isolated: counted, logged, skipped
                        self._sink_failed(sink, exc)
                if self._output is not None:
                    self._put(self._output, StreamResult(item.frame, prediction, item.roi, latency))
        finally:
            if self._output is not None:
                self._put(self._output, END)
            self._finished.set()

    def _sink_failed(self, sink: Sink, exc: BaseException) -> None:
        name = _sink_name(sink)
        with self._lock:
            count = self._c.sink_failures[name] = self._c.sink_failures.get(name, 0) + 1
        (log.warning if count <= 3 else log.debug)("sink %s failed (%d times): %s: %s",
                                                   name, count, type(exc).__name__, exc)

    # -- observation -------------------------------------------------------------------------
    def stats(self) -> StreamStats:
        with self._lock:
            c = self._c
            latencies = np.asarray(c.latencies, dtype=np.float64)
            elapsed = time.monotonic() - self._started if self._started else 0.0
            states = tuple(s.state for s in self.sources)
            return StreamStats(
                elapsed_s=elapsed, frames=c.frames, predictions=c.predictions,
                fps=c.predictions / elapsed if elapsed > 0 else 0.0,
                latency_p50_ms=float(np.percentile(latencies, 50)) if latencies.size else 0.0,
                latency_p99_ms=float(np.percentile(latencies, 99)) if latencies.size else 0.0,
                dropped=sum(s.dropped for s in states), batches=c.batches,
                mean_batch=c.predictions / c.batches if c.batches else 0.0,
                errors=c.errors, last_error=c.last_error, sink_failures=MappingProxyType(dict(c.sink_failures)),
                queue_depths=MappingProxyType({"frames": self._frames.qsize(), "ready": self._ready.qsize(),
                                               "batches": self._batches.qsize(), "results": self._results.qsize()}),
                per_replica=tuple(self._per_replica), sources=states)
