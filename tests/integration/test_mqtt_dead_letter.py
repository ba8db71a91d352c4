"""A message the broker will not take becomes a dead letter and the outbox goes on past it
(edge_sdk.daemon.mqtt, "Dead letters"), against a real mosquitto and a real subscriber.

mosquitto 2.0 with ``max_packet_size`` closes the connection of a client that sends a bigger
packet; to an MQTT 3.1.1 client (the publisher) that looks like any lost connection.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_sdk.daemon.config import MqttConfig
from edge_sdk.daemon.events import EventStore
from edge_sdk.daemon.mqtt import MqttPublisher, event_topic
from tests.broker import Mosquitto, require_mosquitto

FAST = {"reconnect_delay_s": (1, 1), "poll_s": 0.2}
LIMIT = 4096  # mosquitto's max_packet_size here; an ordinary event message is a few hundred bytes
OVERSIZE = "rejected"  # the asset whose event is too big for the broker
DROPPED = "disconnected due to oversize packet"  # mosquitto's log line for each drop


class Subscriber:
    """Records the ids of the event messages under ``{prefix}/+/events/#``, in arrival order."""

    def __init__(self, port: int) -> None:
        self.ids: list[int] = []
        self._changed = threading.Condition()
        subscribed = threading.Event()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self._client.on_connect = lambda client, *_: client.subscribe("edge-sdk/+/events/#", qos=1)
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert subscribed.wait(5), "the test subscriber could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.ids.append(json.loads(message.payload)["id"])
            self._changed.notify_all()

    def first_arrivals(self, count: int, timeout: float = 15.0) -> list[int]:
        """The first ``count`` distinct ids in first-arrival order (QoS 1 may repeat one)."""
        def distinct() -> list[int]:
            return list(dict.fromkeys(self.ids))
        with self._changed:
            assert self._changed.wait_for(lambda: len(distinct()) >= count, timeout), f"got {self.ids}"
            return distinct()[:count]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that drops the client on any packet over LIMIT bytes."""
    require_mosquitto()
    with Mosquitto(tmp_path / "strict", config=[f"max_packet_size {LIMIT}"]) as broker:
        yield broker


def _config(broker: Mosquitto) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=broker.port, device_id="line1")


def _add(store: EventStore, asset: str, size: int = 50) -> int:
    return store.add(asset, "bearing", 0.9, {"fault": "bearing", "note": "x" * size}).id


def _until(condition: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _drops(broker: Mosquitto) -> int:
    return broker.log.read_text(errors="replace").count(DROPPED)


def test_a_message_the_broker_drops_the_client_for_becomes_a_dead_letter_and_later_ones_arrive(
        strict: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "edge_sdk.daemon.mqtt")
    sub = Subscriber(strict.port)
    with EventStore(tmp_path / "events") as store:
        before = [_add(store, "press-1"), _add(store, "press-2")]
        bad = _add(store, OVERSIZE, size=2 * LIMIT)
        publisher = MqttPublisher(_config(strict), store, max_attempts=3, **FAST).start()
        try:
            after = [_add(store, "press-3")]
            publisher.notify()
            assert sub.first_arrivals(3) == before + after  # in order, past the one it refused
            after.append(_add(store, "press-4"))
            publisher.notify()
            assert sub.first_arrivals(4) == before + after
            _until(lambda: publisher.state.pending == 0)
            [letter] = store.dead_letters(10)
            assert publisher.state.dead_letters == 1 and store.dead_letter_count() == 1
        finally:
            publisher.stop()
        sub.close()
    assert letter.event_id == bad and letter.attempts == 3
    assert letter.topic == event_topic("edge-sdk", "line1", OVERSIZE) == "edge-sdk/line1/events/rejected"
    assert letter.reason.startswith("the broker dropped the connection on 3 publish attempts")
    assert json.loads(letter.payload_json)["id"] == bad and letter.to_dict()["message"]["asset_id"] == OVERSIZE
    assert abs(letter.failed_at - time.time()) < 60
    assert _drops(strict) >= 3  # 3 counted, the last with it alone in flight; paho re-sends between them
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dead letter" in r.getMessage()]
    assert len(warnings) == 1 and f"event {bad} on {letter.topic}" in warnings[0] and letter.reason in warnings[0]
    with EventStore(tmp_path / "events") as reopened:  # kept for the operator
        assert reopened.dead_letters(10) == [letter] and reopened.outbox_size() == 0


def test_failed_attempts_are_counted_in_the_store_across_a_restart(
        strict: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sub = Subscriber(strict.port)
    with EventStore(tmp_path / "events") as store:
        bad = _add(store, OVERSIZE, size=2 * LIMIT)
        good = _add(store, "press-1")
        publisher = MqttPublisher(_config(strict), store, max_attempts=4, **FAST).start()
        try:
            _until(lambda: store.outbox_pending(1)[0].attempts >= 1)
        finally:
            publisher.stop(timeout=1)  # within the 1 s before it reconnects: no second attempt yet
    caplog.set_level(logging.INFO, "edge_sdk.daemon.mqtt")
    with EventStore(tmp_path / "events") as store:  # the daemon restarted
        assert [(i.event_id, i.attempts) for i in store.outbox_pending()] == [(bad, 1), (good, 0)]
        assert store.dead_letters() == []
        publisher = MqttPublisher(_config(strict), store, max_attempts=4, **FAST).start()
        try:
            assert sub.first_arrivals(1) == [good]
            [letter] = store.dead_letters()
        finally:
            publisher.stop()
        sub.close()
    counted = [r.getMessage() for r in caplog.records if "failed attempt" in r.getMessage()]
    assert [f"failed attempt {n} of 4" in m for n, m in zip((2, 3), counted)] == [True, True], counted
    assert letter.event_id == bad and letter.attempts == 4  # 1 before the restart, 3 after


def test_a_broker_that_dies_with_a_message_in_flight_does_not_make_it_a_dead_letter(tmp_path: Path) -> None:
    """The publisher sees the same lost connection as when the broker drops it for the message;
    the refused reconnect right after tells it that the broker went away. max_attempts=1 would
    set the message aside on the first counted attempt."""
    require_mosquitto()
    with Mosquitto(tmp_path / "broker") as broker, EventStore(tmp_path / "events") as store:
        publisher = MqttPublisher(_config(broker), store, max_attempts=1, **FAST).start()
        try:
            _until(lambda: publisher.state.connected)
            broker.signal(signal.SIGSTOP)  # it stops answering: the next publish stays in flight
            event = _add(store, "press-1")
            publisher.notify()
            time.sleep(0.5)
            assert publisher.state.pending == 1
            broker.signal(signal.SIGKILL)  # the connection drops with the message unacknowledged
            _until(lambda: not publisher.state.connected)
            _until(lambda: "cannot reach the broker" in str(publisher.state.last_error))
            broker.stop()
            broker.start()
            sub = Subscriber(broker.port)
            _until(lambda: publisher.state.pending == 0)
            assert store.dead_letters() == [] and publisher.state.dead_letters == 0
            assert publisher.state.delivered == 1
            sub.close()
        finally:
            publisher.stop()
    assert event == 1


def test_a_failure_reason_code_in_the_puback_makes_a_dead_letter_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An MQTT 5 broker refuses a message with a PUBACK reason >= 0x80. The publisher speaks 3.1.1,
    whose PUBACK has no reason code; so paho's callback gets the real PUBACK of one message with
    0x99 (payload format invalid) instead of success, as an MQTT 5 connection would deliver it."""
    require_mosquitto()
    caplog.set_level(logging.WARNING, "edge_sdk.daemon.mqtt")
    with Mosquitto(tmp_path / "broker") as broker, EventStore(tmp_path / "events") as store:
        sub = Subscriber(broker.port)
        publisher = MqttPublisher(_config(broker), store, **FAST)
        client = publisher._client
        publish, on_publish = client.publish, client.on_publish
        marked: set[int] = set()

        def publish_marking(topic: str, payload: Any = None, qos: int = 0, retain: bool = False) -> Any:
            info = publish(topic, payload, qos, retain)
            if topic.endswith(f"/{OVERSIZE}"):
                marked.add(info.mid)
            return info

        def on_publish_refusing(c: mqtt.Client, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
            refused = ReasonCode(PacketTypes.PUBACK, identifier=0x99)
            on_publish(c, u, mid, refused if mid in marked else reason, p)

        client.publish = publish_marking  # type: ignore[method-assign]
        client.on_publish = on_publish_refusing
        ids = [_add(store, "press-1"), _add(store, OVERSIZE), _add(store, "press-2")]
        publisher.start()
        try:
            _until(lambda: publisher.state.pending == 0)
            [letter] = store.dead_letters()
            assert publisher.state.delivered == 2 and publisher.state.dead_letters == 1
        finally:
            publisher.stop()
        assert sub.first_arrivals(3) == ids  # the broker did get it; the publisher was told it refused it
        sub.close()
    assert letter.event_id == ids[1] and letter.attempts == 0
    assert letter.reason == "the broker answered the publish with Payload format invalid (0x99)"
    assert sum("dead letter" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


_V1 = """
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, asset_id TEXT NOT NULL, fault TEXT NOT NULL,
    confidence REAL NOT NULL, timestamp REAL NOT NULL, payload TEXT NOT NULL, snapshot TEXT,
    snapshot_size INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id INTEGER NOT NULL, asset_id TEXT NOT NULL,
    payload TEXT NOT NULL);
INSERT INTO events VALUES (7, 'press-4', 'bearing', 0.9, 1000.0, '{"fault":"bearing"}', NULL, 0, 19);
INSERT INTO outbox VALUES (3, 7, 'press-4', '{"id":7}');
PRAGMA user_version = 1;
"""


def test_a_version_1_store_is_upgraded_on_open_and_keeps_its_rows(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "events.db")
    db.executescript(_V1)
    db.close()
    with EventStore(tmp_path) as store:
        [item] = store.outbox_pending()
        assert (item.seq, item.event_id, item.payload_json, item.attempts) == (3, 7, '{"id":7}', 0)
        event = store.get(7)
        assert event is not None and event.payload == {"fault": "bearing"}
        assert store.dead_letters() == [] and store.dead_letter_count() == 0
        assert store.outbox_attempt(3) == 1 and store.outbox_attempt(99) == 0
        letter = store.outbox_dead_letter(3, "edge-sdk/line1/events/press-4", "test", now=5.0)
        assert letter is not None and (letter.seq, letter.attempts, letter.failed_at) == (3, 1, 5.0)
        assert store.outbox_size() == 0 and store.outbox_dead_letter(3, "t", "again") is None
    db = sqlite3.connect(tmp_path / "events.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3  # version 3 added acknowledgements
    db.close()
    with EventStore(tmp_path) as store:
        assert store.dead_letters() == [letter] and store.dead_letter_count() == 1


def test_dead_letters_are_newest_first_paged_and_bounded(tmp_path: Path) -> None:
    with EventStore(tmp_path, max_dead_letters=3) as store:
        for _ in range(5):
            store.add("a", "f", 0.9, {})
        seqs = [item.seq for item in store.outbox_pending()]
        for seq in seqs:
            store.outbox_dead_letter(seq, "t", f"reason {seq}")
        assert [d.seq for d in store.dead_letters()] == seqs[:1:-1]  # the 3 newest are kept
        assert [d.seq for d in store.dead_letters(1, before_seq=seqs[4])] == [seqs[3]]
        assert store.dead_letter_count() == 3 and store.outbox_size() == 0
