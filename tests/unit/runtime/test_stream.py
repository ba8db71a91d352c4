"""The stream engine: stages, dynamic batching, replicas, regions, sinks, on the real onnxruntime runner."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.errors import PipelineError
from runtime.batching import END, Batching, next_batch
from runtime.frame import Frame, SourceState
from runtime.pipeline import Pipeline
from runtime.prediction import Prediction
from runtime.runners.base import Feeds, Runner
from runtime.stream import ROI, Stream

BGR = {"red": (30, 40, 220), "green": (40, 200, 30), "blue": (210, 50, 40)}


class ListSource:
    """A finite in-memory source implementing the Source protocol (frames from a list of images)."""

    def __init__(self, source_id: str, images: list[np.ndarray], delay_s: float = 0.0) -> None:
        self.id, self._images, self._delay = source_id, images, delay_s
        self._next, self._released = 0, threading.Event()

    def read(self) -> Frame | None:
        if self._released.is_set() or self._next >= len(self._images):
            return None
        if self._delay:
            self._released.wait(self._delay)
        frame = Frame(self._images[self._next], self.id, self._next, time.time())
        self._next += 1
        return frame

    def release(self) -> None:
        self._released.set()

    @property
    def is_open(self) -> bool:
        return not self._released.is_set() and self._next < len(self._images)

    @property
    def state(self) -> SourceState:
        return SourceState(self.id, "open" if self.is_open else "ended", frames=self._next)


def solid(color: str, size: int = 24) -> np.ndarray:
    return np.full((size, size, 3), BGR[color], np.uint8)


def colors(n: int) -> list[str]:
    return [("red", "green", "blue")[i % 3] for i in range(n)]


@pytest.fixture
def pipeline(image_package: Path) -> Pipeline:
    with Pipeline.from_package(image_package, "onnxruntime-cpu", threads=1) as p:
        yield p


def test_every_frame_is_predicted_once_with_its_label(pipeline: Pipeline) -> None:
    names = colors(40)
    source = ListSource("cam0", [solid(c) for c in names])
    results = list(Stream(pipeline, [source], batching=Batching(max_batch=4, max_wait_ms=20)))
    assert sorted(r.frame.index for r in results) == list(range(40))
    assert all(r.prediction.label == names[r.frame.index] for r in results)
    assert all(r.prediction.backend == "onnxruntime-cpu" and r.latency_ms >= 0 for r in results)
    assert max(r.prediction.batch_size for r in results) > 1  # frames were batched


def test_stats_after_run(pipeline: Pipeline) -> None:
    stream = Stream(pipeline, [ListSource("a", [solid("red")] * 10), ListSource("b", [solid("blue")] * 7)],
                    batching=Batching(max_batch=8, max_wait_ms=5))
    stats = stream.run(timeout=30)
    assert stats.frames == 17 and stats.predictions == 17 and stats.errors == 0
    assert stats.batches >= 3 and 1.0 <= stats.mean_batch <= 8.0
    assert stats.fps > 0 and stats.latency_p99_ms >= stats.latency_p50_ms > 0
    assert "17 predictions" in stats.line()


def test_batching_off_runs_one_frame_per_inference(pipeline: Pipeline) -> None:
    results = list(Stream(pipeline, [ListSource("c", [solid("green")] * 6)], batching=Batching.off()))
    assert len(results) == 6 and {r.prediction.batch_size for r in results} == {1}


def test_two_replicas_share_the_work_and_agree(image_package: Path, pipeline: Pipeline) -> None:
    names = colors(60)
    stream = Stream(pipeline, [ListSource("cam", [solid(c) for c in names])], replicas=2, threads=1,
                    batching=Batching(max_batch=2, max_wait_ms=0))
    results = list(stream)
    assert len(results) == 60 and all(r.prediction.label == names[r.frame.index] for r in results)
    assert stream.stats().per_replica[0] > 0 and stream.stats().per_replica[1] > 0
    assert pipeline.selection.runner.is_active  # the pipeline's own runner is untouched


def test_regions_of_interest_are_predicted_separately(pipeline: Pipeline) -> None:
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, :20] = BGR["red"]
    frame[:, 20:] = BGR["blue"]
    rois = {"cam": {"left": [0, 0, 20, 20], "right": [20, 0, 20, 20]}}
    results = list(Stream(pipeline, [ListSource("cam", [frame] * 3)], rois=rois))
    by_roi = {(r.frame.index, r.roi): r.prediction for r in results}
    assert len(by_roi) == 6
    assert all(by_roi[(i, "left")].label == "red" and by_roi[(i, "right")].label == "blue" for i in range(3))
    assert by_roi[(0, "left")].extra["roi"] == "left"


def test_region_errors_are_clear(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match=r"region 'a' is \[0, 0, 0, 5\]"):
        ROI.parse("a", [0, 0, 0, 5])
    with pytest.raises(PipelineError, match="unknown source"):
        Stream(pipeline, [ListSource("cam", [solid("red")])], rois={"other": {"a": [0, 0, 5, 5]}})
    # A region outside the frame is an error for that frame only, counted, not fatal.
    stream = Stream(pipeline, [ListSource("cam", [solid("red", 8)] * 2)], rois={"cam": {"far": [100, 100, 5, 5]}})
    stats = stream.run(timeout=30)
    assert stats.predictions == 0 and stats.errors == 2 and "outside the 8x8 frame" in stats.last_error
    # one that reaches past the edge is refused too, not silently clipped (and squeezed into the model's input)
    stream = Stream(pipeline, [ListSource("cam", [solid("red", 8)])], rois={"cam": {"edge": [4, 4, 8, 8]}})
    stats = stream.run(timeout=30)
    assert stats.predictions == 0 and "region 'edge' [4, 4, 8, 8] reaches (12, 12), outside the 8x8 frame" \
        in stats.last_error


def test_a_failing_sink_does_not_stop_the_pipeline(pipeline: Pipeline) -> None:
    seen: list[tuple[Prediction, Frame]] = []

    def broken(prediction: Prediction, frame: Frame) -> None:
        raise OSError("disk full")

    stats = Stream(pipeline, [ListSource("cam", [solid("red")] * 12)],
                   sinks=[broken, lambda p, f: seen.append((p, f))]).run(timeout=30)
    assert len(seen) == 12 and stats.predictions == 12
    assert stats.sink_failures == {"broken": 12}


def test_leaving_the_loop_early_stops_the_sources(pipeline: Pipeline) -> None:
    source = ListSource("cam", [solid("red")] * 10_000)
    for i, _ in enumerate(Stream(pipeline, [source])):
        if i == 5:
            break
    assert not source.is_open and source._next < 10_000


class SlowRunner(Runner):
    """The real onnxruntime runner with a fixed delay per inference, like a model slower than the camera."""

    def __init__(self, inner: Runner, delay_s: float) -> None:
        super().__init__(inner.inputs, inner.outputs)
        self.inner, self.delay_s, self.backend = inner, delay_s, inner.backend

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return self.inner.infer(feeds)

    def _deactivate_impl(self) -> None:
        pass


def test_backpressure_bounds_memory_under_a_slow_runner(pipeline: Pipeline) -> None:
    """With the "all" policy a slow runner makes the source wait: queues stay within their bounds."""
    from dataclasses import replace

    slow = replace(pipeline.selection, runner=SlowRunner(pipeline.selection.runner, 0.02).activate())
    slow_pipeline = Pipeline(pipeline.manifest, slow, pipeline._encode, pipeline.package)
    source = ListSource("cam", [solid("green")] * 200)
    stream = Stream(slow_pipeline, [source], batching=Batching(max_batch=2, max_wait_ms=0), queue_size=4).start()
    time.sleep(0.3)
    depths = stream.stats().queue_depths
    read_so_far = source._next
    stream.stop(drain=False)
    assert all(depth <= 4 for depth in depths.values())
    assert read_so_far < 60  # the source was held back, not read to the end into memory


class Camera(ListSource):
    """A live source faster than the model: a new frame every ``period`` seconds, stamped when captured."""

    live = True

    def __init__(self, period: float) -> None:
        super().__init__("cam", [solid("red")] * 100_000, delay_s=period)


def test_latest_means_the_newest_frame_reaches_the_model_next(pipeline: Pipeline) -> None:
    """A 200 fps camera and a 50 ms model: under "latest" a result is one inference old (plus at most one
    frame period and the batching wait), not the several inferences frames used to queue inside the stream."""
    from dataclasses import replace

    from runtime.sources import PolicySource

    slow = replace(pipeline.selection, runner=SlowRunner(pipeline.selection.runner, 0.05).activate())
    slow_pipeline = Pipeline(pipeline.manifest, slow, pipeline._encode, pipeline.package)
    latencies = []
    for result in Stream(slow_pipeline, [PolicySource(Camera(0.005), policy="latest")],
                         batching=Batching(max_batch=8, max_wait_ms=2)):
        latencies.append(result.latency_ms)
        if len(latencies) == 12:
            break
    p50 = float(np.median(latencies[2:]))
    assert 50 <= p50 < 50 + 5 + 2 + 25, f"latest: p50 {p50:.0f} ms for a 50 ms model"


def test_next_batch_honours_max_wait() -> None:
    q: queue.Queue[object] = queue.Queue()
    abort = threading.Event()
    q.put(1)
    t0 = time.monotonic()
    items, ended = next_batch(q, Batching(max_batch=8, max_wait_ms=80), abort)
    waited = time.monotonic() - t0
    assert items == [1] and not ended and 0.075 <= waited < 1.0

    def late() -> None:
        time.sleep(0.02)
        q.put(2)
        time.sleep(0.3)
        q.put(3)

    q.put(1)
    threading.Thread(target=late).start()
    items, _ = next_batch(q, Batching(max_batch=8, max_wait_ms=150), abort)
    assert items == [1, 2]  # 2 came within the wait, 3 after it
    items, _ = next_batch(q, Batching(max_batch=8, max_wait_ms=0), abort)
    assert items == [3]


def test_next_batch_stops_at_max_batch_and_end() -> None:
    q: queue.Queue[object] = queue.Queue()
    for i in range(5):
        q.put(i)
    q.put(END)
    abort = threading.Event()
    assert next_batch(q, Batching(max_batch=3, max_wait_ms=1000), abort) == ([0, 1, 2], False)
    assert next_batch(q, Batching(max_batch=3, max_wait_ms=1000), abort) == ([3, 4], True)


@pytest.mark.parametrize("kwargs, match", [({"max_batch": 0}, "max_batch is 0"),
                                           ({"max_wait_ms": -1}, "max_wait_ms is -1")])
def test_batching_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        Batching(**kwargs)


def test_stream_refuses_text_models_and_bad_arguments(text_package: Path, pipeline: Pipeline) -> None:
    with Pipeline.from_package(text_package, "onnxruntime-cpu") as text, pytest.raises(PipelineError, match="image"):
        Stream(text, [ListSource("cam", [])])
    with pytest.raises(PipelineError, match="not unique"):
        Stream(pipeline, [ListSource("cam", []), ListSource("cam", [])])
    with pytest.raises(PipelineError, match="replicas is 0"):
        Stream(pipeline, [ListSource("cam", [])], replicas=0)
