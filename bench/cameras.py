"""Benchmark: a live RTSP camera faster than the model, through the stream, and how fast a frozen camera is seen.

    python -m bench.cameras [--out build/bench/cameras.json] [--quick] [--camera-fps 60] [--seconds 10]

Also run at the end of ``python -m bench.pipeline`` (its "live RTSP" rows).

Camera: GStreamer's RTSP server (``tests.rtsp.RtspServer``, run by the system Python) on loopback,
``/live`` at ``--camera-fps`` (60) frames/s of 320x240 MJPEG: faster than the demo image model on
these cores. Model: the demo image package (``bench.daemon.package_for``), onnxruntime CPU, every
core's threads.

Baseline, in the same run: the model alone, ``runner.infer`` on one preprocessed frame, one at a
time (median of 50): one inference, the least a capture-to-result latency can be.

Rows, each ``--seconds`` (10; 5 with ``--quick``) after 2 s of warm-up, ``runtime.stream.Stream``
over ``open_source(url, policy=...)``, batching 8 frames / 4 ms:

* ``rtsp latest``: the newest frame goes to the model next;
* ``rtsp all``: every frame while the model keeps up; beyond the source's buffer (30 frames) the
  oldest are dropped.

Latency is capture to result: from the frame's timestamp (taken by the source's grabber thread as the
frame arrives from FFmpeg) to the end of postprocessing, p50 and p99 of every result after warm-up;
"x model" is p50 over the model-alone latency. "dropped" is the share of captured frames never
predicted.

Stall detection: a ``CaptureSource`` reading ``/live`` with ``stall_timeout`` 1 s and the default
(3 s); the server is frozen (SIGSTOP: connections stay up, nothing is sent, as with a pulled cable
behind a switch) and the time until the source reports "stalled" is measured, then the time from
thawing to the next frame ("recovery"); ``--repeat`` times (3), medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._log import Log

log = Log("cameras")
WARMUP_S = 2.0


def model_alone_ms(pipeline: Any, frame: np.ndarray) -> float:
    from runtime.preprocess.image import preprocess_image

    name = pipeline.manifest.inputs[0].name
    tensor = preprocess_image(frame, pipeline.manifest.preprocess)[None]
    runner = pipeline.selection.runner
    for _ in range(5):
        runner.infer({name: tensor})
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        runner.infer({name: tensor})
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stream_row(pipeline: Any, url: str, policy: str, seconds: float, model_ms: float) -> dict[str, Any]:
    from runtime.batching import Batching
    from runtime.sources import open_source
    from runtime.stream import Stream

    source = open_source(url, policy=policy)
    latencies: list[float] = []
    started = time.monotonic()
    stream = Stream(pipeline, [source], batching=Batching(max_batch=8, max_wait_ms=4))
    for result in stream:
        now = time.monotonic()
        if now - started >= WARMUP_S:
            latencies.append(result.latency_ms)
        if now - started >= WARMUP_S + seconds:
            break
    stats = stream.stats()
    state = stats.sources[0]
    captured = state.frames + state.dropped
    if not latencies:
        raise SystemExit(f"rtsp {policy}: no result after warm-up ({state.status}: {state.last_error})")
    p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
    row = {"policy": policy, "results": len(latencies), "fps": len(latencies) / seconds, "p50_ms": p50,
           "p99_ms": p99, "x_model": p50 / model_ms, "dropped_share": state.dropped / captured if captured else 0.0,
           "mean_batch": stats.mean_batch}
    log(f"rtsp {policy}: {row['fps']:.1f} fps, capture-to-result p50 {p50:.0f} ms p99 {p99:.0f} ms "
        f"({row['x_model']:.1f}x one inference), {100 * row['dropped_share']:.0f}% dropped")
    return row


def stall_row(server: Any, stall_timeout: float | None, repeat: int) -> dict[str, Any]:
    from runtime.sources import CaptureSource

    detected, recovered = [], []
    for _ in range(repeat):
        kwargs: dict[str, Any] = {} if stall_timeout is None else {"stall_timeout": stall_timeout}
        source = CaptureSource(server.url("/live"), backoff_initial=0.1, backoff_max=0.5, **kwargs)
        try:
            for _ in range(30):
                source.read()
            server.freeze()
            t0 = time.monotonic()
            while source.state.status != "stalled":
                if time.monotonic() - t0 > 30:
                    raise SystemExit("stall: not detected within 30 s")
                time.sleep(0.01)
            detected.append(time.monotonic() - t0)
            time.sleep(0.5)
            server.thaw()
            t1 = time.monotonic()
            while source.state.status != "open":
                source.read()
            recovered.append(time.monotonic() - t1)
        finally:
            server.thaw()
            source.release()
    timeout = 3.0 if stall_timeout is None else stall_timeout
    row = {"stall_timeout_s": timeout, "detected_s": statistics.median(detected),
           "x_timeout": statistics.median(detected) / timeout, "recovery_s": statistics.median(recovered),
           "samples": {"detected_s": detected, "recovery_s": recovered}}
    log(f"stall_timeout {timeout:g} s: stalled after {row['detected_s']:.2f} s ({row['x_timeout']:.2f}x the "
        f"timeout), frames again {row['recovery_s']:.2f} s after the server came back")
    return row


def measure(pipeline: Any, seconds: float, camera_fps: int, repeat: int) -> dict[str, Any]:
    """The live-RTSP rows; ``{"skipped": why}`` when GStreamer's RTSP server is not installed."""
    from tests.rtsp import RtspServer, rtsp_available

    why = rtsp_available()
    if why is not None:
        log(f"live RTSP rows skipped: {why}")
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="edge-bench-rtsp-") as tmp, \
            RtspServer(Path(tmp), fps=camera_fps) as server:
        model_ms = model_alone_ms(pipeline, np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8))
        log(f"model alone, one frame at a time: {model_ms:.1f} ms ({1e3 / model_ms:.0f} fps); camera {camera_fps} fps")
        rows = [stream_row(pipeline, server.url("/live"), policy, seconds, model_ms) for policy in ("latest", "all")]
        stalls = [stall_row(server, timeout, repeat) for timeout in (1.0, None)]
    return {"camera_fps": camera_fps, "model_alone_ms": model_ms, "seconds": seconds, "rows": rows, "stalls": stalls}


def print_rows(result: dict[str, Any], isa: str) -> None:
    if "skipped" in result:
        print(f"live RTSP rows skipped: {result['skipped']}")
        return
    print(f"\nlive RTSP camera at {result['camera_fps']} fps, model alone {result['model_alone_ms']:.1f} ms/frame "
          f"({isa}); latency from capture to result")
    print(f"{'row':<12} {'fps':>6} {'p50 ms':>7} {'p99 ms':>7} {'x model':>8} {'dropped':>8} {'batch':>6}")
    for r in result["rows"]:
        print(f"{'rtsp ' + r['policy']:<12} {r['fps']:>6.1f} {r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f} "
              f"{r['x_model']:>7.1f}x {100 * r['dropped_share']:>7.0f}% {r['mean_batch']:>6.1f}")
    for s in result["stalls"]:
        print(f"frozen camera, stall_timeout {s['stall_timeout_s']:g} s: stalled after {s['detected_s']:.2f} s, "
              f"frames again {s['recovery_s']:.2f} s after the server returned")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cameras", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/cameras.json"))
    parser.add_argument("--build", type=Path, default=Path("build/demo"))
    parser.add_argument("--work", type=Path, default=Path("build/bench/daemon"))
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--camera-fps", type=int, default=60)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import os

    from bench.int8 import isa_info
    from bench.daemon import package_for
    from bench.prune import ensure_built
    from runtime.pipeline import Pipeline

    ensure_built(args.build)
    args.work.mkdir(parents=True, exist_ok=True)
    package = package_for("image", args.build / "image", args.precision, args.work)
    with Pipeline.from_package(package, "onnxruntime-cpu", threads=os.cpu_count() or 1) as pipeline:
        result = measure(pipeline, args.seconds or (5.0 if args.quick else 10.0), args.camera_fps, args.repeat)
    isa = isa_info()["label"]
    result.update({"isa": isa, "package": str(package), "precision": args.precision})
    print_rows(result, isa)
    log.write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
