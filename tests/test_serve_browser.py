"""`edgecl serve` end to end in a real headless browser: Debian's Chromium driven by Selenium
through Debian's chromedriver (nothing is downloaded at run time; the test skips when either is
missing). The real command serves a tiny engine on a generated video of a class the engine never
saw; the page shows the stream updating and a prediction ('unknown'); the class is enrolled from
the live frames through the page (countdown, preview), appears in the class list and is
recognised on its frames; it is renamed; a rollback to the generation before the enrollment
removes it; the server restarts and the page shows the same state.

``EDGECL_SERVE_SCREENSHOT=docs/serve.png pytest tests/test_serve_browser.py`` also writes the
page's screenshot for docs/SERVE.md."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from helpers import class_frames, make_engine_dir, serve_process, write_video

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TOKEN = "browser-test-token"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1300"]

FRAME_HASH = """
const img = document.getElementById('stream');
if (!img.complete || !img.naturalWidth) return null;
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext('2d');
ctx.drawImage(img, 0, 0);
const d = ctx.getImageData(0, 0, c.width, c.height).data;
let h = 0;
for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0;
return h;
"""


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what, fn, timeout=30.0, every=0.05):
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(driver, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return driver.find_element("css selector", css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def class_names(driver) -> list:
    return driver.execute_script(
        "return [...document.querySelectorAll('#classes tbody tr')].map(r => r.dataset.name);")


def test_the_page_end_to_end_in_chromium(browser, tmp_path):
    driver = browser
    eng = make_engine_dir(tmp_path / "eng", record_counts=True)  # the class list shows the engine's sample counts
    video = write_video(tmp_path / "gadget.avi", class_frames(7, 60, seed=3, size=128), fps=15)
    port = free_port()
    args = ("--token", TOKEN, "--unknown-below", "0.5")
    p, url, _ = serve_process(eng, video, *args, "--port", str(port))
    try:
        driver.get(f"{url}/#token={TOKEN}")
        assert "#token" not in driver.current_url  # taken out of the address bar
        # the stream updates, and a prediction is shown: the engine does not know this object
        seen = set()
        wait_for("the stream to show two different frames",
                 lambda: seen.add(driver.execute_script(FRAME_HASH)) or len(seen - {None}) >= 2)
        wait_for("the prediction", lambda: text(driver, "#top1") == "unknown")
        assert "unknown" in driver.find_element("id", "top1").get_attribute("class")
        assert float(wait_for("FPS", lambda: text(driver, "#fps") not in ("", "-", "0.0") and text(driver, "#fps")))
        assert class_names(driver) == [f"class{i}" for i in range(6)]
        assert text(driver, "#classes tr[data-name='class0'] .samples") == "40"
        # enroll it from the next 20 live frames through the page: a countdown, then a preview
        driver.find_element("id", "enroll-name").send_keys("gadget")
        frames = driver.find_element("id", "enroll-frames")
        frames.clear()
        frames.send_keys("20")
        driver.find_element("id", "enroll-live").click()
        wait_for("the countdown", lambda: "capturing" in text(driver, "#enroll-status"), every=0.02)
        wait_for("the enrollment", lambda: "enrolled 'gadget' from 20 camera frames" in text(driver, "#enroll-status"))
        assert len(driver.find_elements("css selector", "#preview img")) == 12
        wait_for("the class list", lambda: "gadget" in class_names(driver))
        row = driver.find_element("css selector", "#classes tr[data-name='gadget']")
        assert row.find_element("css selector", ".samples").text == "20"
        assert row.find_element("css selector", ".kind").text == "enrolled"
        wait_for("the new class recognised on its frames", lambda: text(driver, "#top1") == "gadget")
        # rename it
        row.find_element("css selector", "button.rename").click()
        box = driver.find_element("css selector", "#classes input.rename-input")
        box.clear()
        box.send_keys("gizmo")
        driver.find_element("css selector", "#classes button.rename-ok").click()
        wait_for("the renamed class", lambda: "gizmo" in class_names(driver) and "gadget" not in class_names(driver))
        wait_for("the renamed class recognised", lambda: text(driver, "#top1") == "gizmo")
        wait_for("the history", lambda: len(driver.find_elements("css selector", "#history li")) == 3)
        assert text(driver, "#generation") == "2"
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("EDGECL_SERVE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["EDGECL_SERVE_SCREENSHOT"])
        history = [li.text for li in driver.find_elements("css selector", "#history li")]
        assert "renamed 'gadget' to 'gizmo'" in history[0] and "enrolled 'gadget' (20 frames)" in history[1]
        # roll back to the generation before the enrollment: it is gone, as a new generation
        driver.find_element("css selector", "#history li[data-generation='0'] button.rollback").click()
        driver.switch_to.alert.accept()
        wait_for("the rollback", lambda: "gizmo" not in class_names(driver) and text(driver, "#generation") == "3")
        assert class_names(driver) == [f"class{i}" for i in range(6)]
        wait_for("'unknown' again", lambda: text(driver, "#top1") == "unknown")
        assert "rolled back to generation 0" in text(driver, "#history li[data-generation='3']")
    finally:
        p.terminate()
        p.wait(15)
    # restart the server on the same port: the page comes back to the same, persisted state
    p, url, _ = serve_process(eng, video, *args, "--port", str(port))
    try:
        wait_for("the page to reconnect", lambda: "live" in text(driver, "#camera-state"))
        driver.get(f"{url}/")  # a fresh load too: the token stays in this tab's session
        wait_for("the classes", lambda: class_names(driver) == [f"class{i}" for i in range(6)])
        assert text(driver, "#generation") == "3"
        wait_for("the history", lambda: len(driver.find_elements("css selector", "#history li")) == 4)
        history = [li.text for li in driver.find_elements("css selector", "#history li")]
        assert "rolled back to generation 0" in history[0] and "current" in history[0]
        seen = set()
        wait_for("the stream after the restart",
                 lambda: seen.add(driver.execute_script(FRAME_HASH)) or len(seen - {None}) >= 2)
        # a change through the page still carries the token after the reload
        driver.find_element("css selector", "#classes tr[data-name='class5'] button.remove").click()
        driver.switch_to.alert.accept()
        wait_for("the removal", lambda: "class5" not in class_names(driver) and text(driver, "#generation") == "4")
    finally:
        p.terminate()
        p.wait(15)
