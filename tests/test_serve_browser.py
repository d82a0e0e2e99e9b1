"""`rqlm serve`'s page in a real browser: Debian's headless chromium through selenium and chromedriver.

On the shared `rqlm demo --quick` models, the page is served on a free localhost port; the browser types a
prompt, starts a race, waits for every column, then checks the drafted text equals the baseline's, every
tokens/s figure is positive, and an empty prompt shows the message. A screenshot is saved under the test's
output folder. Skipped where chromium is missing, except in CI (CI or RQLM_REQUIRE_BROWSER set): there it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket

import pytest

from rqlm.serve import demo_lineup, load_lineup
from rqlm.serve.page import build_page, launch_page

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
RACE_SECONDS = 60  # the --quick models race four columns of 48 tokens in a few seconds
PROMPT = "Once upon a time"


def browser_or_skip() -> tuple[str, str]:
    """(the browser, its driver); skip when either is missing, fail instead when CI says the test must run."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    problem = "chromium, chromium-driver and selenium are needed (.ci/run installs them: apt install chromium chromium-driver)"
    if os.environ.get("CI") or os.environ.get("RQLM_REQUIRE_BROWSER"):
        pytest.fail(f"the browser test must run here: {problem}")
    pytest.skip(problem)


@pytest.fixture
def page_url(demo):
    loaded = load_lineup(demo_lineup(demo))
    page = build_page(loaded)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_page(page, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", len(loaded.contenders)
    page.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1300"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def erase(field) -> None:
    """Empty a text field as a user does (selenium's clear() fires no input event for Gradio to see)."""
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)


def test_a_race_in_the_browser(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, columns = page_url
    wait = WebDriverWait(browser, RACE_SECONDS)
    browser.get(url)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    max_new = browser.find_element(By.CSS_SELECTOR, "#max-new-tokens input")
    erase(max_new)
    max_new.send_keys("48")
    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "race").click()
    wait.until(lambda d: "finished" in d.find_element(By.ID, "status").text)

    texts = [browser.find_element(By.CSS_SELECTOR, f"#column-{i} textarea").get_attribute("value") for i in range(columns)]
    stats = [browser.find_element(By.ID, f"stats-{i}").text for i in range(columns)]
    assert texts[0] and texts[-1] == texts[0], texts  # the drafted column (last) is the baseline's text
    assert "identical" in browser.find_element(By.ID, "marker").text
    speeds = [float(re.search(r"([\d,.]+) tokens/s", s).group(1).replace(",", "")) for s in stats]
    assert all(speed > 0 for speed in speeds) and len(speeds) == columns, stats
    assert all(re.search(r"^48 tokens", s) for s in stats), stats
    assert "acceptance" in stats[-1]
    wait.until(lambda d: "48" in d.find_element(By.ID, "last-run").text)  # the static view of this run
    browser.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").stat().st_size > 10_000

    erase(prompt)
    browser.find_element(By.ID, "race").click()
    wait.until(lambda d: "the prompt is empty" in d.find_element(By.ID, "message").text)
    assert "not started" in browser.find_element(By.ID, "status").text
