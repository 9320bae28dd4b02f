"""report.html: valid, self-contained HTML with the expected sections, and a screenshot in headless Chromium."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from pomona.cli import run

from test_pipeline import TINY

VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr", "area", "base", "col", "embed", "track"}


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.ids, self.external = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        src = attrs.get("src") or (attrs.get("href") if tag == "link" else None)
        if src and not src.startswith("data:"):
            self.external.append(src)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def trained_run(grocery_small, grocery_val_small, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    assert run(["train", "--data", str(grocery_small), "--val-data", str(grocery_val_small), "--out", str(run_dir),
                *TINY]) == 0
    return run_dir


def test_report_is_valid_html_with_sections(trained_run):
    page = (trained_run / "report.html").read_text()  # written automatically at the end of train
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert page.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack
    assert not checker.external  # self-contained: every image embedded
    assert {"summary", "config", "data", "curves", "confusion", "per-class", "worst", "bad-images"} <= checker.ids
    assert page.count("data:image/png;base64,") >= 4  # counts, curves, confusion matrix, per-class F1
    assert "Golden-Delicious" in page


def test_report_screenshot_in_headless_chromium(trained_run):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    shot = trained_run / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={trained_run / '.chromium'}", f"--screenshot={shot}", "--window-size=1280,2400",
                    (trained_run / "report.html").as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.stat().st_size > 20_000
