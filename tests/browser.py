"""Debian's chromium, headless, driven by chromium-driver through selenium, for the console's browser tests.

``missing()`` says why browser tests cannot run (chromium, chromedriver or selenium missing) and
``require_chromium()`` skips with that reason; ``Chromium`` is one browser with explicit waits and screenshots kept as test artifacts
(under the test's tmp dir and, when ``EDGE_SDK_ARTIFACTS`` is set, copied there too).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
WAIT_S = 10.0


def _find(names: tuple[str, ...]) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def missing() -> str | None:
    """Why the browser tests cannot run here (what to install), or None."""
    if _find(CHROMIUM) is None or _find(("chromedriver",)) is None:
        return "browser tests need chromium and chromedriver: apt-get install chromium chromium-driver"
    if importlib.util.find_spec("selenium") is None:
        return "browser tests need selenium: pip install 'edge-sdk[dev]'"
    return None


def require_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or a skip that says what to install."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    return str(_find(CHROMIUM)), str(_find(("chromedriver",)))


class Chromium:
    """One headless chromium session; ``wait(condition)`` polls ``condition(driver)`` until truthy."""

    def __init__(self, artifacts: Path, width: int = 1200, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver = require_chromium()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.artifacts = artifacts
        artifacts.mkdir(parents=True, exist_ok=True)
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.set_page_load_timeout(WAIT_S)

    def get(self, url: str) -> None:
        self.driver.get(url)

    def wait(self, condition: Callable[[Any], Any], timeout: float = WAIT_S, message: str = "") -> Any:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # the page re-renders its lists on every refresh: an element found a moment ago may be gone
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def script(self, source: str, *args: Any) -> Any:
        return self.driver.execute_script(source, *args)

    def screenshot(self, name: str) -> Path:
        """A PNG of the window, kept under the artifacts dir (and EDGE_SDK_ARTIFACTS when set)."""
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        extra = os.environ.get("EDGE_SDK_ARTIFACTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(extra) / path.name)
        return path

    def console_errors(self) -> list[str]:
        """Errors the page logged (CSP violations, failed scripts)."""
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE" and "/favicon.ico" not in entry["message"]]

    def close(self) -> None:
        self.driver.quit()
