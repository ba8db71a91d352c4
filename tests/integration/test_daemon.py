"""The real daemon (`edge-sdk serve` in a subprocess) on a loopback port, with a real mosquitto broker:
the stock tritonclient, tokens, diagnoses and events over HTTP and MQTT, a broker outage, kill -9
during event writes, hot swaps to good and corrupted packages, malformed requests, SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

import edge_sdk
from edge_sdk.client import Client, DaemonRequestError
from runtime.package import Package
from tests import builders
from tests.broker import Mosquitto, require_mosquitto
from tests.services import free_port

TOKEN = "integration-test-token-0123456789"
BGR = {"red": (30, 40, 220), "green": (40, 200, 30), "blue": (210, 50, 40)}
RULE = """
[fusion]
faults = ["none", "bearing_wear", "leak", "overheating"]
[fusion.models.words]
map = {bearing = "bearing_wear", leak = "leak", overheating = "overheating"}
[fusion.models.colors]
map = {red = "overheating", blue = "leak", green = "none"}
"""


def png(color: str, size: int = 24) -> bytes:
    ok, data = cv2.imencode(".png", np.full((size, size, 3), BGR[color], np.uint8))
    assert ok
    return data.tobytes()


class DaemonProcess:
    """``edge-sdk serve --config`` as a child process, with its log kept for failures."""

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port, self.url = config, port, f"http://127.0.0.1:{port}"
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "serve", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def write_config(root: Path, *, port: int, models: dict[str, Path], broker_port: int | None = None,
                 kb: Path | None = None, extra: str = "") -> Path:
    (root / "token").write_text(TOKEN + "\n")
    lines = ["[server]", f"port = {port}", 'token_file = "token"', "max_body_mb = 1", "",
             "[storage]", f'dir = "{root / "state"}"', "", "[events]", "min_confidence = 0.3", "cooldown_s = 0", ""]
    for name, package in models.items():
        lines += [f"[models.{name}]", f'package = "{package}"', 'backend = "onnxruntime-cpu"', "threads = 1", ""]
    if kb is not None:
        lines += ["[knowledge_base]", f'package = "{kb}"', "k = 2", ""]
    if broker_port is not None:
        lines += ["[mqtt]", 'host = "127.0.0.1"', f"port = {broker_port}", 'prefix = "plant"', 'device_id = "jet-1"', ""]
    path = root / "edge-sdk.toml"
    path.write_text("\n".join(lines) + RULE + extra)
    return path


def call(daemon: DaemonProcess, method: str, path: str, body: bytes = b"", content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """One authenticated request: (status, JSON body, content type); error answers included."""
    request = urllib.request.Request(daemon.url + path, data=body or None, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers["content-type"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers["content-type"]


class Subscriber:
    """A paho subscriber collecting (topic, payload) pairs from the broker."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict[str, Any]]] = []
        # A persistent session: the broker queues QoS 1 messages for it while it reconnects.
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{port}-{time.time_ns()}",
                                  clean_session=False)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def wait(self, count: int, timeout: float = 20.0) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len({m[1]["id"] for m in self.messages}) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker", persistent=True)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def served(tmp_path: Path, image_package: Path, text_package: Path, broker: Mosquitto) -> Iterator[DaemonProcess]:
    kb = builders.build_kb(tmp_path / "kb")
    config = write_config(tmp_path, port=free_port(), models={"colors": image_package, "words": text_package},
                          broker_port=broker.port, kb=kb.path)
    daemon = DaemonProcess(config, int(config.read_text().split("port = ")[1].split()[0])).start()
    yield daemon
    daemon.kill()


def test_tritonclient_gets_the_same_outputs_as_the_sdk(served: DaemonProcess, image_package: Path,
                                                       text_package: Path) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("colors", headers=headers)
    for name, path in (("colors", image_package), ("words", text_package)):
        package = Package.open(path)
        feeds, _ = package.golden("fp32")
        inputs = []
        for spec in package.manifest.inputs:
            tensor = httpclient.InferInput(spec.name, list(feeds[spec.name].shape),
                                           {"float32": "FP32", "int64": "INT64"}[spec.dtype])
            tensor.set_data_from_numpy(feeds[spec.name], binary_data=False)
            inputs.append(tensor)
        result = client.infer(name, inputs, headers=headers)
        with edge_sdk.load(path, backend="onnxruntime-cpu") as model:
            expected = model._pipeline.infer(feeds)
        output = package.manifest.outputs[0].name
        np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-5, atol=1e-6)
        meta = client.get_model_metadata(name, headers=headers)
        assert [i["name"] for i in meta["inputs"]] == [s.name for s in package.manifest.inputs]


def test_everything_but_health_needs_the_token(served: DaemonProcess) -> None:
    for path in ("/v2", "/v2/models/colors", "/v1/models", "/v1/events", "/metrics", "/openapi.json"):
        for auth in (None, "Bearer wrong-token", f"Basic {TOKEN}"):
            request = urllib.request.Request(served.url + path)
            if auth:
                request.add_header("Authorization", auth)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=5)
            assert info.value.code == 401 and b"bearer token" in info.value.read()
    with urllib.request.urlopen(served.url + "/v2/health/live", timeout=5) as r:
        assert json.loads(r.read()) == {"live": True}
    with pytest.raises(DaemonRequestError, match="401"):
        Client(served.url, "nope").models()


def test_diagnoses_become_events_on_http_and_mqtt(served: DaemonProcess, broker: Mosquitto) -> None:
    subscriber = Subscriber(broker.port, "plant/jet-1/events/#")
    try:
        client = Client(served.url, TOKEN)
        text = client.diagnose_text("pump-7", "the pump is hot")
        assert text["prediction"]["label"] == "overheating" and text["diagnosis"]["fault"] == "overheating"
        assert text["diagnosis"]["similar"][0]["incident"]["id"] == "INC-3" and text["event"] is not None
        image = client.diagnose_image("pump-7", png("red"))
        assert image["prediction"]["label"] == "red" and image["diagnosis"]["fault"] == "overheating"
        assert len(image["diagnosis"]["evidence"]) == 2 and image["event"] > text["event"]
        calm = client.diagnose_image("fan-2", png("green"))
        assert calm["diagnosis"]["fault"] == "none" and calm["event"] is None  # not a fault: no event
        events = client.events(asset="pump-7")
        assert [e["id"] for e in events] == [image["event"], text["event"]]  # newest first
        assert events[0]["snapshot"] and not events[1]["snapshot"]
        snapshot = cv2.imdecode(np.frombuffer(client.snapshot(image["event"]), np.uint8), cv2.IMREAD_COLOR)
        assert snapshot.shape == (24, 24, 3)
        messages = subscriber.wait(2)
        assert [m[1]["id"] for m in messages][:2] == [text["event"], image["event"]]
        assert {m[0] for m in messages} == {"plant/jet-1/events/pump-7"}
        assert "edge_sdk_inference_latency_seconds" in client.metrics()
    finally:
        subscriber.close()


def test_events_made_while_the_broker_is_down_arrive_in_order(served: DaemonProcess, broker: Mosquitto) -> None:
    client = Client(served.url, TOKEN)
    subscriber = Subscriber(broker.port, "plant/jet-1/events/#")  # subscribed before the outage
    try:
        time.sleep(0.3)
        broker.stop()
        made = [client.diagnose_text(f"pump-{i}", "oil leak drip under the pump")["event"] for i in range(6)]
        assert all(made) and made == sorted(made)
        deadline = time.monotonic() + 5  # the daemon samples the outbox once a second
        while "edge_sdk_mqtt_outbox_size 6.0" not in client.metrics() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "edge_sdk_mqtt_outbox_size 6.0" in client.metrics()
        broker.start()  # same port, same persistent sessions
        messages = subscriber.wait(6)
        first_seen: list[int] = []
        for _, payload in messages:
            if payload["id"] not in first_seen:
                first_seen.append(payload["id"])
        assert first_seen == made  # every event, in order; QoS 1 may repeat one, never lose one
    finally:
        subscriber.close()


def test_malformed_requests_get_clear_4xx(served: DaemonProcess) -> None:
    def call(method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> tuple[int, dict]:
        request = urllib.request.Request(served.url + path, data=body or None, method=method)
        request.add_header("Authorization", f"Bearer {TOKEN}")
        request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = call("POST", "/v2/models/colors/infer", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    wrong = {"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}]}
    status, body = call("POST", "/v2/models/colors/infer", json.dumps(wrong).encode())
    assert status == 400 and "dimension 2 must be 8" in body["error"]
    short = {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 10}]}
    status, body = call("POST", "/v2/models/colors/infer", json.dumps(short).encode())
    assert status == 400 and "needs 192" in body["error"]
    status, body = call("POST", "/v2/models/colors/infer", json.dumps({"inputs": [{**wrong["inputs"][0],
                                                                                  "datatype": "INT64"}]}).encode())
    assert status == 400 and "expected FP32" in body["error"]
    status, body = call("POST", "/v1/models/colors/predict", b"this is not an image", "image/png")
    assert status == 415 and "not a JPEG, PNG or BMP" in body["error"]
    status, body = call("POST", "/v1/models/colors/predict", png("red")[:60], "image/png")
    assert status == 422 and "could not be decoded" in body["error"]
    # An oversized body is refused from its declared length, before it is read (max_body_mb = 1).
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    connection.putrequest("POST", "/v1/models/colors/predict")
    for header, value in (("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "image/png"),
                          ("Content-Length", str(2 * 1024 * 1024))):
        connection.putheader(header, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "over the 1048576-byte limit" in json.loads(response.read())["error"]
    connection.close()
    status, body = call("POST", "/v1/models/nope/predict", png("red"), "image/png")
    assert status == 404 and "not served" in body["error"]
    status, body = call("POST", "/v1/diagnose", png("red"), "image/png")
    assert status == 400 and "?asset=" in body["error"]
    status, body = call("POST", "/v1/models/words/predict", json.dumps({"text": ""}).encode())
    assert status == 400 and "non-empty texts" in body["error"]
    status, body = call("GET", "/v1/events?limit=0")
    assert status == 400 and "limit" in body["error"]
    assert Client(served.url, TOKEN).predict("colors", png("blue"))["label"] == "blue"  # still serving


def test_hot_swap_keeps_serving_through_a_corrupted_package(served: DaemonProcess, tmp_path: Path,
                                                            image_onnx: Path, image_folder: Path) -> None:
    client = Client(served.url, TOKEN)
    before = {m["name"]: m for m in client.models()}["colors"]
    corrupted = tmp_path / "corrupted.edgepkg"
    source = Path(before["package"])
    with zipfile.ZipFile(source) as zf:
        member = zf.getinfo("model.onnx")
    data = bytearray(source.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[start + member.compress_size // 2] ^= 0xFF  # inside the graph's bytes, not a header field zip ignores
    corrupted.write_bytes(bytes(data))
    with pytest.raises(DaemonRequestError, match="was not swapped") as info:
        client.reload("colors", str(corrupted))
    assert info.value.status == 409
    after = {m["name"]: m for m in client.models()}["colors"]
    assert after["package"] == before["package"] and "corrupted.edgepkg" in after["last_swap_error"]
    assert client.predict("colors", png("red"))["label"] == "red"
    v2 = tmp_path / "colors-v2.edgepkg"
    edge_sdk.convert(image_onnx, v2, task="image-classification", labels=builders.COLOR_LABELS, name="colors",
                     version="2", preprocess=builders.preprocess_dict(), validation=image_folder)
    swapped = client.reload("colors", str(v2))
    assert swapped["version"] == "2" and swapped["swaps"] == 1
    assert client.predict("colors", png("green"))["label"] == "green"


def test_reloads_take_packages_only_from_the_model_directories(served: DaemonProcess, tmp_path: Path,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """An authenticated client could load a package from any directory on the device; now only from the
    configured packages' directories (and below: deploy's versions/) and server.model_dirs."""
    import shutil

    client = Client(served.url, TOKEN)
    before = {m["name"]: m for m in client.models()}["colors"]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    outside = Path(shutil.copy(before["package"], elsewhere / "colors.edgepkg"))
    link = tmp_path / "looks-inside.edgepkg"  # a link in the model directory to a package outside it
    link.symlink_to(outside)
    for path, status, why in ((str(outside), 403, "outside the directories models are served from"),
                              (str(link), 403, "outside the directories models are served from"),
                              ("colors.edgepkg", 403, "relative path")):
        with pytest.raises(DaemonRequestError) as info:
            client.reload("colors", path)
        assert info.value.status == status and why in str(info.value), str(info.value)
    assert "hot swap of colors refused" in served.log.read_text()
    after = {m["name"]: m for m in client.models()}["colors"]
    assert after["package"] == before["package"] and after["swaps"] == 0


def test_a_reload_to_an_explicit_package_is_served_again_after_a_restart(
        tmp_path: Path, image_package: Path, image_onnx: Path, image_folder: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port, models={"colors": image_package})
    daemon = DaemonProcess(config, port).start()
    try:
        client = Client(daemon.url, TOKEN)
        v2 = tmp_path / "colors-v2.edgepkg"
        edge_sdk.convert(image_onnx, v2, task="image-classification", labels=builders.COLOR_LABELS, name="colors",
                         version="2", preprocess=builders.preprocess_dict(), validation=image_folder)
        assert client.reload("colors", str(v2))["version"] == "2"
        assert daemon.terminate() == 0
        daemon.start()
        served = {m["name"]: m for m in client.models()}["colors"]
        assert served["version"] == "2" and served["package"] == str(v2)
        assert client.predict("colors", png("red"))["label"] == "red"
        client.reload("colors")  # back to the configured package: that is what a restart serves now
        assert daemon.terminate() == 0
        daemon.start()
        assert {m["name"]: m for m in client.models()}["colors"]["package"] == str(image_package)
        # a remembered package that has gone: logged, and the configured one serves
        client.reload("colors", str(v2))
        assert daemon.terminate() == 0
        v2.unlink()
        daemon.start()
        assert {m["name"]: m for m in client.models()}["colors"]["package"] == str(image_package)
        assert "no longer loads" in daemon.log.read_text()
    finally:
        daemon.kill()


def test_dead_letters_are_listed_over_http(tmp_path: Path, image_package: Path) -> None:
    """What the broker refused (tests/integration/test_mqtt_dead_letter.py makes mosquitto refuse one) is
    kept in the store with its reason; the operator reads it from the daemon."""
    from edge_sdk.daemon.events import EventStore

    port = free_port()
    config = write_config(tmp_path, port=port, models={"colors": image_package})
    with EventStore(tmp_path / "state") as store:
        event = store.add("press-4", "red", 0.9, {"fault": "overheating"})
        [item] = store.outbox_pending(10)
        store.outbox_dead_letter(item.seq, "plant/jet-1/events/press-4", "the broker dropped the connection on 3 "
                                 "publish attempts")
    daemon = DaemonProcess(config, port).start()
    try:
        status, body, _ = call(daemon, "GET", "/v1/dead-letters")
        assert status == 200 and body["count"] == 1 and body["next"] is None
        [letter] = body["dead_letters"]
        assert letter["event_id"] == event.id and letter["topic"] == "plant/jet-1/events/press-4"
        assert letter["reason"].startswith("the broker dropped the connection") and letter["attempts"] >= 0
        assert call(daemon, "GET", "/v1/dead-letters?limit=0")[0] == 400
    finally:
        daemon.kill()


def test_a_retry_with_the_same_idempotency_key_repeats_the_answer_even_after_kill_9(served: DaemonProcess) -> None:
    """A client retrying after a crash (its answer lost) used to add a second event."""
    client = Client(served.url, TOKEN)
    first = client.diagnose_image("press-9", png("red"), idempotency_key="1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed")
    assert first["event"] is not None
    served.kill()  # the daemon dies; the client never heard (say) and retries once it is back
    served.start()
    again = client.diagnose_image("press-9", png("red"), idempotency_key="1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed")
    assert again == first
    assert [e["id"] for e in client.events(asset="press-9")] == [first["event"]]
    status, _, _ = call(served, "POST", "/v1/diagnose?asset=press-9", png("red"), "image/png",
                        headers={"Idempotency-Key": "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"})
    assert status == 200
    # no event (a green part): the answer is kept too, and replayed
    calm = client.diagnose_text("pump-7", "the pump runs fine", idempotency_key="calm-1")
    assert client.diagnose_text("pump-7", "the pump runs fine", idempotency_key="calm-1") == calm
    # the key of another request, and keys that are not keys
    for body, key, code, why in ((b'{"asset": "pump-7", "text": "oil leak"}', "calm-1", 422, "used for another"),
                                 (b'{"asset": "pump-7", "text": "oil leak"}', "bad key", 400, "visible ASCII"),
                                 (b'{"asset": "pump-7", "text": "oil leak"}', "x" * 256, 400, "visible ASCII")):
        status, answer, _ = call(served, "POST", "/v1/diagnose", body, headers={"Idempotency-Key": key})
        assert status == code and why in answer["error"], answer


def test_an_event_the_broker_refuses_is_dead_lettered_and_later_events_are_delivered(
        tmp_path: Path, image_package: Path, text_package: Path) -> None:
    """mosquitto drops the publisher for a packet over its max_packet_size; in-order delivery used to stop
    at that event forever. Here the image event carries two pieces of evidence (~0.95 KB on the wire), the text
    ones one (~0.7 KB)."""
    require_mosquitto()
    with Mosquitto(tmp_path / "strict", config=["max_packet_size 820"]) as strict:
        port = free_port()
        config = write_config(tmp_path, port=port, models={"colors": image_package, "words": text_package},
                              broker_port=strict.port)
        daemon = DaemonProcess(config, port).start()
        subscriber = Subscriber(strict.port, "plant/jet-1/events/#")
        try:
            client = Client(daemon.url, TOKEN)
            first = client.diagnose_text("pump-7", "the pump is hot")["event"]
            refused = client.diagnose_image("pump-7", png("red"))["event"]
            later = client.diagnose_text("pump-8", "oil leak drip under the pump")["event"]
            messages = subscriber.wait(2, timeout=60)
            assert [m[1]["id"] for m in messages][:2] == [first, later]
            deadline = time.monotonic() + 30
            while call(daemon, "GET", "/v1/dead-letters")[1]["count"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            [letter] = call(daemon, "GET", "/v1/dead-letters")[1]["dead_letters"]
            assert letter["event_id"] == refused and letter["topic"] == "plant/jet-1/events/pump-7"
            assert "the broker dropped the connection" in letter["reason"]
            assert refused not in {m[1]["id"] for m in subscriber.messages}
        finally:
            subscriber.close()
            daemon.kill()


def test_sigterm_drains_and_exits_cleanly(served: DaemonProcess) -> None:
    Client(served.url, TOKEN).diagnose_text("pump-1", "the pump is hot")
    assert served.terminate() == 0
    assert "daemon stopped" in served.log.read_text()


def test_kill_9_during_event_writes_leaves_a_consistent_store(tmp_path: Path, image_package: Path,
                                                              text_package: Path) -> None:
    config = write_config(tmp_path, port=free_port(), models={"colors": image_package, "words": text_package})
    port = int(config.read_text().split("port = ")[1].split()[0])
    daemon = DaemonProcess(config, port).start()
    stop = threading.Event()
    written: list[int] = []

    def hammer(color: str) -> None:
        client = Client(daemon.url, TOKEN, timeout=5)
        while not stop.is_set():
            try:
                written.append(client.diagnose_image(f"asset-{color}", png(color))["event"])
            except Exception:
                return

    threads = [threading.Thread(target=hammer, args=(c,)) for c in ("red", "blue", "red")]
    for t in threads:
        t.start()
    time.sleep(1.5)
    daemon.kill()  # SIGKILL, mid-write
    stop.set()
    for t in threads:
        t.join(10)
    assert len(written) > 5
    restarted = DaemonProcess(config, port).start()
    try:
        client = Client(restarted.url, TOKEN)
        stored = []
        before = None
        while True:
            page = client.events(limit=1000, before=before)
            stored += page
            if len(page) < 1000:
                break
            before = page[-1]["id"]
        ids = {e["id"] for e in stored}
        assert set(written) <= ids  # every acknowledged event survived
        for event in stored:
            if event["snapshot"]:
                image = cv2.imdecode(np.frombuffer(client.snapshot(event["id"]), np.uint8), cv2.IMREAD_COLOR)
                assert image is not None and image.shape == (24, 24, 3)
        assert client.diagnose_image("asset-new", png("red"))["event"] > max(ids)
    finally:
        restarted.kill()


def test_a_configured_camera_source_raises_events(tmp_path: Path, image_package: Path, text_package: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        (frames / f"{i:03d}.png").write_bytes(png("red" if i < 2 else "green"))
    extra = f"""
[sources.oven-cam]
uri = "{frames}"
model = "colors"
asset = "oven-1"
watch = true
"""
    config = write_config(tmp_path, port=free_port(), models={"colors": image_package, "words": text_package},
                          extra=extra)
    daemon = DaemonProcess(config, int(config.read_text().split("port = ")[1].split()[0])).start()
    try:
        client = Client(daemon.url, TOKEN)
        deadline = time.monotonic() + 15
        while not client.events(asset="oven-1") and time.monotonic() < deadline:
            time.sleep(0.1)
        event = client.events(asset="oven-1")[-1]
        assert event["fault"] == "overheating" and event["snapshot"]
        assert event["diagnosis"]["evidence"][0]["source"] == "oven-cam"
        (frames / "004.png").write_bytes(png("blue"))  # a new file in the watched folder
        while not client.events(asset="oven-1", fault="leak") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.events(asset="oven-1", fault="leak")
        state = {s["source"]: s for s in client.sources()}["oven-cam"]
        assert state["model"] == "colors" and state["frames"] == 5 and state["status"] == "open"
        assert 'edge_sdk_source_frames_total{source="oven-cam"}' in client.metrics()
    finally:
        daemon.kill()


def test_a_fusion_rule_keyed_by_configured_names_serves_diagnoses(tmp_path: Path, image_package: Path,
                                                                  text_package: Path, capsys: Any) -> None:
    """`[fusion.models.<configured name>]` (as the README writes it) passes `--check`, the start and a hot
    swap, and then every diagnosis uses that same entry (it answered 422 when run time looked the rule up
    by the package's own name)."""
    from edge_sdk.cli import main

    config = write_config(tmp_path, port=free_port(), models={"cams": image_package, "reports": text_package})
    config.write_text(config.read_text().replace("[fusion.models.words]", "[fusion.models.reports]")
                      .replace("[fusion.models.colors]", "[fusion.models.cams]"))
    assert main(["serve", "--config", str(config), "--check"]) == 0
    daemon = DaemonProcess(config, int(config.read_text().split("port = ")[1].split()[0])).start()
    try:
        client = Client(daemon.url, TOKEN)
        text = client.diagnose_text("pump-7", "the pump is hot")
        assert text["prediction"]["model"] == "words" and text["diagnosis"]["fault"] == "overheating"
        image = client.diagnose_image("pump-7", png("red"), model="cams")
        assert image["diagnosis"]["fault"] == "overheating"
        assert {c["model"] for c in image["diagnosis"]["evidence"]} == {"reports", "cams"}
        assert client.reload("cams")["name"] == "cams"  # the swap is checked against the same entry
        assert client.diagnose_image("fan-2", png("green"))["diagnosis"]["fault"] == "none"
    finally:
        daemon.kill()


def test_an_anomaly_model_serves_its_map_on_the_sdk_api_and_kserve(tmp_path: Path, image_package: Path,
                                                                   text_package: Path) -> None:
    """A package fitted on good parts only: /v1 predictions carry the decision, the normalised score and
    the anomaly map; KServe infer returns the map as the second output, equal to the SDK's."""
    import tritonclient.http as httpclient

    parts = builders.write_parts(tmp_path / "parts", size=64)
    report = edge_sdk.convert(builders.backbone_model(size=64), tmp_path / "parts.edgepkg", task="anomaly-detection",
                              normal=parts / "good", validation=parts / "val", coreset_ratio=0.25,
                              preprocess={"resize": [64, 64], "mean": [127] * 3, "std": [64] * 3})
    config = write_config(tmp_path, port=free_port(),
                          models={"colors": image_package, "words": text_package, "parts": Path(report.package)},
                          extra='[fusion.models.parts]\nmap = {ok = "none", defect = "leak"}\n')
    daemon = DaemonProcess(config, int(config.read_text().split("port = ")[1].split()[0])).start()
    try:
        defect = (parts / "val" / "defect" / "3.png").read_bytes()  # a drawn scratch: far above the threshold
        request = urllib.request.Request(f"{daemon.url}/v1/models/parts/predict", data=defect, method="POST")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        request.add_header("Content-Type", "image/png")
        with urllib.request.urlopen(request, timeout=10) as r:
            served = json.loads(r.read())["predictions"][0]
        with edge_sdk.load(report.package, backend="onnxruntime-cpu") as model:
            local = model.predict(defect)
            feeds = model.pipeline.encode([defect])
        assert served["label"] == local.label and served["score"] == pytest.approx(local.score, rel=1e-4)
        extra = served["extra"]
        assert extra["threshold"] == pytest.approx(local.extra["threshold"])
        assert extra["normalized_score"] == pytest.approx(local.extra["normalized_score"], rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(np.array(extra["anomaly_map"]), local.extra["anomaly_map"], rtol=1e-3, atol=1e-4)
        client = httpclient.InferenceServerClient(url=daemon.url.removeprefix("http://"))
        tensor = httpclient.InferInput("image", list(feeds["image"].shape), "FP32")
        tensor.set_data_from_numpy(feeds["image"], binary_data=True)
        result = client.infer("parts", [tensor], headers={"Authorization": f"Bearer {TOKEN}"})
        assert result.as_numpy("anomaly_score").shape == (1,) and result.as_numpy("anomaly_map").shape == (1, 8, 8)
        np.testing.assert_allclose(result.as_numpy("anomaly_map")[0], local.extra["anomaly_map"], rtol=1e-5, atol=1e-6)
        assert local.label == "defect"
        client_ = Client(daemon.url, TOKEN)
        diagnosis = client_.diagnose_image("press-1", defect, model="parts")
        assert diagnosis["prediction"]["label"] == "defect"  # fusion takes the decision like any evidence
        assert diagnosis["diagnosis"]["fault"] == "leak" and diagnosis["event"] is not None
        snapshot = cv2.imdecode(np.frombuffer(client_.snapshot(diagnosis["event"]), np.uint8), cv2.IMREAD_COLOR)
        raw = cv2.imdecode(np.frombuffer(defect, np.uint8), cv2.IMREAD_COLOR)
        assert snapshot.shape == raw.shape and np.abs(snapshot.astype(int) - raw).mean() > 5  # the heat map drawn
    finally:
        daemon.kill()


def test_hostile_asset_ids_are_refused_and_an_old_outbox_row_cannot_stall_mqtt(
        tmp_path: Path, image_package: Path, text_package: Path, broker: Mosquitto) -> None:
    """A newline, NEL, a non-character or 20 KB as an asset id is refused with 400 (it used to become an
    MQTT topic level that made mosquitto drop the client on every publish, so no later event was ever
    delivered). A row stored with such an id before (an older daemon) is published with the character
    percent-encoded, and the events after it arrive too."""
    from edge_sdk.daemon.events import EventStore
    from edge_sdk.daemon.mqtt import topic_safe
    from urllib.parse import unquote

    hostile = "press\n4\u0085\uffff"
    with EventStore(tmp_path / "state") as store:  # what an older version left in the outbox
        old = store.add(hostile, "overheating", 0.9, {"fault": "overheating"}).id
    config = write_config(tmp_path, port=free_port(), models={"colors": image_package, "words": text_package},
                          broker_port=broker.port)
    subscriber = Subscriber(broker.port, "plant/jet-1/events/#")
    daemon = DaemonProcess(config, int(config.read_text().split("port = ")[1].split()[0])).start()
    try:
        client = Client(daemon.url, TOKEN)
        for asset in ("pump\n7", "pump\u00857", "pump\uffff", "x" * 20_000, " pump-7", "pump%0A7"):
            with pytest.raises(DaemonRequestError) as info:
                client.diagnose_text(asset, "the pump is hot")
            assert info.value.status == 400 and "is not a valid asset id" in str(info.value)
        request = urllib.request.Request(f"{daemon.url}/v1/diagnose?asset=pump%0A7", data=png("red"), method="POST")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        request.add_header("Content-Type", "image/png")
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=10)
        assert http_error.value.code == 400
        new = client.diagnose_text("Presse Nr. 4 (links)", "the pump is hot")["event"]
        messages = subscriber.wait(2)
        by_id = {m[1]["id"]: m[0] for m in messages}
        assert by_id[old] == "plant/jet-1/events/" + topic_safe(hostile) == "plant/jet-1/events/press%0A4%C2%85%EF%BF%BF"
        assert unquote(by_id[old].rsplit("/", 1)[1]) == hostile
        assert by_id[new] == "plant/jet-1/events/Presse Nr. 4 (links)"
    finally:
        subscriber.close()
        daemon.kill()


def test_unknown_routes_and_methods_answer_json_errors(served: DaemonProcess) -> None:
    """Plain-text 404s made the stock tritonclient report a parse error instead of the answer."""
    for method, path, status in (("GET", "/v2/nope", 404), ("POST", "/v2/health/ready", 405),
                                 ("GET", "/v2/models/colors/versions/1/stats", 404)):
        request = urllib.request.Request(served.url + path, data=b"{}" if method == "POST" else None, method=method)
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == status and info.value.headers["content-type"] == "application/json"
        body = json.loads(info.value.read())
        assert path in body["error"] and body["hint"] == "GET /openapi.json lists the routes"


def test_odd_numbers_in_paths_queries_and_headers_get_400_not_500(served: DaemonProcess) -> None:
    def status(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
        code, _, content_type = call(served, method, path, body, headers=headers)
        assert content_type == "application/json"
        return code

    assert status("GET", "/v1/events/%C2%B2") == 400  # a superscript two is a digit to str.isdigit
    assert status("GET", f"/v1/events/{2 ** 70}") == 400  # beyond SQLite's int64
    assert status("GET", f"/v1/events/{2 ** 63 - 1}") == 404
    assert status("GET", "/v1/events?limit=%C2%B2") == 400
    assert status("GET", f"/v1/events?before={2 ** 70}") == 400
    assert status("GET", "/v1/events?since=nan") == 400
    assert status("POST", "/v2/models/colors/infer", b"{}" + b"\0" * 8,
                  {"Inference-Header-Content-Length": "\u00b2"}) == 400


def test_deeply_nested_json_and_overflowing_shapes_get_400(served: DaemonProcess) -> None:
    def status(path: str, body: bytes) -> int:
        code, answer, _ = call(served, "POST", path, body)
        assert code == 200 or "error" in answer
        return code

    nested = b"[" * 100_000 + b"]" * 100_000
    assert status("/v2/models/colors/infer", nested) == 400
    assert status("/v1/diagnose", nested) == 400
    huge = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2 ** 40, 2 ** 40, 2 ** 40], "data": [0.0]}]}
    assert status("/v2/models/colors/infer", json.dumps(huge).encode()) == 400
    negative = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3], "data": [0.0]}]}
    assert status("/v2/models/colors/infer", json.dumps(negative).encode()) == 400


def test_a_client_leaving_mid_body_is_not_logged_as_a_failure(served: DaemonProcess) -> None:
    import socket

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/models/colors/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + TOKEN.encode() + b"\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                         + b"\x89PNG" * 100)
    deadline = time.monotonic() + 5
    while "disconnected before sending the whole body" not in served.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = served.log.read_text()
    assert "disconnected before sending the whole body" in text
    assert "Traceback" not in text and "ERROR" not in text
    assert Client(served.url, TOKEN).diagnose_image("pump-7", png("red"))["prediction"]["label"] == "red"


def test_the_cooldown_memory_stays_bounded(tmp_path: Path, image_package: Path, text_package: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One (asset, fault) entry per event used to be kept forever; now at most COOLDOWN_KEYS, the newest."""
    from edge_sdk.daemon import core
    from edge_sdk.daemon.config import DaemonConfig

    monkeypatch.setattr(core, "COOLDOWN_KEYS", 8)
    config = write_config(tmp_path, port=free_port(), models={"colors": image_package, "words": text_package})
    config.write_text(config.read_text().replace("cooldown_s = 0", "cooldown_s = 3600"))
    daemon = core.Daemon(DaemonConfig.load(config))
    daemon.start()
    try:
        events = [daemon.diagnose_text(f"pump-{i}", "the pump is hot").event_id for i in range(30)]
        assert all(e is not None for e in events)  # every asset's first event is stored
        assert len(daemon._last_event) <= 8 and ("pump-29", "overheating") in daemon._last_event
        assert daemon.diagnose_text("pump-29", "the pump is hot").event_id is None  # still cooling down
    finally:
        daemon.stop()


def test_a_package_whose_labels_do_not_match_its_graph_is_refused_and_the_old_one_serves(
        served: DaemonProcess, tmp_path: Path) -> None:
    """A self-consistent package (hashes recomputed) whose manifest lists one label more than the graph
    outputs used to be swapped in with 200 and then answer every predict with 500."""
    from dataclasses import replace

    from runtime.package import write_package

    client = Client(served.url, TOKEN)
    before = {m["name"]: m for m in client.models()}["colors"]
    package = Package.open(before["package"])
    m = package.manifest
    lying = replace(m, version="6-labels", postprocess=replace(m.postprocess, labels=(*m.postprocess.labels, "purple")))
    target = tmp_path / "lying.edgepkg"
    write_package(lying, {name: package.read_bytes(name) for name in m.files}, target)
    with pytest.raises(edge_sdk.errors.EdgeSDKError, match="manifest has 4 labels; expected \\[batch, 4\\]"):
        edge_sdk.load(target, backend="onnxruntime-cpu")
    with pytest.raises(DaemonRequestError, match="was not swapped") as info:
        client.reload("colors", str(target))
    assert info.value.status == 409 and "4 labels" in str(info.value)
    after = {m["name"]: m for m in client.models()}["colors"]
    assert after["version"] == before["version"] and client.predict("colors", png("red"))["label"] == "red"


def test_a_package_whose_inputs_do_not_match_its_preprocessing_or_graph_is_refused(
        served: DaemonProcess, tmp_path: Path) -> None:
    """Self-consistent packages (hashes recomputed) whose manifest resizes to another size than the graph
    takes, or names an input the graph does not have, are refused on reload; the old model serves."""
    from dataclasses import replace

    from runtime.package import write_package

    client = Client(served.url, TOKEN)
    before = {m["name"]: m for m in client.models()}["colors"]
    package = Package.open(before["package"])
    m = package.manifest
    resized = replace(m, version="resized", preprocess=replace(m.preprocess, resize=(16, 16)))
    renamed = replace(m, version="renamed", inputs=(replace(m.inputs[0], name="pixels"),))
    for lying, why in ((resized, "the preprocessing (nchw, rgb, 16x16) makes"),
                       (renamed, "the manifest declares ['pixels']")):
        target = tmp_path / f"{lying.version}.edgepkg"
        write_package(lying, {name: package.read_bytes(name) for name in m.files}, target)
        with pytest.raises(DaemonRequestError, match="was not swapped") as info:
            client.reload("colors", str(target))
        assert info.value.status == 409 and why in str(info.value)
    after = {m["name"]: m for m in client.models()}["colors"]
    assert after["version"] == before["version"] and client.predict("colors", png("red"))["label"] == "red"


def test_versioned_kserve_routes_serve_the_served_version_only(served: DaemonProcess, image_package: Path) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    package = Package.open(image_package)
    version = package.manifest.version
    feeds, _ = package.golden("fp32")
    tensor = httpclient.InferInput("image", list(feeds["image"].shape), "FP32")
    tensor.set_data_from_numpy(feeds["image"])
    assert client.is_model_ready("colors", model_version=version, headers=headers)
    assert client.get_model_metadata("colors", model_version=version, headers=headers)["name"] == "colors"
    result = client.infer("colors", [tensor], model_version=version, headers=headers)
    assert result.as_numpy(package.manifest.outputs[0].name).shape[0] == feeds["image"].shape[0]
    with pytest.raises(InferenceServerException, match="version '99' is not served"):
        client.infer("colors", [tensor], model_version="99", headers=headers)


def test_gzip_request_bodies_are_inflated_within_the_body_limit(served: DaemonProcess) -> None:
    import gzip

    def post(body: bytes, encoding: str) -> tuple[int, dict[str, Any]]:
        code, answer, _ = call(served, "POST", "/v1/models/colors/predict", body, "image/png",
                               {"Content-Encoding": encoding})
        return code, answer

    status, body = post(gzip.compress(png("red")), "gzip")
    assert status == 200 and body["predictions"][0]["label"] == "red"
    bomb = gzip.compress(b"\0" * (8 << 20))  # 8 MB of zeros in ~8 KB; the body limit is 1 MB
    status, body = post(bomb, "gzip")
    assert status == 413 and "inflates past" in body["error"]
    assert post(gzip.compress(png("red"))[:-9], "gzip")[0] == 400
    assert post(png("red"), "br")[0] == 415
