"""The web console in a real browser (Debian's headless chromium through chromium-driver and selenium)
against the real daemon on loopback, with a real image-folder source and tiny packages: the login, live
tiles, an event from /v1/diagnose with its snapshot, acknowledging it, a reload's result, and every route
refused without the session. Screenshots are kept as test artifacts (tests/browser.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.browser import Chromium, missing
from tests.integration.test_console import (CONSOLE_GETS, HOSTILE_FAULT, ask, console_config, port_of)
from tests.integration.test_daemon import TOKEN, DaemonProcess, png

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


@pytest.fixture
def image_package(reported_image_package: Path) -> Path:
    """The console's image model carries its conversion report (the text model none)."""
    return reported_image_package


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("console-screenshots"))
    yield chromium
    chromium.close()


@pytest.fixture
def daemon(tmp_path: Path, image_package: Path, text_package: Path, browser: Chromium) -> Iterator[DaemonProcess]:
    config, _ = console_config(tmp_path, image_package, text_package)
    served = DaemonProcess(config, port_of(config)).start()
    browser.driver.delete_all_cookies()
    yield served
    served.kill()


def log_in(browser: Chromium, daemon: DaemonProcess, token: str = TOKEN) -> None:
    browser.get(daemon.url + "/")
    browser.wait(lambda d: d.current_url.endswith("/console/login"), message="not sent to the login page")
    browser.css("#token").send_keys(token)
    browser.css("#login").click()


def logged_in(browser: Chromium, daemon: DaemonProcess) -> None:
    log_in(browser, daemon)
    browser.wait(lambda d: d.current_url == daemon.url + "/", message="the login did not open the console")
    browser.wait(lambda d: "ready" in browser.css("#status").text, message="the console did not load its state")


def test_the_login_works_and_a_wrong_token_is_refused(browser: Chromium, daemon: DaemonProcess) -> None:
    log_in(browser, daemon, "a-wrong-token")
    browser.wait(lambda d: "wrong token" in browser.css("#error").text, message="no error for a wrong token")
    assert browser.driver.get_cookies() == []
    browser.screenshot("login-refused")
    browser.console_errors()  # drains the log: the refused login's 401 is expected
    logged_in(browser, daemon)
    [cookie] = browser.driver.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert browser.script("return document.cookie") == ""  # the page's script cannot read the session
    assert browser.console_errors() == []  # no CSP violation, no failing script


def test_tiles_show_live_frames(browser: Chromium, daemon: DaemonProcess, tmp_path: Path) -> None:
    logged_in(browser, daemon)
    tile = '.tile[data-source="line-cam"]'
    browser.wait(lambda d: browser.script(f"return document.querySelector('{tile} img').naturalWidth") > 0,
                 message="the tile shows no frame")
    browser.wait(lambda d: int(browser.css(tile).get_attribute("data-loads") or 0) >= 3,
                 message="the tile's frame is not refreshed")
    (tmp_path / "frames" / "003.png").write_bytes(png("green", size=96))  # a new picture in the watched folder
    browser.wait(lambda d: "frames 4" in browser.css(f"{tile} .numbers").text, message="the new frame is not counted")
    assert browser.css(f"{tile} .badge").text == "open"
    assert "oven (#1)" in browser.css(f"{tile} .numbers").text
    browser.wait(lambda d: "Temperatures" in browser.css("#health").text or "Telemetry" in browser.css("#health").text)
    browser.screenshot("console")


def test_a_diagnosed_event_appears_with_its_snapshot_and_is_acknowledged(browser: Chromium,
                                                                         daemon: DaemonProcess) -> None:
    logged_in(browser, daemon)
    answer = ask(daemon, "POST", "/v1/diagnose?asset=press%20(4)",
                 png("red"), {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
    event_id = answer.json()["event"]
    assert answer.status == 200 and isinstance(event_id, int), answer.body
    item = f'li[data-event-id="{event_id}"]'
    browser.wait(lambda d: browser.all(item), message=f"event {event_id} is not listed")
    browser.wait(lambda d: browser.script(f"return document.querySelector('{item} img').naturalWidth") > 0,
                 message="the event's snapshot is not shown")
    assert browser.css(f"{item} .fault").text == HOSTILE_FAULT  # shown as text, never as markup
    assert browser.css(f"{item} .asset").text == "press (4)"
    assert browser.script("return window.pwned === undefined && !document.querySelector('img[src=\"x\"]')")
    browser.css("#filter-asset").send_keys("press (4)")
    browser.css("#event-filter button[type=submit]").click()
    browser.wait(lambda d: [e.get_attribute("data-event-id") for e in browser.all(".events li")] == [str(event_id)],
                 message="the asset filter does not narrow the list to the event")
    browser.css(f"{item} button.ack").click()
    browser.wait(lambda d: "acknowledged" in browser.css(f"{item} .acked").text if browser.all(f"{item} .acked")
                 else False, message="the acknowledgement is not shown")
    event = ask(daemon, "GET", f"/v1/events/{event_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert event["acknowledged_by"] == "console"
    browser.screenshot("events")


def test_a_reload_shows_its_result(browser: Chromium, daemon: DaemonProcess) -> None:
    logged_in(browser, daemon)
    browser.wait(lambda d: browser.all('button.reload[data-model="colors"]'), message="no reload button")
    browser.css('button.reload[data-model="colors"]').click()
    browser.wait(lambda d: browser.css("#reload-result").text.startswith("reloaded colors"),
                 message="the reload's result is not shown")
    assert "onnxruntime-cpu" in browser.css("#reload-result").text
    row = browser.css('#models tr[data-model="colors"]').text
    assert "conversion report" in row and "passed" in row
    assert "no report in this package" in browser.css('#models tr[data-model="words"]').text


def test_the_conversion_report_opens_from_the_console(browser: Chromium, daemon: DaemonProcess) -> None:
    logged_in(browser, daemon)
    link = 'tr[data-model="colors"] a'
    browser.wait(lambda d: browser.all(link), message="no report link for colors")
    href = browser.css(link).get_attribute("href")
    assert href == daemon.url + "/console/models/colors/report"
    browser.console_errors()  # drains what earlier pages logged (an earlier daemon's polling)
    browser.get(href)
    browser.wait(lambda d: browser.script("return document.readyState") == "complete", message="the report did not load")
    assert browser.script("return document.querySelector('h1').textContent") == "Conversion report: colors"
    headings = browser.script("return Array.from(document.querySelectorAll('h2, h3')).map(h => h.textContent)")
    assert "Accuracy, agreement, latency and size" in headings and "Confusion matrices (validation data)" in headings
    widths = browser.script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) >= 2 and all(w > 0 for w in widths), widths  # every plot decodes under the report's CSP
    assert browser.console_errors() == []
    browser.screenshot("report")


FETCH = "const done = arguments[arguments.length - 1]; fetch(arguments[0], {method: arguments[1]})" \
        ".then(r => done(r.status), e => done(String(e)));"


def test_without_the_session_every_console_route_is_refused(browser: Chromium, daemon: DaemonProcess) -> None:
    logged_in(browser, daemon)
    browser.driver.delete_all_cookies()
    browser.get(daemon.url + "/")
    browser.wait(lambda d: d.current_url.endswith("/console/login"), message="/ is not sent to the login page")
    statuses: dict[str, Any] = {path: browser.driver.execute_async_script(FETCH, path, "GET")
                                for path in (*CONSOLE_GETS, "/v1/events", "/v1/events/1/snapshot")}
    statuses["POST /console/logout"] = browser.driver.execute_async_script(FETCH, "/console/logout", "POST")
    assert set(statuses.values()) == {401}, json.dumps(statuses)
