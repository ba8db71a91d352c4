"""edge_sdk.daemon.metrics: scrape render() and read it back with prometheus_client's parser."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devices.telemetry import parse_tegrastats, read_sysfs
from edge_sdk.daemon.metrics import LATENCY_BUCKETS, Metrics
from runtime.frame import SourceState
from runtime.stream import StreamStats

ORIN_LINE = (
    "RAM 2448/7772MB (lfb 1x4MB) SWAP 0/3886MB CPU [12%@1190,8%@1190,off,off] EMC_FREQ 0% GR3D_FREQ 37% "
    "cpu@43.5C soc2@41.8C gpu@42.1C tj@43.6C VDD_IN 4316mW/4316mW VDD_CPU_GPU_CV 482mW/482mW VDD_SOC 1324mW/1324mW"
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain") and isinstance(body, bytes)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples, prefix: str) -> set[str]:
    return {name for name, _ in samples if name.startswith(prefix)}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(sid: str, status: str = "open", frames: int = 0, dropped: int = 0, reconnects: int = 0) -> SourceState:
    return SourceState(source_id=sid, status=status, frames=frames, dropped=dropped, reconnects=reconnects)


def stream_stats(predictions: int, *, errors: int = 0, queues: dict[str, int] | None = None,
                 sinks: dict[str, int] | None = None, sources: Iterable[SourceState] = ()) -> StreamStats:
    return StreamStats(elapsed_s=10.0, frames=predictions, predictions=predictions, fps=1.0, latency_p50_ms=5.0,
                       latency_p99_ms=9.0, dropped=0, batches=predictions, mean_batch=1.0, errors=errors,
                       last_error="", sink_failures=sinks or {}, queue_depths=queues or {}, per_replica=(predictions,),
                       sources=tuple(sources))


def test_inference_latency_histogram_and_predictions() -> None:
    m = Metrics()
    m.observe_inference("defects", "onnxruntime-cpu", 0.004)
    m.observe_inference("defects", "onnxruntime-cpu", 0.3, count=8)
    m.observe_inference("defects", "tensorrt", 0.0015)
    s = scrape(m)
    cpu = {"model": "defects", "backend": "onnxruntime-cpu"}
    assert value(s, "edge_sdk_inference_latency_seconds_bucket", **cpu, le="0.002") == 0
    assert value(s, "edge_sdk_inference_latency_seconds_bucket", **cpu, le="0.005") == 1
    assert value(s, "edge_sdk_inference_latency_seconds_bucket", **cpu, le="0.5") == 2
    assert value(s, "edge_sdk_inference_latency_seconds_bucket", **cpu, le="+Inf") == 2
    assert value(s, "edge_sdk_inference_latency_seconds_count", **cpu) == 2
    assert value(s, "edge_sdk_inference_latency_seconds_sum", **cpu) == pytest.approx(0.304)
    assert value(s, "edge_sdk_inference_latency_seconds_count", model="defects", backend="tensorrt") == 1
    assert value(s, "edge_sdk_predictions_total", model="defects") == 10
    buckets = {float(dict(labels)["le"]) for name, labels in s if name.endswith("_bucket")} - {float("inf")}
    assert buckets == set(LATENCY_BUCKETS) and min(buckets) == 0.001 and max(buckets) == 2.0


def test_requests_events_and_outbox() -> None:
    m = Metrics()
    for status in (200, 200, 401):
        m.count_request("predict_image", status)
    m.count_event("bearing")
    m.count_event("bearing")
    m.count_event("leak")
    assert not names(scrape(m), "edge_sdk_mqtt_")  # no MQTT configured: no series, not a false "down"
    m.set_outbox(17, connected=False)
    s = scrape(m)
    assert value(s, "edge_sdk_requests_total", endpoint="predict_image", status="200") == 2
    assert value(s, "edge_sdk_requests_total", endpoint="predict_image", status="401") == 1
    assert value(s, "edge_sdk_events_total", fault="bearing") == 2
    assert value(s, "edge_sdk_events_total", fault="leak") == 1
    assert value(s, "edge_sdk_mqtt_outbox_size") == 17 and value(s, "edge_sdk_mqtt_connected") == 0
    m.set_outbox(0, connected=True, dead_letters=2)
    s = scrape(m)
    assert value(s, "edge_sdk_mqtt_outbox_size") == 0 and value(s, "edge_sdk_mqtt_connected") == 1
    assert value(s, "edge_sdk_mqtt_dead_letters") == 2


def test_model_info_and_fallbacks_follow_reloads() -> None:
    m = Metrics()
    m.set_model("defects", "1.0", "onnxruntime-cpu", "int8",
                [("tensorrt", "tensorrt is not installed"), ("onnxruntime-cuda", "no CUDA provider")])
    s = scrape(m)
    assert value(s, "edge_sdk_model_info", model="defects", version="1.0", backend="onnxruntime-cpu",
                 precision="int8") == 1
    assert value(s, "edge_sdk_backend_fallbacks_total", model="defects", backend="tensorrt") == 1
    assert value(s, "edge_sdk_backend_fallbacks_total", model="defects", backend="onnxruntime-cuda") == 1

    m.set_model("defects", "1.1", "tensorrt", "fp16")  # a reload that reached TensorRT
    s = scrape(m)
    info = [dict(labels) for name, labels in s if name == "edge_sdk_model_info"]
    assert info == [{"model": "defects", "version": "1.1", "backend": "tensorrt", "precision": "fp16"}]
    assert value(s, "edge_sdk_backend_fallbacks_total", model="defects", backend="tensorrt") == 1  # a counter stays


def test_source_counters_follow_cumulative_states_and_stay_monotonic() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    m.update_sources([state("cam0", frames=10, dropped=2), state("cam1", "connecting")])
    s = scrape(m)
    assert value(s, "edge_sdk_source_frames_total", source="cam0") == 10
    assert value(s, "edge_sdk_source_dropped_total", source="cam0") == 2
    assert value(s, "edge_sdk_source_up", source="cam0") == 1 and value(s, "edge_sdk_source_up", source="cam1") == 0
    assert value(s, "edge_sdk_source_fps", source="cam0") is None  # one sample is no rate yet

    clock.now += 2.0
    m.update_sources([state("cam0", "reconnecting", frames=30, dropped=5, reconnects=1)])
    s = scrape(m)
    assert value(s, "edge_sdk_source_frames_total", source="cam0") == 30  # not 10 + 30
    assert value(s, "edge_sdk_source_dropped_total", source="cam0") == 5
    assert value(s, "edge_sdk_source_reconnects_total", source="cam0") == 1
    assert value(s, "edge_sdk_source_up", source="cam0") == 0
    assert value(s, "edge_sdk_source_fps", source="cam0") == pytest.approx(10.0)
    assert value(s, "edge_sdk_source_frames_total", source="cam1") == 0  # kept from its last snapshot
    m.update_sources([replace(state("cam0", "stalled", frames=30, dropped=5, reconnects=1), stalls=2)])
    s = scrape(m)
    assert value(s, "edge_sdk_source_stalls_total", source="cam0") == 2 and value(s, "edge_sdk_source_up",
                                                                                    source="cam0") == 0

    clock.now += 1.0
    m.update_sources([state("cam0", frames=4)])  # the source was re-created and counts from 0 again
    s = scrape(m)
    assert value(s, "edge_sdk_source_frames_total", source="cam0") == 34
    assert value(s, "edge_sdk_source_dropped_total", source="cam0") == 5
    assert value(s, "edge_sdk_source_fps", source="cam0") == pytest.approx(24 / 3)


def test_fps_uses_the_recent_window() -> None:
    clock = Clock()
    m = Metrics(clock=clock, fps_window_s=5.0)
    for second in range(20):  # 100 fps for ten seconds, then 10 fps
        clock.now = 100.0 + second
        m.update_sources([state("cam0", frames=100 * min(second, 10) + 10 * max(0, second - 10))])
    assert value(scrape(m), "edge_sdk_source_fps", source="cam0") == pytest.approx(10.0)


def test_registered_sources_are_read_at_scrape_time() -> None:
    states = {"cam0": state("cam0", frames=1)}
    m = Metrics()
    m.register_sources("defects", lambda: list(states.values()))
    assert value(scrape(m), "edge_sdk_source_frames_total", source="cam0") == 1
    states["cam0"] = state("cam0", frames=42, dropped=7)
    s = scrape(m)
    assert value(s, "edge_sdk_source_frames_total", source="cam0") == 42
    assert value(s, "edge_sdk_source_dropped_total", source="cam0") == 7
    m.unregister_sources("defects")
    states["cam0"] = state("cam0", frames=99)
    assert value(scrape(m), "edge_sdk_source_frames_total", source="cam0") == 42


def test_a_failing_provider_keeps_last_values_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def provider() -> list[SourceState]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("camera object gone")
        return [state("cam0", frames=5)]

    m = Metrics()
    m.register_sources("defects", provider)
    scrape(m)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.daemon.metrics"):
        for _ in range(3):
            assert value(scrape(m), "edge_sdk_source_frames_total", source="cam0") == 5
    assert calls["n"] == 4 and caplog.text.count("source provider 'defects' failed") == 1


def test_stream_queue_depths_fps_errors_and_sources() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    m.update_stream("defects", stream_stats(100, queues={"frames": 3, "results": 0}, sinks={"mqtt": 1},
                                            sources=[state("cam0", frames=100)]))
    clock.now += 4.0
    m.update_stream("defects", stream_stats(300, errors=2, queues={"frames": 8, "results": 1}, sinks={"mqtt": 4},
                                            sources=[state("cam0", frames=301)]))
    s = scrape(m)
    assert value(s, "edge_sdk_queue_depth", stream="defects", queue="frames") == 8
    assert value(s, "edge_sdk_queue_depth", stream="defects", queue="results") == 1
    assert value(s, "edge_sdk_stream_fps", stream="defects") == pytest.approx(50.0)
    assert value(s, "edge_sdk_stream_errors_total", stream="defects") == 2
    assert value(s, "edge_sdk_sink_failures_total", stream="defects", sink="mqtt") == 4
    assert value(s, "edge_sdk_source_frames_total", source="cam0") == 301


def test_telemetry_gauges_replace_the_previous_reading() -> None:
    m = Metrics()
    assert not names(scrape(m), "edge_sdk_device_")  # nothing before the first reading
    m.update_telemetry(parse_tegrastats(ORIN_LINE))
    s = scrape(m)
    assert value(s, "edge_sdk_device_temperature_celsius", zone="tj") == 43.6
    assert value(s, "edge_sdk_device_temperature_celsius", zone="gpu") == 42.1
    assert value(s, "edge_sdk_device_power_milliwatts", rail="VDD_IN") == 4316
    assert value(s, "edge_sdk_device_power_milliwatts", rail="VDD_SOC") == 1324
    assert value(s, "edge_sdk_device_ram_used_bytes") == 2448 * 1024 * 1024
    assert value(s, "edge_sdk_device_ram_total_bytes") == 7772 * 1024 * 1024
    assert value(s, "edge_sdk_device_gpu_utilization_ratio") == pytest.approx(0.37)
    assert value(s, "edge_sdk_device_cpu_utilization_ratio") == pytest.approx(0.10)

    m.update_telemetry(read_sysfs("/nonexistent-root"))  # an x86 reading: no rails, no GPU load
    s = scrape(m)
    assert names(s, "edge_sdk_device_") == set()


def test_two_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.count_event("leak")
    assert value(scrape(a), "edge_sdk_events_total", fault="leak") == 1
    assert value(scrape(b), "edge_sdk_events_total", fault="leak") is None


def test_every_documented_family_is_exported() -> None:
    m = Metrics()
    m.observe_inference("defects", "onnxruntime-cpu", 0.01)
    m.count_request("health", 200)
    m.set_model("defects", "1.0", "onnxruntime-cpu", "fp32", [("tensorrt", "missing")])
    m.count_event("leak")
    m.set_outbox(0, True)
    m.update_stream("defects", stream_stats(1, queues={"frames": 0}, sinks={"csv": 0}, sources=[state("cam0")]))
    m.update_telemetry(parse_tegrastats(ORIN_LINE))
    body, _ = m.render()
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    expected = {
        "edge_sdk_inference_latency_seconds": "histogram", "edge_sdk_requests": "counter",
        "edge_sdk_predictions": "counter", "edge_sdk_backend_fallbacks": "counter", "edge_sdk_model_info": "gauge",
        "edge_sdk_events": "counter", "edge_sdk_mqtt_outbox_size": "gauge", "edge_sdk_mqtt_connected": "gauge",
        "edge_sdk_source_frames": "counter", "edge_sdk_source_dropped": "counter",
        "edge_sdk_source_reconnects": "counter", "edge_sdk_source_stalls": "counter", "edge_sdk_source_fps": "gauge", "edge_sdk_source_up": "gauge",
        "edge_sdk_queue_depth": "gauge", "edge_sdk_stream_fps": "gauge", "edge_sdk_stream_errors": "counter",
        "edge_sdk_sink_failures": "counter", "edge_sdk_device_temperature_celsius": "gauge",
        "edge_sdk_device_power_milliwatts": "gauge", "edge_sdk_device_ram_used_bytes": "gauge",
        "edge_sdk_device_ram_total_bytes": "gauge", "edge_sdk_device_gpu_utilization_ratio": "gauge",
        "edge_sdk_device_cpu_utilization_ratio": "gauge",
    }
    assert {name: families.get(name) for name in expected} == expected
