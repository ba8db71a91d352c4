"""What the console shows, gathered from the daemon as plain JSON-ready data."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edge_sdk.errors import EdgeSDKError

log = logging.getLogger(__name__)

__all__ = ["health", "models", "report_html", "sources"]


def sources(daemon: Any) -> list[dict[str, Any]]:
    """Every configured source: its stream's state when it has one, else "not started"."""
    running = {s["source"]: s for s in daemon.sources()}
    out = []
    for name, config in daemon.config.sources.items():
        row = running.get(name) or {"source": name, "model": config.model, "status": "not started", "frames": 0,
                                    "dropped": 0, "reconnects": 0, "last_error": "", "fps": None,
                                    "latency_ms": None}
        out.append({**row, "asset": config.asset, "regions": sorted(config.rois),
                    "last_frame_at": daemon.live.stats(name)["last_frame_at"]})
    return out


def models(daemon: Any, member: str) -> list[dict[str, Any]]:
    """Each served model's registry info, with its golden-vector parity and whether it has a report."""
    out = []
    for name in daemon.registry.names:
        info = daemon.registry.info(name)
        pipeline = daemon.registry.current(name)
        parity = pipeline.parity
        info["parity"] = None if parity is None else {"ok": parity.ok, "samples": parity.samples,
                                                       "max_abs_diff": parity.max_abs_diff,
                                                       "tolerance": parity.tolerance}
        info["report"] = _report_source(pipeline, Path(info["package"]), member) is not None
        out.append(info)
    return out


def _report_source(pipeline: Any, package: Path, member: str) -> str | Path | None:
    """The report the console links: a side-by-side report written next to the package
    (``<model name>.report.html``, as ``make demo`` and ``edge-sdk report`` write it, or
    ``report.html``), else the package member holding its own report, else None."""
    name = pipeline.package.manifest.name if pipeline.package is not None else None
    for beside in ([package.parent / f"{name}.report.html"] if name else []) + [package.parent / "report.html"]:
        if beside.is_file():
            return beside
    if pipeline.package is not None and member in pipeline.package.manifest.files:
        return member
    return None


def report_html(daemon: Any, name: str, member: str) -> bytes | None:
    """The conversion report of model ``name`` (verified against the package's hashes when it is a member)."""
    pipeline = daemon.registry.current(name)
    where = _report_source(pipeline, Path(daemon.registry.info(name)["package"]), member)
    if where is None:
        return None
    if isinstance(where, Path):
        return where.read_bytes()
    try:
        data: bytes = pipeline.package.read_bytes(where)
    except EdgeSDKError as exc:
        log.warning("console: the report of model %s cannot be read: %s", name, exc.message)
        return None
    return data


def health(daemon: Any) -> dict[str, Any]:
    """CPU/GPU load, temperatures and memory (device telemetry), disk used by events, MQTT."""
    reading = daemon.telemetry.latest() if daemon.telemetry is not None else None
    store = daemon.store
    mqtt = None
    if daemon.publisher is not None:
        state = daemon.publisher.state
        mqtt = {"connected": state.connected, "outbox": store.outbox_size(), "delivered": state.delivered,
                "dead_letters": state.dead_letters, "last_error": state.last_error}
    return {"telemetry": reading.to_dict() if reading is not None else None,
            "events": store.count(), "events_disk_bytes": store.total_bytes(),
            "events_max_bytes": store.max_bytes, "mqtt": mqtt, "ready": daemon.ready,
            "uptime_s": max(time.time() - daemon.started_at, 0.0)}
