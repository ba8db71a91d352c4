"""``edge_sdk.stream``: run an image package over cameras, streams, video files or folders.

    for result in edge_sdk.stream("rtsp://cam-3/line", "defects.edgepkg", policy="latest"):
        print(result.frame.index, result.prediction.label, f"{result.latency_ms:.0f} ms")
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

from edge_sdk.errors import PipelineError
from edge_sdk.model import Model
from runtime.batching import Batching
from runtime.frame import Source
from runtime.pipeline import Pipeline
from runtime.stream import Sink, Stream, StreamResult

SourceSpec = "str | int | os.PathLike[str] | Source"


def open_sources(
    source: Any, *, policy: str = "all", max_fps: float | None = None, watch: bool = False,
) -> list[Source]:
    """One source spec, or a list of them, -> opened sources (a ``Source`` object is used as it is)."""
    from runtime.sources import open_source

    specs = list(source) if isinstance(source, (list, tuple)) else [source]
    if not specs:
        raise PipelineError("no source given; expected a camera index, URL, GStreamer pipeline, video file or folder")
    opened: list[Source] = []
    for spec in specs:
        if isinstance(spec, Source):
            opened.append(spec)
        else:
            opened.append(open_source(spec, policy=policy, max_fps=max_fps, watch=watch))
    return opened


def _batching(batching: Batching | Mapping[str, Any] | int | None) -> Batching:
    if batching is None:
        return Batching()
    if isinstance(batching, Batching):
        return batching
    if isinstance(batching, int) and not isinstance(batching, bool):
        return Batching(max_batch=batching)
    if isinstance(batching, Mapping):
        return Batching(**batching)
    raise PipelineError(f"batching is {batching!r}; expected a Batching, {{'max_batch': 8, 'max_wait_ms': 4}}, "
                        "an int (max batch) or None")


def stream(
    source: Any,
    model: str | os.PathLike[str] | Model | Pipeline,
    *,
    backend: str | Sequence[str] = "auto",
    precision: str = "auto",
    threads: int | None = None,
    policy: str = "all",
    max_fps: float | None = None,
    watch: bool = False,
    rois: Mapping[str, Any] | None = None,
    batching: Batching | Mapping[str, Any] | int | None = None,
    replicas: int = 1,
    sinks: Sequence[Sink] = (),
    queue_size: int = 32,
) -> Iterator[StreamResult]:
    """Yield a :class:`StreamResult` per frame (per region of a frame) of ``source``.

    ``source``: a camera index, an RTSP/HTTP URL, a GStreamer pipeline, a video file, an image
    folder (``watch=True`` to wait for new files) or a list of them. ``policy`` is "all" (every
    frame; the source waits when the model is slower) or "latest" (stale frames are dropped);
    ``max_fps`` caps the rate. ``batching`` gathers frames across sources into one inference;
    ``replicas`` runs that many runner copies in parallel (threads split between them).
    ``rois`` is ``{source_id: {region: [x, y, w, h]}}``. Leaving the loop stops the stream.
    """
    owned: Pipeline | None = None
    if isinstance(model, Pipeline):
        pipeline = model
    elif isinstance(model, Model):
        pipeline = model._pipeline
    else:
        owned = pipeline = Pipeline.from_package(model, backend, threads=None if replicas > 1 else threads,
                                                 precision=precision)
    try:
        sources = open_sources(source, policy=policy, max_fps=max_fps, watch=watch)
        running = Stream(pipeline, sources, sinks=sinks, batching=_batching(batching), replicas=replicas,
                         threads=threads if replicas > 1 else None, rois=rois, queue_size=queue_size)
        yield from running
    finally:
        if owned is not None:
            owned.close()
