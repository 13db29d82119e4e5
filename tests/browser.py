"""Headless Chromium under Selenium, for the tests that read a page as a reader's browser shows it
(tests/test_jupyterlab.py, tests/test_book.py)."""
from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
             "--no-first-run", "--disable-extensions")


def find_browser() -> tuple[str | None, str | None]:
    """(Chromium's path, chromedriver's path); None for either that is not on PATH."""
    chrome = next((shutil.which(n) for n in BROWSERS if shutil.which(n)), None)
    return chrome, shutil.which("chromedriver")


def headless_chromium(test: str, how_to_run: str) -> Iterator:
    """Yield a Selenium driver of headless Chromium (its console log kept), and quit it afterwards; skip, saying
    why and how to run ``test`` (``how_to_run``), when Selenium, Chromium or chromedriver is missing or Chromium
    cannot start. Use it as the body of a fixture: ``yield from headless_chromium(...)``."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    chrome, chromedriver = find_browser()
    if not (chrome and chromedriver):
        missing = " and ".join(n for n, p in (("Chromium", chrome), ("chromedriver", chromedriver)) if not p)
        pytest.skip(f"{test}: {missing} not found; to run it: apt-get install chromium chromium-driver (Debian), "
                    f"then {how_to_run} (.ci/run installs them when it runs as root with apt-get)")
    options = webdriver.ChromeOptions()
    for argument in ARGUMENTS:
        options.add_argument(argument)
    options.binary_location = chrome
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    except WebDriverException as e:
        pytest.skip(f"{test}: {chrome} with {chromedriver} did not start: {str(e.msg).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()
