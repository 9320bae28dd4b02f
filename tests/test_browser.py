"""The web page in Debian's headless Chromium: upload a real apple photo, see the right variety and the Grad-CAM
overlay; a screenshot is saved into the run folder (browser_page.png)."""

import shutil

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
