"""The on-device daemon: ``edge-sdk serve --config edge-sdk.toml``.

Serves the configured models over HTTP (the KServe v2 / Open Inference Protocol, so the
stock ``tritonclient`` works, plus a convenience API for images and texts), runs the camera
sources through their pipelines, fuses evidence into diagnoses, keeps the diagnoses that match
the event rules in SQLite with a snapshot, publishes them over MQTT from a persistent outbox,
and exposes Prometheus metrics. Needs the ``serve`` extra.
"""
