"""The web console on the real daemon (`edge-sdk serve` on loopback): the token login and its cookie, every
console route refused without a session, CSRF on mutating requests, acknowledgements kept across a
restart, the live frame of a real image-folder source, and the security headers."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

from tests.integration.test_daemon import TOKEN, DaemonProcess, png, write_config
from tests.services import free_port

#: A fault name with markup in it: the console must show it as text (tests/integration/test_console_browser.py).
HOSTILE_FAULT = '<img src=x onerror="window.pwned=1">hot'


@pytest.fixture
def image_package(reported_image_package: Path) -> Path:
    """The console's image model carries its conversion report (the text model none)."""
    return reported_image_package


CONSOLE_RULE_EXTRA = """
[sources.line-cam]
uri = "{frames}"
model = "colors"
asset = "oven (#1)"
watch = true
"""


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def cookies(self) -> list[str]:
        return self.headers.get_all("set-cookie") or []


def ask(daemon: DaemonProcess, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> Answer:
    """One request without following redirects (http.client), with exactly the headers given."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def login(daemon: DaemonProcess, token: str = TOKEN, headers: dict[str, str] | None = None) -> Answer:
    form = f"token={token}".encode()
    return ask(daemon, "POST", "/console/login", form,
               {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})


@dataclass
class Browser:
    """A logged-in console session: its cookie header and CSRF token."""

    daemon: DaemonProcess
    cookie: str
    csrf: str

    def get(self, path: str) -> Answer:
        return ask(self.daemon, "GET", path, headers={"Cookie": self.cookie})

    def post(self, path: str, body: bytes = b"{}", csrf: str | None = None, origin: str | None = None) -> Answer:
        headers = {"Cookie": self.cookie, "Content-Type": "application/json",
                   "Origin": self.daemon.url if origin is None else origin}
        if csrf is not None or self.csrf:
            headers["X-CSRF-Token"] = self.csrf if csrf is None else csrf
        return ask(self.daemon, "POST", path, body, headers)


def session(daemon: DaemonProcess) -> Browser:
    answer = login(daemon)
    assert answer.status == 303, answer.body
    cookie = answer.cookies()[0].split(";")[0]
    csrf = ask(daemon, "GET", "/console/session", headers={"Cookie": cookie}).json()["csrf"]
    return Browser(daemon, cookie, csrf)


def console_config(tmp_path: Path, image_package: Path, text_package: Path) -> tuple[Path, Path]:
    frames = tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    for i, colour in enumerate(("red", "green", "blue")):
        (frames / f"{i:03d}.png").write_bytes(png(colour, size=96))
    config = write_config(tmp_path, port=free_port(), models={"colors": image_package, "words": text_package},
                          extra=CONSOLE_RULE_EXTRA.format(frames=frames))
    config.write_text(config.read_text().replace('"overheating"]', f'"overheating", {json.dumps(HOSTILE_FAULT)}]')
                      .replace('red = "overheating"', f"red = {json.dumps(HOSTILE_FAULT)}"))
    return config, frames


def port_of(config: Path) -> int:
    return int(config.read_text().split("port = ")[1].split()[0])


@pytest.fixture
def console(tmp_path: Path, image_package: Path, text_package: Path) -> Iterator[DaemonProcess]:
    config, _ = console_config(tmp_path, image_package, text_package)
    daemon = DaemonProcess(config, port_of(config)).start()
    yield daemon
    daemon.kill()


def test_a_good_token_logs_in_with_a_strict_cookie_and_a_wrong_one_is_refused(console: DaemonProcess) -> None:
    page = ask(console, "GET", "/console/login")
    assert page.status == 200 and b'name="token"' in page.body
    assert "script-src 'self'" in page.headers["content-security-policy"]
    wrong = login(console, "not-the-token")
    assert wrong.status == 401 and b"wrong token" in wrong.body and not wrong.cookies()
    good = login(console)
    assert good.status == 303 and good.headers["location"] == "/"
    [cookie] = good.cookies()
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags
    assert len(cookie.split(";")[0].split("=", 1)[1]) >= 40  # a random session id, not the token
    assert TOKEN not in cookie
    behind_tls = login(console, headers={"X-Forwarded-Proto": "https"})  # a TLS proxy on loopback
    assert "secure" in {part.strip().lower() for part in behind_tls.cookies()[0].split(";")}
    page = ask(console, "GET", "/", headers={"Cookie": cookie.split(";")[0]})
    assert page.status == 200 and b"console.js" in page.body
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "unsafe-inline" not in page.headers["content-security-policy"]


def test_a_cross_origin_login_is_refused(console: DaemonProcess) -> None:
    answer = login(console, headers={"Origin": "http://evil.example"})
    assert answer.status == 403 and not answer.cookies()


CONSOLE_GETS = ("/console/session", "/console/state", "/console/sources/line-cam/frame.jpg",
                "/console/models/colors/report", "/console/static/console.js")


def test_every_console_route_is_refused_without_the_session(console: DaemonProcess) -> None:
    for cookie in (None, "edge_sdk_session=forged-session-id", f"edge_sdk_session={TOKEN}"):
        headers = {"Cookie": cookie} if cookie else {}
        page = ask(console, "GET", "/", headers=headers)
        assert page.status == 303 and page.headers["location"] == "/console/login"
        for path in (*CONSOLE_GETS, "/v1/events", "/v1/sources", "/v1/models"):
            answer = ask(console, "GET", path, headers=headers)
            assert answer.status == 401, (path, cookie, answer.body)
        assert ask(console, "POST", "/console/logout", headers=headers).status == 401
    assert ask(console, "GET", "/console/static/console.css").status == 200  # the login page's style
    assert ask(console, "GET", "/console/static/nothing.js").status == 404
    browser = session(console)
    assert all(browser.get(path).status in (200, 404) for path in CONSOLE_GETS)
    assert browser.get("/console/state").status == 200 and browser.get("/v1/events").status == 200
    assert browser.post("/console/logout").status == 200
    assert browser.get("/console/state").status == 401  # the session ended server side
    assert ask(console, "GET", "/", headers={"Cookie": browser.cookie}).status == 303


def test_mutating_requests_by_cookie_need_the_csrf_token_and_the_origin(console: DaemonProcess) -> None:
    browser = session(console)
    no_token = ask(console, "POST", "/v1/models/colors/reload", b"{}",
                   {"Cookie": browser.cookie, "Content-Type": "application/json", "Origin": console.url})
    assert no_token.status == 403 and b"X-CSRF-Token" in no_token.body.replace(b"x-csrf-token", b"X-CSRF-Token")
    assert browser.post("/v1/models/colors/reload", csrf="wrong").status == 403
    assert browser.post("/v1/models/colors/reload", origin="http://evil.example").status == 403
    assert browser.post("/console/logout", csrf="wrong").status == 403
    other = session(console)
    assert browser.post("/v1/models/colors/reload", csrf=other.csrf).status == 403  # another session's token
    reloaded = browser.post("/v1/models/colors/reload")
    assert reloaded.status == 200 and reloaded.json()["name"] == "colors"
    bearer = ask(console, "POST", "/v1/models/colors/reload", b"{}",
                 {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert bearer.status == 200  # the token API is unchanged: no CSRF token, no Origin
    assert browser.get("/console/state").status == 200  # the session survived the refusals


def test_an_acknowledgement_is_kept_across_a_restart(tmp_path: Path, image_package: Path,
                                                     text_package: Path) -> None:
    config, _ = console_config(tmp_path, image_package, text_package)
    daemon = DaemonProcess(config, port_of(config)).start()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        event_id = ask(daemon, "POST", "/v1/diagnose", json.dumps({"asset": "pump-7", "text": "leak"}).encode(),
                       {**bearer, "Content-Type": "application/json"}).json()["event"]
        assert isinstance(event_id, int)
        browser = session(daemon)
        assert browser.post(f"/v1/events/{event_id}/acknowledge", csrf="wrong").status == 403
        acked = browser.post(f"/v1/events/{event_id}/acknowledge").json()
        assert acked["acknowledged_by"] == "console" and acked["acknowledged_at"] > 0
        again = ask(daemon, "POST", f"/v1/events/{event_id}/acknowledge", headers=bearer).json()
        assert again["acknowledged_at"] == acked["acknowledged_at"] and again["acknowledged_by"] == "console"
        assert ask(daemon, "POST", "/v1/events/999999/acknowledge", headers=bearer).status == 404
    finally:
        daemon.terminate()
    restarted = DaemonProcess(config, port_of(config)).start()
    try:
        event = ask(restarted, "GET", f"/v1/events/{event_id}", headers=bearer).json()
        assert (event["acknowledged_at"], event["acknowledged_by"]) == (acked["acknowledged_at"], "console")
        assert browser.get("/console/state").status == 401  # sessions end with the daemon: log in again
    finally:
        restarted.kill()


def wait_for_frame(browser: Browser, source: str, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = browser.get(f"/console/sources/{source}/frame.jpg")
        if answer.status == 200:
            return answer.body
        time.sleep(0.1)
    raise AssertionError(f"no frame from {source} within {timeout} s: {answer.status} {answer.body[:200]!r}")


def test_the_live_frame_is_a_drawn_jpeg_of_the_folder_source(console: DaemonProcess) -> None:
    browser = session(console)
    data = wait_for_frame(browser, "line-cam")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert data[:3] == b"\xff\xd8\xff" and image is not None and image.shape == (96, 96, 3)
    assert browser.get("/console/sources/line-cam/frame.jpg").headers["content-type"] == "image/jpeg"
    assert image[:8, :40].std() > 10  # the label banner drawn over a solid-colour picture
    assert browser.get("/console/sources/no-such-cam/frame.jpg").status == 404
    state = browser.get("/console/state").json()
    [source] = state["sources"]
    assert source["source"] == "line-cam" and source["asset"] == "oven (#1)" and source["frames"] >= 1
    assert {"fps", "latency_ms", "reconnects", "status"} <= set(source)
    assert {m["name"] for m in state["models"]} == {"colors", "words"}
    assert all(m["parity"] is None or m["parity"]["ok"] for m in state["models"])
    assert state["health"]["events_disk_bytes"] > 0 and state["health"]["mqtt"] is None


def test_the_package_report_is_served_and_one_beside_the_package_wins(console: DaemonProcess,
                                                                       image_package: Path) -> None:
    browser = session(console)
    member = browser.get("/console/models/colors/report")  # written into the package by convert
    assert member.status == 200 and b"<h1>Conversion report: colors</h1>" in member.body
    assert b"<script" not in member.body.lower() and b"data:image/png;base64," in member.body
    assert member.headers["content-security-policy"].startswith("sandbox")
    missing = browser.get("/console/models/words/report")  # converted with report=False
    assert missing.status == 404 and b"no report in this package" in missing.body
    (image_package.parent / "colors.report.html").write_text("<html><body><h1>colors side by side</h1></body></html>")
    beside = browser.get("/console/models/colors/report")
    assert beside.status == 200 and b"colors side by side" in beside.body
    assert beside.headers["content-security-policy"].startswith("sandbox")
    models = {m["name"]: m for m in browser.get("/console/state").json()["models"]}
    assert models["colors"]["report"] is True and models["words"]["report"] is False


def test_failed_logins_are_throttled(console: DaemonProcess) -> None:
    started = time.monotonic()
    statuses = [login(console, f"guess-{i}").status for i in range(11)]
    assert statuses[:10] == [401] * 10 and statuses[10] == 429
    assert time.monotonic() - started >= 10 * 0.5  # every wrong token costs half a second
    locked = login(console)  # even the right token waits out the lock: no oracle for a guesser
    assert locked.status == 429 and int(locked.headers["retry-after"]) >= 1 and not locked.cookies()


def with_report(package: Path, html: bytes) -> Path:
    """A copy of ``package`` that carries ``html`` as its conversion report member."""
    from edge_sdk.daemon.console.routes import REPORT_MEMBER
    from runtime.package import Package, write_package

    source = Package.open(package)
    files = {name: source.read_bytes(name) for name in source.manifest.files}
    out = package.with_name("reported.edgepkg")
    write_package(source.manifest, {**files, REPORT_MEMBER: html}, out)
    return out


def test_the_report_member_of_the_package_is_served(tmp_path: Path, image_package: Path,
                                                    text_package: Path) -> None:
    reported = with_report(image_package, b"<html><body><h1>member report</h1></body></html>")
    config, _ = console_config(tmp_path, reported, text_package)
    daemon = DaemonProcess(config, port_of(config)).start()
    try:
        browser = session(daemon)
        report = browser.get("/console/models/colors/report")
        assert report.status == 200 and b"member report" in report.body
        assert report.headers["content-security-policy"].startswith("sandbox")
        assert browser.get("/console/models/words/report").status == 404
        assert browser.get("/console/models/nothing/report").status == 404
    finally:
        daemon.kill()


STATIC = Path(__file__).parents[2] / "edge_sdk" / "daemon" / "console" / "static"


def test_the_pages_run_no_inline_script_and_put_data_in_the_dom_as_text_only() -> None:
    import re

    for page in ("index.html", "login.html"):
        html = (STATIC / page).read_text()
        assert all('src="/console/static/' in tag for tag in re.findall(r"<script[^>]*>", html)), page
        assert not re.search(r"\son[a-z]+\s*=", html) and "javascript:" not in html, page
        assert "http://" not in html and "https://" not in html, page  # nothing from a CDN or font host
    script = (STATIC / "console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_a_hostile_asset_name_is_refused_before_it_reaches_the_console(console: DaemonProcess) -> None:
    answer = ask(console, "POST", "/v1/diagnose", json.dumps({"asset": "<script>x</script>", "text": "leak"}).encode(),
                 {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert answer.status == 400 and b"not a valid asset id" in answer.body
