"""The MQTT publisher against a real mosquitto on loopback, watched by a real paho subscriber."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_sdk.daemon.config import MqttConfig
from edge_sdk.daemon.events import EventStore
from edge_sdk.daemon.mqtt import MqttPublisher, event_topic, status_topic, topic_safe
from runtime.fusion import Diagnosis
from tests.broker import Mosquitto, require_mosquitto

ROOT = Path(__file__).resolve().parents[4]
FAST = {"reconnect_delay_s": (1, 1), "poll_s": 0.2}


class Subscriber:
    """Records every message under ``topic``; ``persistent`` keeps its session across broker restarts."""

    def __init__(self, port: int, topic: str = "edge-sdk/#", persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id="test-subscriber" if persistent else "", clean_session=not persistent)
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._subscribed.wait(5), "the test subscriber could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            self._changed.notify_all()

    def wait_for(self, done: Callable[[Subscriber], bool], timeout: float = 5.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: done(self), timeout), f"timed out; got {self.messages}"

    def events(self) -> list[dict[str, Any]]:
        with self._changed:
            return [json.loads(payload) for topic, payload, _ in self.messages if "/events/" in topic]

    def statuses(self) -> list[tuple[str, bool]]:
        with self._changed:
            return [(payload.decode(), retain) for topic, payload, retain in self.messages if topic.endswith("/status")]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    with Mosquitto(tmp_path / "broker", persistent=True) as b:
        yield b


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    with EventStore(tmp_path / "events") as s:
        yield s


def _config(broker: Mosquitto, **kw: Any) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=broker.port, prefix="edge-sdk", device_id="line1", **kw)


def _diagnosis(asset: str, i: int) -> dict[str, Any]:
    return Diagnosis(asset_id=asset, fault="bearing", confidence=0.9, probabilities={"bearing": 0.9, "ok": 0.1},
                     is_fault=True, evidence=(), conflicting=(), similar=(), timestamp=1000.0 + i).to_dict()


def _add(store: EventStore, publisher: MqttPublisher | None, asset: str, i: int) -> None:
    store.add(asset, "bearing", 0.9, _diagnosis(asset, i), snapshot=b"\xff\xd8\xff" + bytes(10), timestamp=1000.0 + i)
    if publisher is not None:
        publisher.notify()


def _until(condition: Callable[[], Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _ids(sub: Subscriber) -> list[int]:
    return [event["id"] for event in sub.events()]


def _first_arrivals(ids: list[int]) -> list[int]:
    seen: list[int] = []
    for event_id in ids:
        if event_id not in seen:
            seen.append(event_id)
    return seen


def test_events_arrive_in_order_on_per_asset_topics(broker: Mosquitto, store: EventStore) -> None:
    sub = Subscriber(broker.port)
    publisher = MqttPublisher(_config(broker), store, **FAST).start()
    try:
        for i in range(30):
            _add(store, publisher, f"press-{i % 2}", i)
        sub.wait_for(lambda s: len(s.events()) >= 30)
        assert _ids(sub) == list(range(1, 31))  # no re-sends on a healthy connection
        for topic, payload, _ in sub.messages:
            if "/events/" in topic:
                message = json.loads(payload)
                assert topic == f"edge-sdk/line1/events/{message['asset_id']}"
                stored = store.get(message["id"])
                assert stored is not None and message == stored.to_dict()
                assert message["diagnosis"]["probabilities"] == {"bearing": 0.9, "ok": 0.1}
        _until(lambda: not publisher.state.pending)
        assert publisher.state.pending == 0 and publisher.state.delivered == 30 and publisher.state.connected
    finally:
        publisher.stop()
        sub.close()


def test_broker_outage_events_wait_in_the_outbox_and_arrive_in_order(broker: Mosquitto, store: EventStore) -> None:
    sub = Subscriber(broker.port, persistent=True)  # the broker queues for it while it is away
    states: list[bool] = []
    publisher = MqttPublisher(_config(broker), store, on_state=lambda s: states.append(s.connected), **FAST).start()
    try:
        for i in range(3):
            _add(store, publisher, "press-4", i)
        sub.wait_for(lambda s: len(s.events()) >= 3)
        broker.stop()
        _until(lambda: not publisher.state.connected)
        assert not publisher.state.connected and publisher.state.last_error
        for i in range(3, 23):
            _add(store, publisher, "press-4", i)
        time.sleep(0.3)
        assert store.outbox_size() == 20 and publisher.state.pending == 20  # nothing lost, nothing sent
        broker.start()  # same port
        sub.wait_for(lambda s: set(_ids(s)) >= set(range(1, 24)), timeout=8)
        ids = _ids(sub)
        assert _first_arrivals(ids) == list(range(1, 24))  # each at least once, first arrivals in order
        assert len(ids) - 23 <= publisher._window  # duplicates only from QoS 1 re-sends of a window
        assert True in states and False in states
    finally:
        publisher.stop()
        sub.close()
    assert store.outbox_size() == 0


class Link:
    """A TCP relay between the publisher and the broker that the test can freeze (bytes are
    dropped) and cut (connections closed), like a flaky network; reconnects go through it again."""

    def __init__(self, broker_port: int) -> None:
        self._broker_port = broker_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.drop_to_broker = self.drop_to_client = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._broker_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, "drop_to_broker"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "drop_to_client"), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, drop: str) -> None:
        try:
            while data := source.recv(65536):
                if not getattr(self, drop):
                    target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            sock.close()

    def cut(self) -> None:
        self.drop_to_broker = self.drop_to_client = False
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._sockets.clear()

    def close(self) -> None:
        self._server.close()
        self.cut()


@pytest.mark.parametrize("lost", ["publishes", "acks"])
def test_messages_in_flight_when_the_link_drops_are_sent_again(broker: Mosquitto, store: EventStore,
                                                                lost: str) -> None:
    link, sub = Link(broker.port), Subscriber(broker.port)
    config = MqttConfig(host="127.0.0.1", port=link.port, device_id="line1")
    publisher = MqttPublisher(config, store, window=4, **FAST).start()
    try:
        _until(lambda: publisher.state.connected)
        _add(store, publisher, "press-4", 0)
        sub.wait_for(lambda s: _ids(s) == [1])
        link.drop_to_client = True  # PUBACKs vanish
        link.drop_to_broker = lost == "publishes"  # ... and so do the PUBLISHes themselves
        for i in range(1, 10):
            _add(store, publisher, "press-4", i)
        time.sleep(0.3)
        assert publisher.state.pending == 9  # nothing acknowledged, so nothing retired
        seen_before_cut = len(_ids(sub))
        assert seen_before_cut == (1 if lost == "publishes" else 5)  # the window reached the broker
        link.cut()
        sub.wait_for(lambda s: set(_ids(s)) >= set(range(1, 11)), timeout=8)
        _until(lambda: not publisher.state.pending)
        ids = _ids(sub)
        assert _first_arrivals(ids) == list(range(1, 11)) and publisher.state.pending == 0
        assert len(ids) == (10 if lost == "publishes" else 14)  # the 4 unacknowledged are re-sent once
    finally:
        publisher.stop()
        sub.close()
        link.close()


def test_status_is_retained_online_then_offline_after_a_clean_stop(broker: Mosquitto, store: EventStore) -> None:
    publisher = MqttPublisher(_config(broker), store, **FAST).start()
    try:
        _until(lambda: publisher.state.connected)
        first = Subscriber(broker.port, topic=status_topic("edge-sdk", "line1"))
        first.wait_for(lambda s: ("online", True) in s.statuses())  # retained: a late subscriber sees it
    finally:
        publisher.stop()
    first.wait_for(lambda s: s.statuses()[-1][0] == "offline")
    first.close()
    late = Subscriber(broker.port, topic=status_topic("edge-sdk", "line1"))
    late.wait_for(lambda s: s.statuses() == [("offline", True)])
    late.close()


_DAEMON = """
import sys, time
from edge_sdk.daemon.config import MqttConfig
from edge_sdk.daemon.events import EventStore
from edge_sdk.daemon.mqtt import MqttPublisher
publisher = MqttPublisher(MqttConfig("127.0.0.1", int(sys.argv[2]), device_id="line1"), EventStore(sys.argv[1])).start()
while not publisher.state.connected:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(60)
"""


def test_last_will_says_offline_when_the_daemon_dies(broker: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, topic=status_topic("edge-sdk", "line1"))
    child = subprocess.Popen([sys.executable, "-c", _DAEMON, str(tmp_path / "child"), str(broker.port)], cwd=ROOT,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline() == b"connected\n"
        sub.wait_for(lambda s: s.statuses()[-1:] == [("online", False)])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    sub.wait_for(lambda s: s.statuses()[-1][0] == "offline")
    sub.close()


def test_asset_ids_are_made_topic_safe_and_reversible(broker: Mosquitto, store: EventStore) -> None:
    odd = "line/1#a+b%2F c\u00e9"
    assert topic_safe(odd) == "line%2F1%23a%2Bb%252F c\u00e9" and unquote(topic_safe(odd)) == odd
    assert event_topic("plant/a", "line1", "x/y") == "plant/a/line1/events/x%2Fy"
    for hostile in ("a\nb", "a\x7f", "a\u0085", "a\ufdd0", "a\uffff", "a\U0010fffe", "\0"):  # MQTT forbids them
        safe = topic_safe(hostile)
        assert unquote(safe) == hostile and safe.isprintable() and safe.isascii() or safe[0] == "a" and \
            all(c.isprintable() for c in safe)
    sub = Subscriber(broker.port)
    publisher = MqttPublisher(_config(broker), store, **FAST).start()
    try:
        _add(store, publisher, odd, 0)
        sub.wait_for(lambda s: len(s.events()) == 1)
        [(topic, payload, _)] = [m for m in sub.messages if "/events/" in m[0]]
        assert topic == f"edge-sdk/line1/events/{topic_safe(odd)}" and json.loads(payload)["asset_id"] == odd
    finally:
        publisher.stop()
        sub.close()


def test_outbox_bound_keeps_the_newest_while_the_broker_is_away(broker: Mosquitto, tmp_path: Path) -> None:
    broker.stop()
    with EventStore(tmp_path / "bounded", max_outbox=5) as store:
        publisher = MqttPublisher(_config(broker), store, **FAST).start()
        try:
            for i in range(8):
                _add(store, publisher, "press-4", i)
            assert store.outbox_size() == 5 and store.outbox_dropped == 3
            _until(lambda: publisher.state.last_error)
            assert "cannot reach the broker" in str(publisher.state.last_error)
            broker.start()
            sub = Subscriber(broker.port)
            sub.wait_for(lambda s: _ids(s)[-1:] == [8], timeout=8)
            assert _first_arrivals(_ids(sub)) == [4, 5, 6, 7, 8]
            sub.close()
        finally:
            publisher.stop()


def test_stop_flushes_the_outbox_first(broker: Mosquitto, store: EventStore) -> None:
    for i in range(50):  # queued before the publisher exists, as after a daemon restart
        _add(store, None, "press-4", i)
    sub = Subscriber(broker.port)
    publisher = MqttPublisher(_config(broker), store, **FAST).start()
    _until(lambda: publisher.state.connected)
    publisher.stop(timeout=5)
    assert store.outbox_size() == 0
    sub.wait_for(lambda s: len(s.events()) >= 50)
    assert _first_arrivals(_ids(sub)) == list(range(1, 51))
    sub.close()


def test_refused_credentials_are_reported_and_the_password_never_logged(
        tmp_path: Path, store: EventStore, caplog: pytest.LogCaptureFixture) -> None:
    require_mosquitto()
    caplog.set_level(logging.DEBUG)
    with Mosquitto(tmp_path / "closed", allow_anonymous=False) as closed:
        config = _config(closed, username="edge", password="s3cret-Pa55")
        assert "s3cret" not in repr(config)
        publisher = MqttPublisher(config, store, **FAST).start()
        try:
            _until(lambda: publisher.state.last_error)
            assert "refused" in str(publisher.state.last_error) and not publisher.state.connected
        finally:
            publisher.stop(timeout=1)
    assert "s3cret" not in caplog.text and "as 'edge'" in caplog.text
