"""The painter in a real browser (headless Chromium through Selenium): pick classes, paint strokes,
flood-fill, generate, and get the image back; the run saves a screenshot.

Skipped, with the reason, where Selenium, Chromium or its driver is missing (Debian:
`apt-get install chromium chromium-driver`; `pip install -e .[test]` brings Selenium).
`SCDM_APP_MODEL=<checkpoint>` runs it on a trained model instead of a tiny random one, and
`SCDM_APP_SCREENSHOT=<png>` says where the screenshot goes (the README's is docs/app.png, made with
the quickstart's model and SCDM_APP_STEPS=25 SCDM_APP_SAMPLES=3); by default it goes to the test's
temporary folder.
"""
import io
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scdm.app.server import make_server
from scdm.pipeline import SCDMPipeline
from conftest import in_ci, require_test_extra
from tiny_run import make_tiny_run

webdriver = require_test_extra("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
STEPS = int(os.environ.get("SCDM_APP_STEPS", 3))
SAMPLES = int(os.environ.get("SCDM_APP_SAMPLES", 1))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        why = "no headless browser: install Chromium and its driver (Debian: apt-get install chromium chromium-driver)"
        if in_ci():  # CI must test the page: .ci/run installs the browser
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,800",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = os.environ.get("SCDM_APP_MODEL") or make_tiny_run(tmp_path_factory.mktemp("run"))
    srv = make_server(SCDMPipeline.from_checkpoint(model), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def drag(browser, canvas, points, size):
    """A stroke through map pixel centres (x, y), in screen pixels of the enlarged canvas."""
    scale = canvas.size["width"] / size
    offset = lambda p: (round((p[0] + 0.5) * scale - canvas.size["width"] / 2),  # noqa: E731
                        round((p[1] + 0.5) * scale - canvas.size["height"] / 2))
    chain = ActionChains(browser).move_to_element_with_offset(canvas, *offset(points[0])).click_and_hold()
    for p in points[1:]:
        chain = chain.move_to_element_with_offset(canvas, *offset(p))
    chain.release().perform()


def test_paint_generate_and_download(browser, server, tmp_path):
    pipe = server.app.pipe
    size = pipe.image_size
    host, port = server.server_address[:2]
    browser.get(f"http://{host}:{port}/")
    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return window.app && window.app.info !== null"))
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.size["width"] >= 4 * size  # shown enlarged
    items = browser.find_elements(By.CSS_SELECTOR, "#palette li")
    assert [i.text for i in items] == [f"{k} {n}" for k, n in enumerate(pipe.class_names)]
    search = browser.find_element(By.ID, "search")
    search.send_keys(pipe.class_names[1])
    assert items[1].is_displayed() and not items[0].is_displayed()
    search.send_keys("\b" * len(pipe.class_names[1]))
    assert items[0].is_displayed()

    # fill the whole (blank) map with class 0, then a horizontal stroke of class 1, brush size 1
    items[0].click()
    browser.find_element(By.ID, "tool-fill").click()
    drag(browser, canvas, [(1, 1)], size)
    Select(browser.find_element(By.ID, "brush-size")).select_by_visible_text("1")
    items[1].click()
    row = size // 2
    drag(browser, canvas, [(2, row), (size // 2, row), (size - 3, row)], size)
    # a vertical stroke of class 2, then undo and redo it
    items[2].click()
    drag(browser, canvas, [(3, 2), (3, size - 3)], size)
    browser.find_element(By.ID, "undo").click()
    assert 2 not in browser.execute_script("return Array.from(window.app.ids)")
    browser.find_element(By.ID, "redo").click()
    ids = np.asarray(browser.execute_script("return Array.from(window.app.ids)")).reshape(size, size)

    # every pixel is exactly one class: no antialiasing, and the strokes are where they were drawn
    assert set(np.unique(ids)) == {0, 1, 2}
    assert (ids[row, 4:size - 3] == 1).all() and (ids[2:size - 2, 3] == 2).all()
    assert (ids[: row - 1, 5:] == 0).all()

    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "steps").send_keys(str(STEPS))
    browser.find_element(By.ID, "num-samples").clear()
    browser.find_element(By.ID, "num-samples").send_keys(str(SAMPLES))
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 600).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results img.sample")) == SAMPLES)
    status = browser.find_element(By.ID, "job-status").text
    assert status.startswith("done"), status
    src = browser.find_element(By.CSS_SELECTOR, "#results img.sample").get_attribute("src")
    link = browser.find_element(By.CSS_SELECTOR, "#results figure:nth-child(2) a[download]")
    assert link.get_attribute("href") == src
    with urllib.request.urlopen(src) as res:
        got = np.asarray(Image.open(io.BytesIO(res.read())))
    want = pipe(ids, num_samples=SAMPLES, steps=STEPS, guidance_scale=1.5, seed=0, names=["app"],
                unlabeled_to_zero=pipe.is_scdm)[0]
    assert got.shape == (size, size, 3) and (got == np.asarray(want)).all()

    if os.environ.get("SCDM_APP_SCREENSHOT"):  # the README's picture: a start map from the run's data
        examples = Select(browser.find_element(By.ID, "examples"))
        examples.select_by_index(min(2, len(examples.options) - 1))
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return window.app.undo.length") > 0)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 600).until(
            lambda b: b.find_element(By.ID, "job-status").text.startswith("done")
            and b.find_element(By.CSS_SELECTOR, "#results img.sample").get_attribute("src") != src)
    shot = Path(os.environ.get("SCDM_APP_SCREENSHOT") or tmp_path / "app.png")
    time.sleep(0.3)  # let the result images decode before the picture is taken
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
