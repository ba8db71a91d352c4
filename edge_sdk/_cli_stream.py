"""``edge-sdk run PKG --source ...``: stream cameras, URLs, video files or folders through a package."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edge_sdk.errors import EdgeSDKError

PROGRESS_EVERY_S = 0.5


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming (with --source)")
    g.add_argument("--source", action="append", metavar="SRC",
                   help="camera index, rtsp:// or http:// URL, GStreamer pipeline, video file or folder (repeatable)")
    g.add_argument("--policy", choices=["all", "latest"], default="all",
                   help="all: every frame (the source waits); latest: drop stale frames under load")
    g.add_argument("--max-fps", type=float, help="cap each source's frame rate")
    g.add_argument("--watch", action="store_true", help="keep watching folders for new images")
    g.add_argument("--replicas", type=int, default=1, help="parallel runner copies (CPU threads are split)")
    g.add_argument("--max-wait-ms", type=float, help="dynamic batching: wait to fill a batch (default 4)")
    g.add_argument("--rois", help='JSON file: {"source id": {"region": [x, y, w, h]}}')
    g.add_argument("--save", help="a .csv file for one row per prediction, or a folder for annotated frames")
    g.add_argument("--limit", type=int, help="stop after this many predictions")
    g.add_argument("--duration", type=float, help="stop after this many seconds")


def _sinks(save: str | None) -> tuple[list[Any], list[Any]]:
    from runtime.sinks import AnnotatedFrameSink, CsvSink

    if not save:
        return [], []
    if save.lower().endswith(".csv"):
        sink = CsvSink(save)
        return [sink], [sink]
    return [AnnotatedFrameSink(save)], []


def _rois(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeSDKError(f"regions file {path!r} cannot be read as JSON: {exc}",
                           hint='write {"cam0": {"left": [0, 0, 320, 240]}}') from None
    if not isinstance(data, dict):
        raise EdgeSDKError(f"regions file {path!r} holds a {type(data).__name__}; expected a JSON object")
    return data


def run_sources(args: argparse.Namespace) -> int:
    from edge_sdk.streaming import stream as open_stream
    from runtime.batching import Batching

    sinks, closers = _sinks(args.save)
    batching = Batching(**{k: v for k, v in (("max_batch", args.batch), ("max_wait_ms", args.max_wait_ms))
                           if v is not None})
    try:
        stream = open_stream([int(s) if s.isdigit() else s for s in args.source], args.package, backend=args.backend,
                             precision=args.precision, threads=args.threads, policy=args.policy,
                             max_fps=args.max_fps, watch=args.watch, rois=_rois(args.rois), batching=batching,
                             replicas=args.replicas, sinks=sinks)
        try:
            _consume(stream, args)
            stats = stream.stats()
        finally:
            stream.close()
    finally:
        for closer in closers:
            closer.close()
    print(f"\r{stats.line()}", file=sys.stderr)
    for state in stats.sources:
        print(f"  {state.source_id}: {state.status}, {state.frames} frames, {state.dropped} dropped, "
              f"{state.reconnects} reconnects" + (f", last error: {state.last_error}" if state.last_error else ""),
              file=sys.stderr)
    for name, count in stats.sink_failures.items():
        print(f"  sink {name} failed {count} times", file=sys.stderr)
    if stats.errors:
        print(f"  {stats.errors} errors; last: {stats.last_error}", file=sys.stderr)
    return 0 if stats.predictions or not stats.frames else 1


def _consume(stream: Any, args: argparse.Namespace) -> None:
    start = last = time.monotonic()
    count = 0
    try:
        for result in stream:
            count += 1
            p = result.prediction
            if args.json:
                print(json.dumps({"source": result.frame.source_id, "frame": result.frame.index, "roi": result.roi,
                                  "latency_ms": round(result.latency_ms, 3), **p.to_dict()}), flush=True)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                print(f"\r{stream.stats().line()}", end="", file=sys.stderr, flush=True)
                last = now
            if (args.limit and count >= args.limit) or (args.duration and now - start >= args.duration):
                break
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
