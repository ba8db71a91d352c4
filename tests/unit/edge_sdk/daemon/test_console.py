"""The console's parts without HTTP: sessions and their expiry, the login throttle, the live frames and
their drawing, and event acknowledgements in the store (with the schema upgrade that adds them)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np

from edge_sdk.daemon.console.live import LiveFrames, draw
from edge_sdk.daemon.console.sessions import LoginThrottle, Sessions, csrf_ok
from edge_sdk.daemon.events import EventStore
from runtime.frame import Frame
from runtime.prediction import Prediction, Timings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_lives_until_its_expiry_or_its_end() -> None:
    clock = Clock()
    sessions = Sessions("secret-token", ttl_s=60.0, clock=clock)
    assert sessions.check_token("secret-token") and sessions.check_token(" secret-token\n")
    assert not sessions.check_token("secret-toke") and not sessions.check_token("")
    session = sessions.create()
    assert session.id != session.csrf and len(session.id) >= 40
    assert sessions.get(session.id) == session and sessions.get("forged") is None and sessions.get(None) is None
    assert csrf_ok(session, session.csrf) and not csrf_ok(session, "x") and not csrf_ok(session, None)
    clock.now += 59.0
    assert sessions.get(session.id) == session
    clock.now += 1.0
    assert sessions.get(session.id) is None  # expired
    other = sessions.create()
    sessions.end(other.id)
    assert sessions.get(other.id) is None


def test_an_empty_token_admits_nobody() -> None:
    assert not Sessions("").check_token("")


def test_sessions_are_bounded_oldest_first() -> None:
    sessions = Sessions("t", max_sessions=2)
    first, second, third = sessions.create(), sessions.create(), sessions.create()
    assert sessions.get(first.id) is None and sessions.get(second.id) and sessions.get(third.id)


def test_the_throttle_locks_after_too_many_failures_within_the_window() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window_s=60.0, clock=clock)
    for _ in range(3):
        assert throttle.locked() == 0.0
        throttle.failed()
    assert throttle.locked() == 60.0
    clock.now += 30.0
    assert throttle.locked() == 30.0
    clock.now += 30.0
    assert throttle.locked() == 0.0  # the failures left the window


def prediction(label: str = "red", roi: str | None = None, anomaly: bool = False) -> Prediction:
    extra: dict[str, object] = {"roi": roi} if roi else {}
    if anomaly:
        extra.update(anomaly_map=np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), threshold=0.5)
    return Prediction(label, 0.9, {label: 0.9}, "onnxruntime-cpu", Timings(1.0, 2.0, 0.5), extra=extra)


def frame(index: int, image: np.ndarray | None = None, source: str = "cam") -> Frame:
    picture = np.full((60, 80, 3), 120, np.uint8) if image is None else image
    return Frame(picture, source, index, time.time() - 0.05)


def test_live_frames_keep_the_latest_frame_with_its_predictions() -> None:
    live = LiveFrames({"cam": {"left": [0, 10, 40, 40], "right": [40, 10, 40, 40]}})
    assert live.jpeg("cam") is None and live.stats("cam")["fps"] is None
    live.observe(frame(0), prediction(roi="left"))
    live.observe(frame(0), prediction("blue", roi="right", anomaly=True))
    data = live.jpeg("cam")
    assert data is not None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (60, 80, 3)
    assert np.abs(image[44, 20].astype(int) - 120).max() < 12  # the left region has no map: still grey
    assert np.abs(image[44, 72].astype(int) - 120).max() > 40  # the right one's heat map is drawn over it
    stats = live.stats("cam")
    assert stats["latency_ms"] is not None and stats["latency_ms"] >= 40  # captured 50 ms before it was seen
    live.observe(frame(1), prediction("green"))
    assert live.stats("cam")["last_frame_at"] is not None


def test_draw_downscales_wide_frames_and_draws_regions_inside_the_frame_only() -> None:
    wide = np.zeros((480, 1280, 3), np.uint8)
    out = draw(wide, {"a": prediction(roi="a"), "gone": prediction(roi="gone")},
               {"a": [10, 10, 100, 100], "gone": [1200, 400, 200, 200]})
    assert out.shape == (240, 640, 3) and out.any()
    assert draw(np.zeros((20, 20), np.uint8), {None: prediction()}, {}).shape == (20, 20, 3)


def test_an_acknowledgement_is_kept_once_and_survives_reopening(tmp_path: Path) -> None:
    with EventStore(tmp_path) as store:
        event = store.add("press-4", "bearing", 0.9, {"fault": "bearing"})
        assert event.acknowledged_at is None
        acked = store.acknowledge(event.id, "console", now=5.0)
        assert acked is not None and (acked.acknowledged_at, acked.acknowledged_by) == (5.0, "console")
        again = store.acknowledge(event.id, "api", now=9.0)
        assert again is not None and (again.acknowledged_at, again.acknowledged_by) == (5.0, "console")
        assert store.acknowledge(999, "api") is None
        assert "acknowledged_at" not in event.to_dict()  # the MQTT message is unchanged
    with EventStore(tmp_path) as store:
        [kept] = store.list()
        assert (kept.acknowledged_at, kept.acknowledged_by) == (5.0, "console")


_V2 = """
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, asset_id TEXT NOT NULL, fault TEXT NOT NULL,
    confidence REAL NOT NULL, timestamp REAL NOT NULL, payload TEXT NOT NULL, snapshot TEXT,
    snapshot_size INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id INTEGER NOT NULL, asset_id TEXT NOT NULL,
    payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
INSERT INTO events VALUES (7, 'press-4', 'bearing', 0.9, 1000.0, '{"fault":"bearing"}', NULL, 0, 19);
INSERT INTO outbox VALUES (3, 7, 'press-4', '{"id":7}', 1);
PRAGMA user_version = 2;
"""


def test_a_version_2_store_gains_acknowledgements_and_keeps_every_row(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "events.db")
    db.executescript(_V2)
    db.close()
    with EventStore(tmp_path) as store:
        event = store.get(7)
        assert event is not None and event.payload == {"fault": "bearing"} and event.acknowledged_at is None
        assert [item.attempts for item in store.outbox_pending()] == [1]
        assert store.acknowledge(7, "console", now=3.0) is not None
        assert store.add("press-4", "leak", 0.8, {}).id == 8  # AUTOINCREMENT kept
    db = sqlite3.connect(tmp_path / "events.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    assert db.execute("SELECT acknowledged_by FROM events WHERE id = 7").fetchone()[0] == "console"
    db.close()
