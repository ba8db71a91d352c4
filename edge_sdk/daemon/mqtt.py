"""Publish stored events over MQTT from the store's persistent outbox.

Topics (``prefix`` and ``device_id`` from ``[mqtt]``)::

    {prefix}/{device_id}/events/{asset}   one message per event, QoS 1, not retained
    {prefix}/{device_id}/status           "online" / "offline", QoS 1, retained;
                                          the Last Will is "offline"

``{asset}`` is the asset id made topic-safe: ``%`` -> ``%25``, ``/`` -> ``%2F``, ``+`` -> ``%2B``,
``#`` -> ``%23``, and control characters and Unicode non-characters (which the daemon refuses as
asset ids, see ``runtime.assets``, but an older store may hold) percent-encoded as UTF-8, since a
broker drops the client over them; everything else is kept. ``urllib.parse.unquote`` gives the
asset id back. Subscribe to ``{prefix}/+/events/#`` for every device's events.

An event message is UTF-8 JSON::

    {"id": 42, "asset_id": "press-4", "fault": "bearing", "confidence": 0.93,
     "timestamp": 1718000000.5, "snapshot": true, "diagnosis": {...Diagnosis.to_dict()...}}

``id`` is the event's id in the device's store (increasing, never reused); ``snapshot`` says
whether the image can be fetched from the daemon's HTTP API.

Delivery: at least once, in order. A message leaves the outbox only after the broker's PUBACK.
Up to ``window`` messages are in flight on one connection (MQTT keeps QoS 1 order per
connection) and acknowledged messages are retired strictly in order. When the connection
drops, paho re-sends the unacknowledged ones (DUP flag) on reconnect, and nothing newer is
sent until they are acknowledged; after a restart of the daemon the outbox is sent again from
its oldest row. Either way a
consumer may see a message twice (QoS 1), never out of first-arrival order, and never lose one
unless the outbox bound dropped it (logged and counted) or it became a dead letter.

Dead letters. A broker may refuse one message for good: mosquitto drops the connection of a
client that sends a packet over its ``max_packet_size`` (MQTT 3.1.1 has no way to say why), an
MQTT 5 broker may answer with a PUBACK reason code >= 0x80. In-order delivery would then retry
that message forever and nothing after it would ever leave. So a failed publish is counted in
the outbox row (``EventStore.outbox_attempt``, kept across restarts) and after ``max_attempts``
of them (at once for a failure reason code) the row moves to the store's dead letters with the
reason (``EventStore.dead_letters``), one WARNING is logged, and the later messages go on.
A publish counts as failed only when (1) the connection, once established, dropped while the
message was the oldest unacknowledged one in flight, (2) not for a keep-alive timeout or a
broker shutting down, and (3) the next connection attempt succeeded: a broker that went away
(outage, restart, lost network) refuses that attempt, and then nothing is counted. A 3.1.1
client sees the same "connection lost" for a broker that drops it and one that dies, so (3) is
what tells them apart. And the last attempt before a message becomes a dead letter is made with
it alone in flight: the broker acknowledges the messages before the one it refuses and then
closes the connection, and those PUBACKs may be lost with it, which would blame an earlier one.

Session: ``clean_session=True``. The outbox is the durable state; a persistent broker session
would only keep subscriptions (we have none) and QoS 2 state, and would make the broker hold a
session for every device id ever seen. The client id is ``edge-sdk-{device_id}``: two daemons
with one device id would keep disconnecting each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_sdk.daemon.config import MqttConfig
from edge_sdk.daemon.events import EventStore, OutboxItem
from edge_sdk.errors import DaemonError

__all__ = ["MqttPublisher", "PublisherState", "event_topic", "status_topic", "topic_safe"]

log = logging.getLogger(__name__)
_paho = logging.getLogger(f"{__name__}.paho")

_UNSAFE = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23"}
# DISCONNECT reasons that are about the link or the broker, never about the message in flight:
# server shutting down, keep alive timeout, session taken over, use another server, server moved
_NOT_THE_MESSAGE = frozenset({0x8B, 0x8D, 0x8E, 0x9C, 0x9D})


def _encoded(char: str) -> str:
    """``char`` percent-encoded (UTF-8), when it may not stand in an MQTT topic as it is."""
    code = ord(char)
    if char in _UNSAFE:
        return _UNSAFE[char]
    if code < 0x20 or 0x7F <= code <= 0x9F or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE \
            or 0xD800 <= code <= 0xDFFF:  # controls and non-characters: MQTT 4.7.3 / 1.5.4; brokers drop the client
        return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
    return char


def topic_safe(asset_id: str) -> str:
    """``asset_id`` as one topic level (module docstring); reversed by ``urllib.parse.unquote``."""
    return "".join(_encoded(char) for char in asset_id)


def event_topic(prefix: str, device_id: str, asset_id: str) -> str:
    return f"{prefix}/{device_id}/events/{topic_safe(asset_id)}"


def status_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/status"


@dataclass(frozen=True)
class PublisherState:
    connected: bool
    delivered: int  # messages acknowledged by the broker since start()
    pending: int  # messages in the outbox
    last_error: str | None
    dead_letters: int  # messages the broker would not take, in the store's dead letters (module docstring)


class MqttPublisher:
    """A background thread that drains ``store``'s outbox to the broker in ``config``; a message
    whose publish failed ``max_attempts`` times becomes a dead letter (module docstring)."""

    def __init__(self, config: MqttConfig, store: EventStore, *,
                 on_state: Callable[[PublisherState], None] | None = None, window: int = 20,
                 reconnect_delay_s: tuple[int, int] = (1, 30), poll_s: float = 1.0, max_attempts: int = 3) -> None:
        if not (isinstance(window, int) and 1 <= window <= 1000):
            raise DaemonError(f"window is {window!r}; expected an int 1-1000 (messages in flight)")
        if not (isinstance(max_attempts, int) and 1 <= max_attempts <= 100):
            raise DaemonError(f"max_attempts is {max_attempts!r}; expected an int 1-100 (failed publishes of one "
                              "message before it becomes a dead letter)")
        low, high = reconnect_delay_s
        if not (1 <= low <= high):
            raise DaemonError(f"reconnect_delay_s is {reconnect_delay_s!r}; expected (min, max) with 1 <= min <= max",
                              hint="e.g. (1, 30): reconnect after 1 s, doubling up to 30 s")
        self.config = config
        self._store = store
        self._on_state = on_state
        self._window = window
        self._max_attempts = max_attempts
        self._reconnect_delay_s = reconnect_delay_s
        self._poll_s = poll_s
        self._status = status_topic(config.prefix, config.device_id)
        self._wake = threading.Event()
        self._connected = False
        self._generation = 0  # counts successful connections
        self._delivered = 0
        self._last_error: str | None = None
        self._stop_by: float | None = None  # monotonic deadline of the final flush, once stop() runs
        self._thread: threading.Thread | None = None
        self._in_flight = _Window()  # the delivery thread's; paho's thread only reads it
        # (message, reason, alone in flight): the oldest unacknowledged one when the connection dropped
        self._suspect: tuple[OutboxItem, str, bool] | None = None
        self._failed: deque[tuple[OutboxItem, str, bool]] = deque()  # suspects confirmed by a reconnect
        self._refused: dict[int, str] = {}  # mid -> the failure reason code of its PUBACK
        self._client = self._make_client(reconnect_delay_s)

    def _make_client(self, reconnect_delay_s: tuple[int, int]) -> mqtt.Client:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"edge-sdk-{self.config.device_id}", clean_session=True,
                             protocol=mqtt.MQTTv311)
        client.on_log = _paho_log
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password or None)
        client.will_set(self._status, "offline", qos=1, retain=True)
        client.reconnect_delay_set(*reconnect_delay_s)
        client.max_inflight_messages_set(self._window + 2)  # + the status messages
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        return client

    # -- public -------------------------------------------------------------------------------

    def start(self) -> MqttPublisher:
        """Connect in the background (retrying with backoff) and start delivering."""
        if self._thread is not None:
            raise DaemonError("this MqttPublisher is already started", hint="create one publisher per daemon")
        user = f" as {self.config.username!r}" if self.config.username else ""
        log.info("MQTT: connecting to %s:%d%s; events on %s", self.config.host, self.config.port, user,
                 event_topic(self.config.prefix, self.config.device_id, "<asset>"))
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="edge-sdk-mqtt", daemon=True)
        self._thread.start()
        return self

    def notify(self) -> None:
        """Wake the delivery loop: an event was added (it also polls every ``poll_s``)."""
        self._wake.set()

    @property
    def state(self) -> PublisherState:
        return PublisherState(self._connected, self._delivered, self._store.outbox_size(), self._last_error,
                              self._store.dead_letter_count())

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout``, publish ``offline`` and disconnect."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        self._stop_by = deadline - min(1.0, timeout / 4)  # keep time for the offline status
        self._wake.set()
        self._thread.join(max(0.0, self._stop_by - time.monotonic()) + 0.5)
        if self._connected:
            info = self._client.publish(self._status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass  # the connection dropped: the Last Will says offline instead
        self._client.disconnect()
        self._client.loop_stop()
        self._thread = None
        pending = self._store.outbox_size()
        log.info("MQTT: stopped; %d delivered, %d left in the outbox for the next start", self._delivered, pending)

    def __enter__(self) -> MqttPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- delivery loop ------------------------------------------------------------------------

    def _run(self) -> None:
        window = self._in_flight
        while True:
            self._wake.clear()
            stop_by = self._stop_by
            try:
                self._retire(window)
                self._count_failures(window)
                if stop_by is not None and self._flushed(window, stop_by):
                    return
                if self._connected:
                    self._send(window)
            except DaemonError as exc:  # the store failed (disk full, closed): retry after poll_s
                self._error(f"outbox: {exc}")
            except Exception:  # a bug: keep the daemon up, log it loudly
                log.exception("MQTT delivery loop failed; retrying")
            self._wake.wait(self._poll_s if stop_by is None else 0.05)

    def _flushed(self, window: _Window, stop_by: float) -> bool:
        """While stopping: nothing more can or needs to be sent."""
        if not self._connected or time.monotonic() >= stop_by:
            return True
        return not window.inflight and not self._store.outbox_pending(1, after_seq=window.after)

    def _send(self, window: _Window) -> None:
        if window.inflight and window.generation != self._generation:
            return  # paho re-sends these first after a reconnect; anything newer would overtake them
        window.generation = self._generation
        room = (1 if window.probe is not None else self._window) - len(window.inflight)
        if room <= 0:
            return
        for item in self._store.outbox_pending(room, after_seq=window.after):
            topic = event_topic(self.config.prefix, self.config.device_id, item.asset_id)
            window.inflight.append((item, self._client.publish(topic, item.payload_json.encode("utf-8"), qos=1)))
            window.after = item.seq

    def _retire(self, window: _Window) -> None:
        """Mark acknowledged messages delivered, strictly in order; refused ones become dead letters."""
        done: list[int] = []
        refused: list[tuple[OutboxItem, str]] = []
        while window.inflight:
            item, info = window.inflight[0]
            try:
                if not info.is_published():
                    break
            except (RuntimeError, ValueError):  # paho did not take it (disconnected that instant)
                window.rewind(item.seq)  # send it and what followed again; QoS 1 allows the duplicates
                break
            window.inflight.popleft()
            if window.probe is not None and item.seq >= window.probe:
                window.probe = None
            reason = self._refused.pop(info.mid, None)
            if reason is None:
                done.append(item.seq)
            else:
                refused.append((item, f"the broker answered the publish with {reason}"))
        if done:
            self._store.outbox_done(*done)
            self._delivered += len(done)
            self._emit()
        for item, reason in refused:
            self._dead_letter(item, reason)

    def _count_failures(self, window: _Window) -> None:
        """Count the failed publishes that a reconnect confirmed. A message becomes a dead letter after
        ``max_attempts``, the last of them sent alone: with others behind it in flight, the PUBACK of
        an earlier one lost as the broker closed the connection would make it look guilty."""
        while self._failed:
            item, reason, alone = self._failed.popleft()
            attempts = self._store.outbox_attempt(item.seq)
            if attempts == 0:
                continue  # no longer in the outbox: delivered meanwhile, or dropped by its bound
            if attempts >= self._max_attempts and alone:
                window.probe = None
                self._dead_letter(item, f"the broker dropped the connection on {attempts} publish attempts ({reason})")
            else:
                log.info("MQTT: the connection dropped while event %d was the oldest unacknowledged message "
                         "(%s); failed attempt %d of %d", item.event_id, reason, attempts, self._max_attempts)
                if attempts < self._max_attempts - 1 or alone:
                    continue  # paho sends it again on the new connection
                window.probe = item.seq  # the next attempt decides: it alone in flight
            if self._stop_by is None:
                self._renew_client()
                window.rewind(window.inflight[0][0].seq if window.inflight else window.after + 1)

    def _dead_letter(self, item: OutboxItem, reason: str) -> None:
        topic = event_topic(self.config.prefix, self.config.device_id, item.asset_id)
        if self._store.outbox_dead_letter(item.seq, topic, reason) is None:
            return
        log.warning("MQTT: event %d on %s is a dead letter, not delivered: %s; the events after it go on "
                    "(%d dead letters in the store)", item.event_id, topic, reason, self._store.dead_letter_count())
        self._emit()

    def _renew_client(self) -> None:
        """Replace the paho client: paho keeps an unacknowledged message and publishes it again on
        every reconnect, and has no call to forget one. The window is sent again from the outbox."""
        old, self._client = self._client, self._make_client(self._reconnect_delay_s)  # old's callbacks now ignored
        self._connected = False
        self._suspect = None
        self._refused.clear()
        old.disconnect()
        old.loop_stop()
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self._client.loop_start()

    # -- paho callbacks (paho's network thread) -------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self._client:
            return
        suspect, self._suspect = self._suspect, None
        if reason.is_failure:
            self._error(f"broker {self.config.host}:{self.config.port} refused the connection: {reason}")
            return
        if suspect is not None:  # the broker is up: the drop was about that message
            self._failed.append(suspect)
        client.publish(self._status, "online", qos=1, retain=True)
        self._generation += 1
        self._connected = True
        self._last_error = None
        log.info("MQTT: connected to %s:%d", self.config.host, self.config.port)
        self._emit()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self._client:
            return
        was = self._connected
        self._connected = False
        self._suspect = self._suspect_of(reason) if was and self._stop_by is None else None
        if was and self._stop_by is None:
            self._error(f"lost the connection to {self.config.host}:{self.config.port}: {reason}; reconnecting")
        self._wake.set()
        self._emit()

    def _suspect_of(self, reason: ReasonCode) -> tuple[OutboxItem, str, bool] | None:
        """The message a dropped connection may have been about: the oldest one in flight without a PUBACK."""
        if reason.value in _NOT_THE_MESSAGE:
            return None
        found = self._in_flight.oldest_unacked()
        return None if found is None else (found[0], f"last: {reason}", found[1])

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if client is not self._client:
            return
        self._suspect = None  # the broker went away: not the message's fault
        self._error(f"cannot reach the broker at {self.config.host}:{self.config.port}; retrying")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason.is_failure and client is self._client and self._in_flight.holds(mid):  # MQTT 5 PUBACK >= 0x80
            self._refused[mid] = f"{reason} (0x{reason.value:02X})"
        self._wake.set()

    def _error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("MQTT: %s", message)
        self._last_error = message
        self._emit()

    def _emit(self) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(self.state)
        except Exception:  # a failing listener must not stop delivery
            log.exception("MQTT on_state callback failed")


def _paho_log(client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
    """paho's log at DEBUG (it says ERROR for every failed reconnect; our warnings cover those),
    except exceptions raised in our callbacks. paho logs CONNECT flags, never the password."""
    _paho.log(logging.ERROR if message.startswith("Caught exception") else logging.DEBUG, "%s", message)


class _Window:
    """Messages handed to paho and not yet retired, oldest first, sent on connection ``generation``;
    ``after`` is the last seq handed over. While ``probe`` is set, one message at a time is sent,
    until that seq is retired."""

    def __init__(self) -> None:
        self.inflight: deque[tuple[OutboxItem, mqtt.MQTTMessageInfo]] = deque()
        self.after = 0
        self.generation = 0
        self.probe: int | None = None

    def rewind(self, seq: int) -> None:
        self.inflight.clear()
        self.after = seq - 1

    def oldest_unacked(self) -> tuple[OutboxItem, bool] | None:
        """The first message handed to paho and not acknowledged, and whether it is the only one
        (safe from paho's thread)."""
        unacked = []
        for item, info in list(self.inflight):  # a copy: the delivery thread may change the deque
            try:
                if not info.is_published():
                    unacked.append(item)
            except (RuntimeError, ValueError):  # paho never took it, so never sent it
                break
        return (unacked[0], len(unacked) == 1) if unacked else None

    def holds(self, mid: int) -> bool:
        return any(info.mid == mid for _, info in list(self.inflight))
