"""``edge-sdk run PKG --source ...``: stream cameras, URLs, video files or folders through a package."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edge_sdk._cli_deploy import _at_least
from edge_sdk.errors import EdgeSDKError

PROGRESS_EVERY_S = 0.5  # the progress line on a terminal
PROGRESS_PLAIN_S = 10.0  # a progress line in a log file


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming (with --source)")
    g.add_argument("--source", action="append", metavar="[NAME=]SRC",
                   help="camera index, rtsp:// or http:// URL, GStreamer pipeline, video file or folder "
                        "(repeatable); NAME=SRC names it (the id in results, --rois and the CSV)")
    g.add_argument("--policy", choices=["all", "latest"], default="all",
                   help="all: every frame of files and folders, a live camera's frames while the model keeps "
                        "up (the oldest dropped beyond a short buffer); latest: the newest frame goes next")
    g.add_argument("--max-fps", type=float, help="cap each source's frame rate")
    g.add_argument("--watch", action="store_true", help="keep watching folders for new images")
    g.add_argument("--replicas", type=int, default=1, help="parallel runner copies (CPU threads are split)")
    g.add_argument("--max-wait-ms", type=float, help="dynamic batching: wait to fill a batch (default 4)")
    g.add_argument("--rois", help='JSON file: {"source id": {"region": [x, y, w, h]}}')
    g.add_argument("--save", help="a .csv file for one row per prediction, or a folder for annotated frames")
    g.add_argument("--limit", type=_at_least(1), help="stop after this many predictions (the CSV and folder "
                                                        "sinks get exactly as many)")
    g.add_argument("--duration", type=_seconds, help="stop after this many seconds, whether or not frames come")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


class _Limited:
    """A sink that passes the first ``limit`` predictions on and drops the rest (results still in flight
    when ``--limit`` stops the stream)."""

    def __init__(self, sink: Any, limit: int) -> None:
        self.sink, self.left, self.__name__ = sink, limit, getattr(sink, "__name__", type(sink).__name__)
        self._lock = threading.Lock()

    def __call__(self, prediction: Any, frame: Any) -> None:
        with self._lock:
            if self.left <= 0:
                return
            self.left -= 1
        self.sink(prediction, frame)


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
    if args.limit:
        sinks = [_Limited(sink, args.limit) for sink in sinks]
    batching = Batching(**{k: v for k, v in (("max_batch", args.batch), ("max_wait_ms", args.max_wait_ms))
                           if v is not None})
    interrupted = False
    try:
        stream = open_stream([int(s) if s.isascii() and s.isdigit() else s for s in args.source], args.package, backend=args.backend,
                             precision=args.precision, threads=args.threads, policy=args.policy,
                             max_fps=args.max_fps, watch=args.watch, rois=_rois(args.rois), batching=batching,
                             replicas=args.replicas, sinks=sinks)
        try:
            interrupted = _consume(stream, args)
            stats = stream.stats()
        finally:
            stream.close()
    finally:
        for closer in closers:
            closer.close()
    print(stats.line(), file=sys.stderr)
    for state in stats.sources:
        print(f"  {state.source_id}: {state.status}, {state.frames} frames, {state.dropped} dropped, "
              f"{state.reconnects} reconnects, {state.stalls} stalls"
              + (f", last error: {state.last_error}" if state.last_error else ""), file=sys.stderr)
    for name, count in stats.sink_failures.items():
        print(f"  sink {name} failed {count} times", file=sys.stderr)
    if stats.errors:
        print(f"  {stats.errors} errors; last: {stats.last_error}", file=sys.stderr)
    if stats.predictions:
        return 0
    why = "; ".join(f"{s.source_id}: {s.status}" + (f" ({s.last_error})" if s.last_error else "")
                    for s in stats.sources)
    print(f"edge-sdk: error: no prediction{' before the interrupt' if interrupted else ''}: "
          f"{stats.frames} frames read; {why}" + (f"; last error: {stats.last_error}" if stats.errors else ""),
          file=sys.stderr)
    return 1


class _Progress:
    """The progress line on stderr, redrawn every PROGRESS_EVERY_S by a ticker thread (so it moves, and
    names sources that are not open, even while no frame comes), and cleared before any log line so the
    two never share a line. Without a terminal a plain line is printed every PROGRESS_PLAIN_S instead."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.tty = stream, sys.stderr.isatty()
        self._lock, self._shown, self._stop = threading.Lock(), False, threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="edge-sdk-progress")
        self._handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
        self._emits = [h.emit for h in self._handlers]

    def __enter__(self) -> _Progress:
        for handler, emit in zip(self._handlers, self._emits):
            handler.emit = self._wrap(emit)  # type: ignore[method-assign]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.clear()
        for handler, emit in zip(self._handlers, self._emits):
            handler.emit = emit  # type: ignore[method-assign]

    def _wrap(self, emit: Any) -> Any:
        def emit_clear(record: logging.LogRecord) -> None:
            with self._lock:
                self._clear_locked()
                emit(record)
        return emit_clear

    def _tick(self) -> None:
        every = PROGRESS_EVERY_S if self.tty else PROGRESS_PLAIN_S
        while not self._stop.wait(every):
            stats = self.stream.stats()
            waiting = [f"{s.source_id} {s.status}" for s in stats.sources if s.status != "open"]
            line = stats.line() + (f"  [{', '.join(waiting)}]" if waiting else "")
            with self._lock:
                if self.tty:
                    sys.stderr.write(f"\r\x1b[K{line}")
                    self._shown = True
                else:
                    sys.stderr.write(line + "\n")
                sys.stderr.flush()

    def clear(self) -> None:
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


def _consume(stream: Any, args: argparse.Namespace) -> bool:
    """Print results until the stream ends, ``--limit`` results, ``--duration`` seconds (whether or not
    frames come) or Ctrl-C; True when interrupted. While it runs, Ctrl-C only asks the stream to stop
    (``Stream.interrupt``), so the stop and the summary happen outside the signal handler; a second
    Ctrl-C interrupts as Python does."""
    count, interrupted = 0, threading.Event()
    timer = threading.Timer(args.duration, stream.interrupt) if args.duration else None

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stream.interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        with _Progress(stream) as progress:
            if timer is not None:
                timer.daemon = True
                timer.start()
            for result in stream:
                count += 1
                if args.json:
                    p = result.prediction
                    line = json.dumps({"source": result.frame.source_id, "frame": result.frame.index,
                                       "roi": result.roi, "latency_ms": round(result.latency_ms, 3), **p.to_dict()})
                    progress.clear()
                    print(line, flush=True)
                if args.limit and count >= args.limit:
                    break
    except KeyboardInterrupt:  # the second Ctrl-C
        interrupted.set()
    finally:
        if timer is not None:
            timer.cancel()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        print("\ninterrupted; stopping", file=sys.stderr)
    return interrupted.is_set()
