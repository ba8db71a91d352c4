"""The event store on real SQLite and real files, including kill -9 in the middle of writes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_sdk.daemon.events import EventStore
from edge_sdk.errors import DaemonError

ROOT = Path(__file__).resolve().parents[4]
JPEG = b"\xff\xd8\xff\xe0" + b"x" * 996  # 1000 bytes that look like a JPEG
PNG = b"\x89PNG\r\n\x1a\n" + b"y" * 492


@pytest.fixture
def store(tmp_path: Path):
    with EventStore(tmp_path / "events") as s:
        yield s


def _payload_bytes(payload: dict) -> int:
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def test_add_and_get_round_trip_with_snapshot(store: EventStore) -> None:
    payload = {"asset_id": "press-4", "fault": "bearing", "probabilities": {"bearing": 0.9, "ok": 0.1}, "note": "é"}
    event = store.add("press-4", "bearing", 0.9, payload, snapshot=JPEG, timestamp=1000.0)
    assert event.id == 1 and event.snapshot is not None and event.snapshot.suffix == ".jpg"
    assert event.snapshot.read_bytes() == JPEG
    assert event.size == len(JPEG) + _payload_bytes(payload)
    assert store.get(event.id) == event
    assert store.snapshot_path(event.id) == event.snapshot
    plain = store.add("press-4", "leak", 0.7, {"k": 1}, timestamp=1001.0)
    assert plain.snapshot is None and store.snapshot_path(plain.id) is None
    assert store.add("a", "f", 0.5, {}, snapshot=PNG).snapshot.suffix == ".png"  # type: ignore[union-attr]
    assert store.get(999) is None and store.snapshot_path(999) is None
    assert store.count() == 3
    assert store.total_bytes() >= len(JPEG) + len(PNG) + (store.directory / "events.db").stat().st_size


def test_list_newest_first_with_filters_and_pagination(store: EventStore) -> None:
    for i in range(25):
        store.add(f"asset-{i % 2}", "bearing" if i % 3 else "leak", 0.8, {"i": i}, timestamp=100.0 + i)
    assert [e.payload["i"] for e in store.list(limit=3)] == [24, 23, 22]
    pages, before = [], None
    while page := store.list(asset_id="asset-0", limit=4, before_id=before):
        pages.append([e.payload["i"] for e in page])
        before = page[-1].id
    assert [i for page in pages for i in page] == list(range(24, -1, -2))
    assert [e.payload["i"] for e in store.list(fault="leak")] == [24, 21, 18, 15, 12, 9, 6, 3, 0]
    assert [e.payload["i"] for e in store.list(since=120.0, fault="bearing")] == [23, 22, 20]
    with pytest.raises(DaemonError, match="limit is 0"):
        store.list(limit=0)


def test_bad_input_raises_daemon_error_naming_the_value(store: EventStore) -> None:
    with pytest.raises(DaemonError, match="asset_id is ''"):
        store.add("", "f", 0.5, {})
    with pytest.raises(DaemonError, match="confidence is nan"):
        store.add("a", "f", float("nan"), {})
    with pytest.raises(DaemonError, match="not plain JSON") as info:
        store.add("a", "f", 0.5, {"frame": object()})
    assert info.value.hint
    with pytest.raises(DaemonError, match="snapshot is a str"):
        store.add("a", "f", 0.5, {}, snapshot="not bytes")  # type: ignore[arg-type]
    assert store.count() == 0 and store.outbox_size() == 0
    assert list((store.directory / "snapshots").iterdir()) == []


def test_retention_by_age_deletes_rows_and_snapshots(tmp_path: Path) -> None:
    with EventStore(tmp_path, max_age_s=100.0) as store:
        old = [store.add("a", "f", 0.9, {"i": i}, snapshot=JPEG, timestamp=1000.0 + i) for i in range(3)]
        new = store.add("a", "f", 0.9, {"i": 3}, snapshot=JPEG, timestamp=1200.0)
        assert store.enforce_retention(now=1250.0) == 3
        assert [e.id for e in store.list()] == [new.id]
        assert all(e.snapshot is not None and not e.snapshot.exists() for e in old)
        assert new.snapshot is not None and new.snapshot.exists()
        assert store.enforce_retention(now=1250.0) == 0


def test_retention_by_size_deletes_oldest_until_under_the_bound(tmp_path: Path) -> None:
    """On every write (300 events used to leave 14.7 MB under max_mb = 1 until the periodic run)."""
    with EventStore(tmp_path, max_bytes=3500) as store:
        events = [store.add("a", "f", 0.9, {"i": i}, snapshot=JPEG) for i in range(5)]
        assert sum(e.size for e in events) > 3500 >= store.event_bytes()
        assert store.enforce_retention() == 0  # nothing left to do
        assert [e.id for e in store.list()] == [e.id for e in reversed(events[2:])]
        assert store.event_bytes() <= 3500
        assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == sorted(
            e.snapshot.name for e in events[2:] if e.snapshot)


def test_outbox_keeps_undelivered_messages_after_retention(tmp_path: Path) -> None:
    with EventStore(tmp_path, max_age_s=10.0) as store:
        first = store.add("line/1", "leak", 0.75, {"why": "drip"}, snapshot=JPEG, timestamp=1.0)
        second = store.add("line/1", "leak", 0.8, {"why": "puddle"}, timestamp=100.0)
        assert store.enforce_retention(now=100.0) == 1 and store.get(first.id) is None
        items = store.outbox_pending()
        assert [(i.event_id, i.asset_id) for i in items] == [(first.id, "line/1"), (second.id, "line/1")]
        assert json.loads(items[0].payload_json) == {
            "id": first.id, "asset_id": "line/1", "fault": "leak", "confidence": 0.75, "timestamp": 1.0,
            "snapshot": True, "diagnosis": {"why": "drip"}}
        assert store.outbox_pending(after_seq=items[0].seq) == items[1:]
        assert store.outbox_done(items[0].seq, 12345) == 1
        assert store.outbox_size() == 1 and store.outbox_pending() == items[1:]


def test_outbox_bound_drops_the_oldest_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EventStore(tmp_path, max_outbox=5) as store:
        events = [store.add("a", "f", 0.9, {"i": i}) for i in range(8)]
        assert store.outbox_size() == 5 and store.outbox_dropped == 3
        assert [i.event_id for i in store.outbox_pending()] == [e.id for e in events[3:]]
        assert store.count() == 8  # the stored events are not touched
    assert "outbox full" in caplog.text
    with EventStore(tmp_path, max_outbox=5) as store:
        assert store.outbox_size() == 5


def test_reconcile_after_a_simulated_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EventStore(tmp_path) as store:
        kept, lost = (store.add("a", "f", 0.9, {"i": i}, snapshot=JPEG) for i in range(2))
    assert kept.snapshot and lost.snapshot
    snapshots = tmp_path / "snapshots"
    (snapshots / ".tmp-0123456789abcdef").write_bytes(b"half an ima")  # crash while writing
    (snapshots / "feedfacefeedface.jpg").write_bytes(JPEG)  # crash between rename and commit
    lost.snapshot.unlink()  # the row's image is gone
    with EventStore(tmp_path) as store:
        assert sorted(p.name for p in snapshots.iterdir()) == [kept.snapshot.name]
        assert store.get(kept.id) == kept
        damaged = store.get(lost.id)
        assert damaged is not None and damaged.snapshot is None and damaged.size == lost.size - len(JPEG)
    assert "lost their snapshot" in caplog.text


def test_corrupt_database_raises_with_a_hint(tmp_path: Path) -> None:
    with EventStore(tmp_path) as store:
        for i in range(300):
            store.add("a", "f", 0.9, {"text": "x" * 200, "i": i})
    db = tmp_path / "events.db"
    with db.open("r+b") as f:  # overwrite b-tree pages after the header page
        f.seek(4096 * 2)
        f.write(b"\xa5" * 4096 * 4)
    with pytest.raises(DaemonError, match="corrupt|cannot be") as info:
        EventStore(tmp_path)
    assert info.value.hint and "aside" in info.value.hint
    db.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"events.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(DaemonError, match="events.db"):
        EventStore(tmp_path)


def test_one_store_per_directory(store: EventStore) -> None:
    with pytest.raises(DaemonError, match="already in use") as info:
        EventStore(store.directory)
    assert info.value.hint


_WRITER = """
import hashlib, os, sys
from edge_sdk.daemon.events import EventStore
store = EventStore(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    data = os.urandom(500 + (i * 7919) % 40000)
    store.add("press-4", "bearing", 0.9, {"i": i, "sha256": hashlib.sha256(data).hexdigest()}, snapshot=data)
    i += 1
"""


def _kill_writer(directory: Path, after_s: float) -> None:
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(after_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("rounds", [3])
def test_kill_9_during_writes_leaves_a_consistent_store(tmp_path: Path, rounds: int) -> None:
    previous = 0
    for round_ in range(rounds):
        _kill_writer(tmp_path, after_s=0.3 + 0.1 * round_)
        with EventStore(tmp_path) as store:  # quick_check and reconcile run here
            events = sorted(store.list(limit=10_000), key=lambda e: e.id)
            assert len(events) > previous, "the writer stored nothing in this round"
            assert [e.id for e in events] == list(range(1, len(events) + 1))  # contiguous, increasing
            for event in events:
                assert event.snapshot is not None, f"event {event.id} lost its snapshot"
                data = event.snapshot.read_bytes()
                assert hashlib.sha256(data).hexdigest() == event.payload["sha256"]
                assert event.size == len(data) + _payload_bytes(event.payload)
            names = {p.name for p in (tmp_path / "snapshots").iterdir()}
            assert names == {e.snapshot.name for e in events if e.snapshot}  # no temp or orphan file
            round_events = [e.payload["i"] for e in events[previous:]]
            assert round_events == list(range(len(round_events)))  # each round wrote 0, 1, 2, ...
            assert [i.event_id for i in store.outbox_pending(limit=10_000)] == [e.id for e in events]
            assert store.outbox_size() == len(events)
            previous = len(events)
