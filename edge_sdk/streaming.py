"""``edge_sdk.stream``: run an image package over cameras, streams, video files or folders.

    stream = edge_sdk.stream("rtsp://cam-3/line", "defects.edgepkg", policy="latest")
    for result in stream:
        print(result.frame.index, result.prediction.label, f"{result.latency_ms:.0f} ms")
    print(stream.stats().line())
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from edge_sdk.errors import PipelineError
from edge_sdk.model import Model
from runtime.batching import Batching
from runtime.frame import Source
from runtime.pipeline import Pipeline
from runtime.stream import Sink, Stream

def open_sources(
    source: Any, *, policy: str = "all", max_fps: float | None = None, watch: bool = False, realtime: bool = False,
) -> list[Source]:
    """One source spec, a list of them, or ``{name: spec}``, -> opened sources.

    A spec string may name its source: ``"press-3=rtsp://nvr/live?channel=3"``. Unnamed specs get
    readable ids (``cam0``, a URL's host and path, a folder's name), made unique where two would clash
    (the URL's query, the folder's parents). A ``Source`` object is used as it is, wrapped in a
    ``PolicySource`` when ``policy`` or ``max_fps`` ask for it; ``watch`` and ``realtime`` choose how a
    spec is opened, so they are refused for a ``Source`` object rather than ignored; ``watch`` applies
    to the folders among several sources.
    """
    from runtime.sources import PolicySource, open_source
    from runtime.sources._spec import classify, split_name, unique_ids

    if isinstance(source, Mapping):
        entries: list[tuple[str | None, Any]] = [(str(name), spec) for name, spec in source.items()]
    else:
        specs = list(source) if isinstance(source, (list, tuple)) else [source]
        entries = [split_name(spec) if isinstance(spec, str) else (None, spec) for spec in specs]
    if not entries:
        raise PipelineError("no source given; expected a camera index, URL, GStreamer pipeline, video file or folder")
    classified = {i: classify(spec) for i, (_, spec) in enumerate(entries) if not isinstance(spec, Source)}
    kinds = {i: found.kind for i, found in classified.items()}
    if watch and kinds and "folder" not in kinds.values():
        raise PipelineError("watch=True applies to image folders, and no source is one",
                            hint="drop watch=True, or add a folder")
    unnamed = [i for i in classified if entries[i][0] is None]
    defaults = dict(zip(unnamed, unique_ids([classified[i] for i in unnamed])))
    opened: list[Source] = []
    for i, (name, spec) in enumerate(entries):
        if isinstance(spec, Source):
            if watch or realtime:
                raise PipelineError(f"watch/realtime apply when a source is opened from a spec; {spec.id!r} is "
                                    "already a Source object", hint="open it with open_source(..., watch=, realtime=)")
            opened.append(PolicySource(spec, policy=policy, max_fps=max_fps)
                          if policy != "all" or max_fps is not None else spec)
        else:
            opened.append(open_source(spec, source_id=name or defaults[i], policy=policy, max_fps=max_fps,
                                      watch=watch and kinds[i] == "folder", realtime=realtime))
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
    realtime: bool = False,
    rois: Mapping[str, Any] | None = None,
    batching: Batching | Mapping[str, Any] | int | None = None,
    replicas: int = 1,
    sinks: Sequence[Sink] = (),
    queue_size: int | None = None,
) -> Stream:
    """A :class:`~runtime.stream.Stream` over ``source``: iterate it for a :class:`StreamResult` per
    frame (per region of a frame), call ``.stats()`` for fps, latency, drops and errors.

    ``source``: a camera index, an RTSP/HTTP URL, a GStreamer pipeline, a video file
    (``realtime=True`` replays it at its recorded rate), an image folder (``watch=True`` waits
    for new files), a ``Source`` object, a list of them, or ``{name: spec}``; a spec string may be
    named as ``"NAME=SPEC"``. ``policy`` is "all" (every frame of a file or folder; a live camera's
    frames while the model keeps up, the oldest dropped beyond a short buffer) or "latest" (the newest
    frame goes to the model next; stale ones are dropped); ``max_fps`` caps the rate. ``batching`` gathers frames across sources into one inference; ``replicas``
    runs that many runner copies in parallel (``threads`` split between them). ``rois`` is
    ``{source_id: {region: [x, y, w, h]}}``. ``queue_size``: frames held between stages (default 32,
    or 2 when a source is "latest", so that latest means the newest frame). Leaving the loop early stops the stream; a package
    opened here is closed with it. ``backend``, ``precision`` (and ``threads`` with one replica)
    apply when ``model`` is a path; a loaded ``Model``/``Pipeline`` already has them.
    """
    if isinstance(model, (Pipeline, Model)):
        given: dict[str, Any] = {k: v for k, v in (("backend", backend), ("precision", precision)) if v != "auto"}
        if threads is not None and replicas == 1:
            given["threads"] = threads
        if given:
            raise PipelineError(f"{sorted(given)} cannot change an already loaded model",
                                hint="pass them to edge_sdk.load(...), or pass the package path to stream()")
        pipeline, owned = (model if isinstance(model, Pipeline) else model._pipeline), False
    else:
        pipeline = Pipeline.from_package(model, backend, threads=None if replicas > 1 else threads,
                                         precision=precision)
        owned = True
    try:
        sources = open_sources(source, policy=policy, max_fps=max_fps, watch=watch, realtime=realtime)
        return Stream(pipeline, sources, sinks=sinks, batching=_batching(batching), replicas=replicas,
                      threads=threads if replicas > 1 else None, rois=rois, queue_size=queue_size,
                      close_pipeline=owned)
    except BaseException:
        if owned:
            pipeline.close()
        raise
