"""The web page in Debian's headless Chromium: upload a real apple photo, see the right variety and the Grad-CAM
overlay; a screenshot is saved into the run folder (browser_page.png). Also what a person opens after training:
report.html (results first, settings collapsed) and a photo annotated by `predict --save-dir`, screenshotted."""

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import held_out_photo

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1100,1250"]


@pytest.fixture
def browser(monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_page_shows_the_variety_and_grad_cam(server, apple_run, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 20).until(lambda d: "engine" in d.find_element(By.ID, "footer").text)
    photo = held_out_photo("Granny-Smith")
    browser.find_element(By.ID, "photo").send_keys(str(photo))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "variety").text.strip() != "")
    assert browser.find_element(By.ID, "variety").text == "Granny-Smith"
    rows = browser.find_elements(By.CSS_SELECTOR, "#top .row")
    assert [r.find_element(By.CLASS_NAME, "label").text for r in rows][0] == "Granny-Smith"
    assert rows[0].find_element(By.CLASS_NAME, "pct").text.endswith("%")
    wait.until(lambda d: d.execute_script("const i = document.getElementById('cam');"
                                          "return i.complete && i.naturalWidth > 0;"))
    assert browser.find_element(By.ID, "status").text == "Done."
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") > 0
    shot = apple_run / "browser_page.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000


def _not_blank(shot) -> bool:
    """A screenshot with something on it: many colours and some contrast, not one flat colour."""
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    return pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.fixture(scope="module")
def tiny_run(grocery_small, grocery_val_small, tmp_path_factory):
    from pomona.cli.commands import run

    from test_pipeline import TINY

    run_dir = tmp_path_factory.mktemp("browser_report") / "run"
    assert run(["train", "--data", str(grocery_small), "--val-data", str(grocery_val_small), "--out", str(run_dir),
                *TINY]) == 0
    return run_dir


def test_report_opens_on_the_results_with_the_settings_collapsed(tiny_run, browser):
    from selenium.webdriver.common.by import By

    browser.get((tiny_run / "report.html").as_uri())
    ids = browser.execute_script("return [...document.querySelectorAll('main > section')].map(s => s.id)")
    assert ids[:2] == ["summary", "confusion"] and ids.index("per-class") < ids.index("config")

    def top(key):
        return browser.execute_script(f"return document.getElementById('{key}').getBoundingClientRect().top")

    assert top("confusion") < browser.execute_script("return window.innerHeight")  # results on the first screen
    assert top("confusion") < top("curves") < top("config")
    assert browser.find_element(By.CSS_SELECTOR, "#config summary").is_displayed()
    assert not browser.find_element(By.CSS_SELECTOR, "#config table").is_displayed()  # collapsed
    assert browser.execute_script("const i = document.querySelector('#confusion img');"
                                  "return i.complete && i.naturalWidth > 0;")
    shot = tiny_run / "report_page.png"
    browser.save_screenshot(str(shot))
    assert _not_blank(shot)


def test_annotated_prediction_shows_its_label(tiny_run, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from pomona.cli.commands import run
    from pomona.reporting.annotate import band_height

    photo = held_out_photo("Granny-Smith")
    assert run(["predict", str(tiny_run), str(photo), "--save-dir", str(tmp_path / "drawn"), "--device", "cpu"]) == 0
    drawn = tmp_path / "drawn" / photo.name
    browser.get(drawn.as_uri())
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "const i = document.querySelector('img'); return i && i.complete && i.naturalWidth > 0;"))
    shot = tmp_path / "annotated_page.png"
    browser.save_screenshot(str(shot))
    assert _not_blank(shot)
    picture = np.asarray(Image.open(drawn).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(photo).convert("RGB"), dtype=np.int16)
    assert picture.shape == original.shape
    band = band_height(picture.shape[1], picture.shape[0])
    assert np.abs(picture[:band] - original[:band]).mean() > 30  # the label band differs from the photo ...
    assert int((picture[:band].max(axis=-1) > 150).sum()) > 200  # ... with its text drawn in light pixels
    assert np.abs(picture[band + 4:] - original[band + 4:]).mean() < 4  # ... and the rest is the photo
