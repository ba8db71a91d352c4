"""The real daemon under clients that misbehave: silent and trickling connections, a flood of idle
sockets, more work than it should queue, and requests still running when SIGTERM's grace ends."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.test_daemon import TOKEN, DaemonProcess, call, png, write_config
from tests.services import free_port

AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"


def start(tmp_path: Path, models: dict[str, Path], **server: float) -> DaemonProcess:
    port = free_port()
    config = write_config(tmp_path, port=port, models=models)
    keys = "".join(f"\n{key} = {value}" for key, value in server.items())
    config.write_text(config.read_text().replace("max_body_mb = 1", "max_body_mb = 1" + keys, 1))
    return DaemonProcess(config, port).start()


@pytest.fixture
def daemon(tmp_path: Path, image_package: Path, text_package: Path, request: pytest.FixtureRequest
           ) -> Iterator[DaemonProcess]:
    d = start(tmp_path, {"colors": image_package, "words": text_package}, **getattr(request, "param", {}))
    yield d
    d.kill()


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock``, or None when it is still open after ``seconds``."""
    sock.settimeout(0.2)
    received, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def partial_predict(port: int, model: str = "colors", sent: int = 10, length: int = 1000) -> socket.socket:
    """A predict whose body stops after ``sent`` of ``length`` bytes: admitted, reading, in flight."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /v1/models/" + model.encode() + b"/predict HTTP/1.1\r\nHost: x\r\n" + AUTH
                 + b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % length + b"\x89PNG\r\n\x1a\n\0\0"[:sent])
    return sock


@pytest.mark.parametrize("daemon", [{"header_timeout_s": 1}], indirect=True)
def test_silent_and_trickling_connections_are_closed_at_the_header_timeout(daemon: DaemonProcess) -> None:
    silent = socket.create_connection(("127.0.0.1", daemon.port))
    trickle = socket.create_connection(("127.0.0.1", daemon.port))
    trickle.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    for _ in range(3):  # a byte now and then never completes the headers
        time.sleep(0.3)
        trickle.sendall(b"X")
    assert closed_within(silent, 6) == b""
    answer = closed_within(trickle, 6)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408") and b"header_timeout_s" in answer
    # a keep-alive connection that answered one request gets the same timeout for its next one
    kept = socket.create_connection(("127.0.0.1", daemon.port))
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    assert b"HTTP/1.1 408" in (closed_within(kept, 6) or b"")  # after the rest of the first answer
    for s in (silent, trickle, kept):
        s.close()


@pytest.mark.parametrize("daemon", [{"body_timeout_s": 1}], indirect=True)
def test_a_body_that_stops_coming_is_answered_408(daemon: DaemonProcess) -> None:
    with partial_predict(daemon.port) as sock:
        answer = closed_within(sock, 8)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body_timeout_s" in answer
    assert call(daemon, "POST", "/v1/models/colors/predict", png("red"), "image/png")[0] == 200


@pytest.mark.parametrize("daemon", [{"max_connections": 8, "header_timeout_s": 60}], indirect=True)
def test_a_flood_of_idle_connections_cannot_lock_out_health_checks(daemon: DaemonProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(40)]
    for _ in range(3):
        assert call(daemon, "GET", "/v2/health/ready")[0] == 200
    open_ = [s for s in idle if closed_within(s, 0.05) is None]
    assert len(open_) <= 8, f"{len(open_)} idle connections still open; max_connections = 8"
    # the newest survive: the oldest idle ones made room
    assert all(s in idle[-10:] for s in open_)
    for s in idle:
        s.close()
    assert "closed the oldest idle one" in daemon.log.read_text()
    assert daemon.log.read_text().count("closed the oldest idle one") <= 6  # repeated lines are suppressed


@pytest.mark.parametrize("daemon", [{"max_in_flight": 1}], indirect=True)
def test_work_beyond_max_in_flight_is_refused_503_with_retry_after(daemon: DaemonProcess) -> None:
    import urllib.error
    import urllib.request

    held = partial_predict(daemon.port)  # one request of model colors in flight
    time.sleep(0.3)
    request = urllib.request.Request(daemon.url + "/v1/models/colors/predict", data=png("red"), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert b"max_in_flight" in refused.value.read()
    status, _, _ = call(daemon, "POST", "/v1/diagnose", b'{"asset": "pump-7", "text": "bearing noise"}')
    assert status == 200  # another model is not held up
    held.close()  # the held request ends: the model takes work again
    deadline = time.monotonic() + 5
    while call(daemon, "POST", "/v1/models/colors/predict", png("red"), "image/png")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_requests_still_running_at_the_end_of_the_grace_get_503(tmp_path: Path, image_package: Path) -> None:
    d = start(tmp_path, {"colors": image_package}, shutdown_grace_s=1, body_timeout_s=30)
    try:
        held = partial_predict(d.port)
        time.sleep(0.3)
        started = time.monotonic()
        assert d.proc is not None
        d.proc.send_signal(15)
        answer = closed_within(held, 10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
        assert b"shut down before this request finished" in answer and b"retry-after: 5" in answer.lower()
        assert d.proc.wait(20) == 0
        assert time.monotonic() - started < 8
    finally:
        d.kill()
