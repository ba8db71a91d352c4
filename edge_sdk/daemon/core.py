"""The daemon's engine, without HTTP: models, sources, fusion, events, MQTT, metrics.

``Daemon.start()`` loads and verifies every model (a model that fails its checks stops the
start), opens the event store, starts the MQTT publisher and one stream per model over its
configured sources. Every prediction about an asset (a camera frame, an uploaded image, a
report) becomes evidence; when the fused diagnosis matches the event rules (and the same
asset and fault did not raise an event within the cooldown) it is stored with a snapshot and
queued for MQTT in one transaction. ``stop()`` drains the streams, then flushes the outbox.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import cv2
import numpy as np

from edge_sdk.daemon.config import DaemonConfig, SourceConfig
from edge_sdk.daemon.models import ModelRegistry
from edge_sdk.errors import DaemonError, EdgeSDKError
from runtime.diagnosis import Diagnoser, pick_model
from runtime.frame import Frame
from runtime.fusion import Diagnosis, Fuser, FusionRule
from runtime.manifest import ImagePreprocess, Manifest
from runtime.prediction import Prediction
from runtime.sinks import heat_map

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 600.0
SNAPSHOT_QUALITY = 85


COOLDOWN_KEYS = 10_000  # (asset, fault) pairs remembered for the cooldown before the expired ones are dropped


@dataclass(frozen=True)
class Outcome:
    """What one input produced: its prediction, the asset's diagnosis and the stored event id."""

    prediction: Prediction
    diagnosis: Diagnosis | None
    event_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"prediction": self.prediction.to_dict(),
                "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None, "event": self.event_id}


class _Served:
    """The daemon's models as :class:`runtime.diagnosis.Models`: the registry's current packages, named as
    configured, predicted through the daemon (leases and metrics)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._daemon.registry.names)

    def manifest(self, name: str) -> Manifest:
        return self._daemon.registry.current(name).manifest

    def predict(self, name: str, items: list[Any]) -> list[Prediction]:
        return self._daemon.predict(name, items)


class Daemon:
    """Everything ``edge-sdk serve`` runs, behind methods the HTTP layer calls. Fusion, model choice and
    knowledge-base lookups are :class:`runtime.diagnosis.Diagnoser`'s, over the daemon's registry."""

    def __init__(self, config: DaemonConfig) -> None:
        from edge_sdk.daemon.console.live import LiveFrames
        from edge_sdk.daemon.metrics import Metrics

        self.config = config
        self.registry = ModelRegistry(config.models, config.trust.keys, model_dirs=config.server.model_dirs,
                                      state_dir=config.storage.dir)
        self.metrics = Metrics()
        self.live = LiveFrames({s.name: s.rois for s in config.sources.values() if s.rois})  # the console's view
        self.rule = FusionRule.from_dict(config.fusion) if config.fusion is not None else None
        self.diagnoser: Diagnoser | None = None
        self.knowledge: Any = None
        self.store: Any = None
        self.publisher: Any = None
        self.telemetry: Any = None
        self._streams: dict[str, tuple[Any, threading.Thread]] = {}
        self._last_event: dict[tuple[str, str], float] = {}
        self._event_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = False
        self.started_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Daemon:
        from edge_sdk.daemon.events import EventStore

        self.started_at = time.time()
        self.config.storage.dir.mkdir(parents=True, exist_ok=True)
        self.store = EventStore(self.config.storage.dir, max_age_s=self.config.storage.max_age_s,
                                max_bytes=self.config.storage.max_bytes)
        self.registry.load_all()
        for name in self.registry.names:
            self._publish_model_metrics(name)
        if self.config.knowledge_base is not None:
            from runtime.knowledge import KnowledgeBase
            from runtime.package import Package

            verified = Package.open(self.config.knowledge_base.package, trusted_keys=self.config.trust.keys)
            self.knowledge = KnowledgeBase.from_package(verified)
        if self.rule is not None:  # checks every model against the rule: one that does not fit stops the start
            kb = self.config.knowledge_base
            self.diagnoser = Diagnoser(self.rule, _Served(self), knowledge=self.knowledge,
                                       similar_k=kb.k if kb is not None else 3)
        if self.config.mqtt is not None:
            from edge_sdk.daemon.mqtt import MqttPublisher

            self.publisher = MqttPublisher(self.config.mqtt, self.store)
            self.publisher.start()
        self._start_telemetry()
        for model in {s.model for s in self.config.sources.values()}:
            self._start_streams(model)
        threading.Thread(target=self._housekeeping, name="edge-sdk-housekeeping", daemon=True).start()
        self._ready = True
        log.info("daemon ready: models %s, sources %s", list(self.registry.names), list(self.config.sources))
        return self

    @property
    def ready(self) -> bool:
        return self._ready and not self._stop.is_set()

    def stop(self, timeout: float = 20.0) -> None:
        """Drain the streams, store what they produced, flush the MQTT outbox, close everything."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._ready = False
        for model in list(self._streams):
            self._stop_streams(model, timeout)
        if self.publisher is not None:
            self.publisher.stop(timeout)
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.knowledge is not None:
            self.knowledge.close()
        self.registry.close()
        if self.store is not None:
            self.store.close()
        log.info("daemon stopped")

    @property
    def fuser(self) -> Fuser | None:
        return self.diagnoser.fuser if self.diagnoser is not None else None

    def _publish_model_metrics(self, name: str) -> None:
        info = self.registry.info(name)
        self.metrics.set_model(name, info["version"], info["backend"], info["precision"],
                               [(s["backend"], s["reason"]) for s in info["skipped_backends"]])

    def _start_telemetry(self) -> None:
        try:
            from devices.telemetry import TelemetrySampler

            self.telemetry = TelemetrySampler()
            self.telemetry.start()
        except Exception as exc:  # telemetry is best effort: never stops the daemon
            log.warning("device telemetry unavailable: %s", exc)
            self.telemetry = None

    def _housekeeping(self) -> None:
        last_retention = 0.0
        while not self._stop.wait(1.0):
            if self.telemetry is not None and (t := self.telemetry.latest()) is not None:
                self.metrics.update_telemetry(t)
            if self.publisher is not None:
                state = self.publisher.state
                self.metrics.set_outbox(self.store.outbox_size(), state.connected, state.dead_letters)
            for model, (stream, _) in list(self._streams.items()):
                self.metrics.update_stream(model, stream.stats())
            if time.monotonic() - last_retention > RETENTION_EVERY_S:
                last_retention = time.monotonic()
                try:
                    removed = self.store.enforce_retention()
                    if removed:
                        log.info("retention removed %d events", removed)
                except EdgeSDKError as exc:
                    log.warning("retention failed: %s", exc)

    # -- streams -----------------------------------------------------------------------------
    def _start_streams(self, model: str) -> None:
        from runtime.batching import Batching
        from runtime.sources import open_source
        from runtime.stream import Stream

        configs = [s for s in self.config.sources.values() if s.model == model]
        if not configs:
            return
        pipeline = self.registry.current(model)
        if not isinstance(pipeline.manifest.preprocess, ImagePreprocess):
            raise DaemonError(f"sources {[s.name for s in configs]} use model {model!r}, which is not an image model")
        sources = [open_source(s.uri, source_id=s.name, policy=s.policy, max_fps=s.max_fps, watch=s.watch,
                               **s.source_options()) for s in configs]
        p = self.config.pipeline
        stream = Stream(pipeline, sources, sinks=[self._frame_sink({s.name: s for s in configs}, model)],
                        batching=Batching(p.max_batch, p.max_wait_ms), replicas=p.replicas,
                        rois={s.name: s.rois for s in configs if s.rois})
        self.metrics.register_sources(model, lambda: [src.state for src in sources])

        def run() -> None:
            with self.registry.lease(model):  # the model stays open while the stream uses it
                stream.run()

        thread = threading.Thread(target=run, name=f"edge-sdk-stream-{model}", daemon=True)
        self._streams[model] = (stream, thread)
        thread.start()

    def _stop_streams(self, model: str, timeout: float) -> None:
        entry = self._streams.pop(model, None)
        if entry is not None:
            stream, thread = entry
            stream.stop(drain=True, timeout=timeout)
            thread.join(timeout)

    def _frame_sink(self, sources: Mapping[str, SourceConfig], model: str) -> Any:
        def sink(prediction: Prediction, frame: Frame) -> None:
            self.metrics.observe_inference(model, prediction.backend,
                                           prediction.timings.inference_ms / 1e3 / prediction.batch_size)
            self.live.observe(frame, prediction)
            source = sources[frame.source_id]
            roi = prediction.extra.get("roi")
            self.record(source.asset_of(roi), prediction, kind="image", source=frame.source_id, model=model,
                        timestamp=frame.timestamp, ref=frame.index, image=frame.image)

        return sink

    # -- requests ----------------------------------------------------------------------------
    def infer(self, model: str, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Any]:
        with self.registry.lease(model) as pipeline:
            started = time.perf_counter()
            outputs = pipeline.infer(feeds)
            self.metrics.observe_inference(model, pipeline.backend, time.perf_counter() - started)
            return outputs, pipeline.manifest

    def predict(self, model: str, items: list[Any]) -> list[Prediction]:
        with self.registry.lease(model) as pipeline:
            started = time.perf_counter()
            predictions = pipeline.predict_batch(items)
            self.metrics.observe_inference(model, pipeline.backend, time.perf_counter() - started, len(items))
            return predictions

    def pick_model(self, kind: str, model: str | None) -> str:
        return pick_model(_Served(self), kind, model)

    def diagnose_text(self, asset: str, text: str, model: str | None = None,
                      reply: tuple[str, str] | None = None) -> Outcome:
        """``reply`` = (Idempotency-Key, request fingerprint): the answer is kept for a retry (Api.diagnose)."""
        if self.diagnoser is None:
            return Outcome(self.predict(self.pick_model("text", model), [text])[0], None, None)
        prediction, diagnosis = self.diagnoser.observe(asset, "text", text, model=model, source="report")
        return self._answered(prediction, diagnosis, None, reply)

    def diagnose_image(self, asset: str, image: np.ndarray, model: str | None = None,
                       source: str = "upload", reply: tuple[str, str] | None = None) -> Outcome:
        if self.diagnoser is None:
            return Outcome(self.predict(self.pick_model("image", model), [image])[0], None, None)
        prediction, diagnosis = self.diagnoser.observe(asset, "image", image, model=model, source=source)
        return self._answered(prediction, diagnosis, image, reply)

    def _answered(self, prediction: Prediction, diagnosis: Diagnosis, image: np.ndarray | None,
                  reply: tuple[str, str] | None) -> Outcome:
        """The outcome, its event stored when the rules call for one; with ``reply`` the answer is kept with
        the event (one transaction) or, when there is none, on its own."""
        def answer(event_id: int | None) -> str:
            return json.dumps(Outcome(prediction, diagnosis, event_id).to_dict())

        keep = (reply[0], reply[1], answer) if reply is not None else None
        outcome = Outcome(prediction, diagnosis, self._maybe_event(diagnosis, image, prediction, keep))
        if reply is not None and outcome.event_id is None and self.store is not None:
            self.store.keep_reply(reply[0], reply[1], answer(None))
        return outcome

    def record(self, asset: str, prediction: Prediction, *, kind: str, source: str, model: str,
               timestamp: float | None = None, ref: Any = None, image: np.ndarray | None = None) -> Outcome:
        """Add a prediction of the served ``model`` as evidence about ``asset``; store an event when the
        diagnosis calls for one."""
        if self.diagnoser is None:
            return Outcome(prediction, None, None)
        diagnosis = self.diagnoser.add(asset, prediction, kind=kind, source=source, timestamp=timestamp, ref=ref,
                                       model=model)
        return Outcome(prediction, diagnosis, self._maybe_event(diagnosis, image, prediction))

    def _maybe_event(self, d: Diagnosis, image: np.ndarray | None, prediction: Prediction | None = None,
                     reply: tuple[str, str, Callable[[int], str]] | None = None) -> int | None:
        rules = self.config.events
        if not rules.matches(d.fault, d.is_fault, d.confidence) or self.store is None or self._stop.is_set():
            return None
        key = (d.asset_id, d.fault)
        with self._event_lock:
            now = time.monotonic()
            if now - self._last_event.get(key, -1e18) < rules.cooldown_s:
                return None
            if len(self._last_event) >= COOLDOWN_KEYS:  # only keys still cooling down matter; then the newest
                live = sorted((t, k) for k, t in self._last_event.items() if now - t < rules.cooldown_s)
                self._last_event = {k: t for t, k in live[len(live) - COOLDOWN_KEYS // 2:]}
            self._last_event[key] = now
        snapshot = None
        if rules.snapshots and image is not None:
            shown = heat_map(image, prediction) if prediction is not None else image  # where it looks anomalous
            ok, data = cv2.imencode(".jpg", shown, [cv2.IMWRITE_JPEG_QUALITY, SNAPSHOT_QUALITY])
            snapshot = data.tobytes() if ok else None
        event = self.store.add(d.asset_id, d.fault, d.confidence, d.to_dict(), snapshot=snapshot, timestamp=d.timestamp,
                               reply=reply)
        self.metrics.count_event(d.fault)
        if self.publisher is not None:
            self.publisher.notify()
        log.info("event %d: %s on %s (%.2f)", event.id, d.fault, d.asset_id, d.confidence)
        return int(event.id)

    def swap(self, model: str, package: str | None = None) -> dict[str, Any]:
        """Hot swap: verify the new package, swap it in, restart the model's streams on it."""
        diagnoser = self.diagnoser
        check = (lambda p: diagnoser.check(model, p.manifest)) if diagnoser is not None else None
        info = self.registry.swap(model, package, check=check)
        self._publish_model_metrics(model)
        if model in self._streams:
            self._stop_streams(model, timeout=20.0)
            self._start_streams(model)
        return info

    def sources(self) -> list[dict[str, Any]]:
        out = []
        for model, (stream, _) in self._streams.items():
            for state in stream.stats().sources:
                live = self.live.stats(state.source_id)
                out.append({"source": state.source_id, "model": model, "status": state.status, "frames": state.frames,
                            "dropped": state.dropped, "reconnects": state.reconnects, "last_error": state.last_error,
                            "fps": live["fps"], "latency_ms": live["latency_ms"]})
        return out
