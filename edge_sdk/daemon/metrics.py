"""Prometheus metrics of the daemon, served at ``/metrics``.

:class:`Metrics` owns its own ``CollectorRegistry`` (never the global one), so tests and
several daemons in one process do not clash. Two kinds of values live here:

* Events the daemon *sees happen* (an inference, a request, an event, a fallback) go into
  ordinary ``prometheus_client`` counters and histograms.
* Values *owned elsewhere* (a source's cumulative frame count, a stream's queue depths, the
  device telemetry) are kept as the latest snapshot and turned into metric families by a
  custom collector at scrape time — the idiomatic shape for values that live in another
  object. Snapshots are pushed (``update_sources``, ``update_stream``, ``update_telemetry``)
  or pulled at scrape time from callbacks (``register_sources(key, lambda: ...)``). So a zone
  or source that disappears stops being exported, and counters follow the owner's totals
  exactly instead of being re-incremented by deltas.

A cumulative count that goes *down* (its owner was re-created and restarted from 0) carries
the last value over, so every ``*_total`` here is monotonic as Prometheus requires.
Label values are bounded sets: model, backend, source, stream, queue, fault, and the route
*name* of a request (never a raw URL path).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_sdk.errors import BackendUnavailableError

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise BackendUnavailableError(f"the daemon's metrics need the 'serve' extra ({exc.name} is missing)",
                                  hint="pip install 'edge-sdk[serve]'") from None

if TYPE_CHECKING:
    from devices.telemetry import Telemetry
    from runtime.frame import SourceState
    from runtime.stream import StreamStats

__all__ = ["LATENCY_BUCKETS", "Metrics"]

_log = logging.getLogger(__name__)

#: Inference latency buckets in seconds: 1 ms .. 2 s in 1-2-5 steps (+Inf is implicit).
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_MIB = 1024 * 1024

SourcesProvider = Callable[[], Iterable["SourceState"]]


class _Cumulative:
    """Counts owned elsewhere, made monotonic: a drop (owner restarted at 0) keeps what was seen."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], tuple[float, float]] = {}  # key -> (carried, last)

    def set(self, key: tuple[str, ...], value: float) -> float:
        carried, last = self._seen.get(key, (0.0, 0.0))
        if value < last:
            carried += last
        self._seen[key] = (carried, value)
        return carried + value


class _Rate:
    """Per-second rate of a monotonic count over the last ``window_s`` (at least two samples)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def add(self, key: str, now: float, total: float) -> None:
        samples = self._samples.setdefault(key, deque())
        samples.append((now, total))
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()

    def get(self, key: str) -> float | None:
        samples = self._samples.get(key)
        if not samples or len(samples) < 2:
            return None
        (t0, v0), (t1, v1) = samples[0], samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


@dataclass(frozen=True)
class _SourceRow:
    frames: float
    dropped: float
    reconnects: float
    up: bool
    stalls: float = 0.0


@dataclass(frozen=True)
class _StreamRow:
    queue_depths: Mapping[str, int]
    errors: float
    sink_failures: Mapping[str, float]


class Metrics:
    """Every metric of one daemon, in its own registry; ``render()`` is the ``/metrics`` body."""

    def __init__(self, *, fps_window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._lock = threading.RLock()
        self._cumulative = _Cumulative()
        self._source_fps = _Rate(fps_window_s)
        self._stream_fps = _Rate(fps_window_s)
        self._sources: dict[str, _SourceRow] = {}
        self._streams: dict[str, _StreamRow] = {}
        self._telemetry: Telemetry | None = None
        self._mqtt: tuple[int, bool, int] | None = None
        self._providers: dict[str, SourcesProvider] = {}
        self._failing: set[str] = set()
        self._model_labels: dict[str, tuple[str, str, str, str]] = {}
        self._define_instruments()
        self.registry.register(_SnapshotCollector(self))

    def _define_instruments(self) -> None:
        r = self.registry
        self._latency = Histogram("edge_sdk_inference_latency_seconds",
                                  "Inference latency of one call (a batch is one call).",
                                  ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self._predictions = Counter("edge_sdk_predictions", "Items predicted.", ["model"], registry=r)
        self._requests = Counter("edge_sdk_requests", "HTTP requests answered, by route name and status.",
                                 ["endpoint", "status"], registry=r)
        self._fallbacks = Counter("edge_sdk_backend_fallbacks",
                                  "Backends skipped when a model was loaded (the next one in its policy served).",
                                  ["model", "backend"], registry=r)
        self._model_info = Gauge("edge_sdk_model_info", "The model being served (always 1).",
                                 ["model", "version", "backend", "precision"], registry=r)
        self._events = Counter("edge_sdk_events", "Diagnosis events recorded, by fault.", ["fault"], registry=r)

    # -- events seen here ---------------------------------------------------------------------
    def observe_inference(self, model: str, backend: str, seconds: float, count: int = 1) -> None:
        """One inference call of ``count`` items that took ``seconds``."""
        self._latency.labels(model, backend).observe(seconds)
        self._predictions.labels(model).inc(count)

    def count_request(self, endpoint: str, status: int | str) -> None:
        """One answered request; ``endpoint`` is the route's name, not the raw path."""
        self._requests.labels(endpoint, str(status)).inc()

    def count_event(self, fault: str) -> None:
        self._events.labels(fault).inc()

    def set_model(self, name: str, version: str, backend: str, precision: str,
                  skipped: Iterable[tuple[str, str]] = ()) -> None:
        """The model ``name`` now serves (at load or reload); ``skipped`` is (backend, reason) pairs."""
        labels = (name, version, backend, precision)
        with self._lock:
            old = self._model_labels.get(name)
            if old is not None and old != labels:
                self._model_info.remove(*old)
            self._model_labels[name] = labels
        self._model_info.labels(*labels).set(1)
        for skipped_backend, reason in skipped:
            _log.debug("model %s: backend %s skipped: %s", name, skipped_backend, reason)
            self._fallbacks.labels(name, skipped_backend).inc()

    def set_outbox(self, size: int, connected: bool, dead_letters: int = 0) -> None:
        """The MQTT outbox; the gauges appear only once this was called (no MQTT, no series)."""
        with self._lock:
            self._mqtt = (size, connected, dead_letters)

    # -- snapshots of values owned elsewhere ----------------------------------------------------
    def update_sources(self, states: Iterable[SourceState]) -> None:
        """The current (cumulative) state of some sources; others keep their last snapshot."""
        now = self._clock()
        with self._lock:
            for state in states:
                sid = state.source_id
                frames = self._cumulative.set(("source_frames", sid), state.frames)
                self._sources[sid] = _SourceRow(
                    frames=frames,
                    dropped=self._cumulative.set(("source_dropped", sid), state.dropped),
                    reconnects=self._cumulative.set(("source_reconnects", sid), state.reconnects),
                    up=state.status == "open",
                    stalls=self._cumulative.set(("source_stalls", sid), state.stalls),
                )
                self._source_fps.add(sid, now, frames)

    def register_sources(self, key: str, provider: SourcesProvider) -> None:
        """Read ``provider()`` at every scrape (replaces an earlier provider under ``key``)."""
        with self._lock:
            self._providers[key] = provider
            self._failing.discard(key)

    def unregister_sources(self, key: str) -> None:
        with self._lock:
            self._providers.pop(key, None)

    def update_stream(self, name: str, stats: StreamStats) -> None:
        """A stream's stats: queue depths, predictions per second, errors; and its sources."""
        now = self._clock()
        with self._lock:
            predictions = self._cumulative.set(("stream_predictions", name), stats.predictions)
            self._stream_fps.add(name, now, predictions)
            self._streams[name] = _StreamRow(
                queue_depths=dict(stats.queue_depths),
                errors=self._cumulative.set(("stream_errors", name), stats.errors),
                sink_failures={sink: self._cumulative.set(("sink_failures", name, sink), count)
                               for sink, count in stats.sink_failures.items()},
            )
            self.update_sources(stats.sources)

    def update_telemetry(self, telemetry: Telemetry | None) -> None:
        """The latest device reading; it replaces the previous one whole."""
        with self._lock:
            self._telemetry = telemetry

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- used by the collector -----------------------------------------------------------------
    def _poll_providers(self) -> None:
        with self._lock:
            providers = list(self._providers.items())
        for key, provider in providers:
            try:
                states = list(provider())
            except Exception:  # noqa: BLE001 - a broken provider must not break the scrape
                if key not in self._failing:
                    self._failing.add(key)
                    _log.warning("metrics: source provider %r failed; keeping its last values", key,
                                 exc_info=True)
                continue
            self._failing.discard(key)
            self.update_sources(states)


class _SnapshotCollector(Collector):
    """Builds the snapshot-backed families of a :class:`Metrics` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        m._poll_providers()
        with m._lock:  # built whole under the lock, yielded after it is released
            families = [*self._sources(), *self._streams(), *self._telemetry(), *self._mqtt()]
        yield from families

    def _sources(self) -> Iterator[Metric]:
        m = self._m
        frames = CounterMetricFamily("edge_sdk_source_frames", "Frames delivered by a source.", labels=["source"])
        dropped = CounterMetricFamily("edge_sdk_source_dropped", "Frames a source read and discarded (stale or "
                                      "over max fps).", labels=["source"])
        reconnects = CounterMetricFamily("edge_sdk_source_reconnects", "Reconnections of a live source.",
                                         labels=["source"])
        fps = GaugeMetricFamily("edge_sdk_source_fps", "Frames per second delivered, over the last window.",
                                labels=["source"])
        stalls = CounterMetricFamily("edge_sdk_source_stalls", "Times a live source delivered no new frame (or "
                                     "only the same frame) within its stall timeout.", labels=["source"])
        up = GaugeMetricFamily("edge_sdk_source_up", "1 while the source is open (0 while stalled or reconnecting).",
                               labels=["source"])
        for sid, row in sorted(m._sources.items()):
            frames.add_metric([sid], row.frames)
            stalls.add_metric([sid], row.stalls)
            dropped.add_metric([sid], row.dropped)
            reconnects.add_metric([sid], row.reconnects)
            up.add_metric([sid], 1.0 if row.up else 0.0)
            rate = m._source_fps.get(sid)
            if rate is not None:
                fps.add_metric([sid], rate)
        yield from (frames, dropped, reconnects, stalls, fps, up)

    def _streams(self) -> Iterator[Metric]:
        m = self._m
        depth = GaugeMetricFamily("edge_sdk_queue_depth", "Items waiting in a stream's queue.",
                                  labels=["stream", "queue"])
        fps = GaugeMetricFamily("edge_sdk_stream_fps", "Predictions per second of a stream, over the last window.",
                                labels=["stream"])
        errors = CounterMetricFamily("edge_sdk_stream_errors", "Batches a stream failed to predict.",
                                     labels=["stream"])
        sinks = CounterMetricFamily("edge_sdk_sink_failures", "Calls of a sink that raised.",
                                    labels=["stream", "sink"])
        for name, row in sorted(m._streams.items()):
            for queue, size in sorted(row.queue_depths.items()):
                depth.add_metric([name, queue], size)
            rate = m._stream_fps.get(name)
            if rate is not None:
                fps.add_metric([name], rate)
            errors.add_metric([name], row.errors)
            for sink, count in sorted(row.sink_failures.items()):
                sinks.add_metric([name, sink], count)
        yield from (depth, fps, errors, sinks)

    def _mqtt(self) -> Iterator[Metric]:
        if self._m._mqtt is None:
            return
        size, connected, dead = self._m._mqtt
        yield GaugeMetricFamily("edge_sdk_mqtt_outbox_size", "Events waiting in the MQTT outbox.", value=size)
        yield GaugeMetricFamily("edge_sdk_mqtt_dead_letters", "Messages the broker refused, kept with the reason "
                                "(GET /v1/dead-letters).", value=dead)
        yield GaugeMetricFamily("edge_sdk_mqtt_connected", "1 while connected to the MQTT broker.",
                                value=1.0 if connected else 0.0)

    def _telemetry(self) -> Iterator[Metric]:
        t = self._m._telemetry
        if t is None:
            return
        temperature = GaugeMetricFamily("edge_sdk_device_temperature_celsius", "Temperature of a thermal zone.",
                                        labels=["zone"])
        for zone, celsius in sorted(t.temperatures.items()):
            temperature.add_metric([zone], celsius)
        power = GaugeMetricFamily("edge_sdk_device_power_milliwatts", "Current power of a rail (tegrastats).",
                                  labels=["rail"])
        for rail, milliwatts in sorted(t.power_mw.items()):
            power.add_metric([rail], milliwatts)
        yield from (temperature, power)
        if t.ram_used_mb is not None:
            yield GaugeMetricFamily("edge_sdk_device_ram_used_bytes", "RAM in use (shared by CPU and GPU on "
                                    "Jetson).", value=t.ram_used_mb * _MIB)
        if t.ram_total_mb is not None:
            yield GaugeMetricFamily("edge_sdk_device_ram_total_bytes", "RAM in total.", value=t.ram_total_mb * _MIB)
        if t.gpu_percent is not None:
            yield GaugeMetricFamily("edge_sdk_device_gpu_utilization_ratio", "GPU load, 0..1 (tegrastats GR3D).",
                                    value=t.gpu_percent / 100.0)
        if (cpu := t.cpu_mean_percent) is not None:
            yield GaugeMetricFamily("edge_sdk_device_cpu_utilization_ratio", "Mean load of the online CPU cores, "
                                    "0..1.", value=cpu / 100.0)
