"""report.html: valid, self-contained HTML with the expected sections, and a screenshot in headless Chromium."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from pomona.cli.commands import run
from pomona.reporting.report import build_report

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


def test_report_marks_epochs_shows_na_classes_and_tuning_plots(tmp_path):
    """A hand-made run folder: a class without validation photos gets "n/a" and a warning, the summary names
    model, image size and date, the curves mark the best and the unfreeze epoch, tuning plots are included."""
    import json

    import pandas as pd
    from PIL import Image

    from pomona.config import Config
    from pomona.models.metrics import compute_metrics

    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "plots").mkdir()
    Config().save(run_dir / "config.json")
    (run_dir / "run.json").write_text(json.dumps({"model": {"name": "tf_efficientnet_lite0"}, "best_epoch": 2,
                                                  "preprocessing": {"input_size": 320}}))
    pd.DataFrame({"epoch": range(4), "train_loss": [1.0, 0.8, 0.6, 0.5], "val_loss": [1.1, 0.9, 0.7, 0.75],
                  "val_macro_f1": [0.4, 0.6, 0.8, 0.8], "val_accuracy": [0.5, 0.6, 0.8, 0.8],
                  "backbone_frozen": [True, True, False, False],
                  "elapsed_seconds": [10, 20, 30, 40]}).to_csv(run_dir / "history.csv", index=False)
    metrics = compute_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["Fuji", "Gala", "Braeburn"], n_boot=20)
    assert metrics["per_class"]["Braeburn"]["f1"] is None  # no photos: not defined, not 0
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(run_dir / "plots" / "optimization_history.png")
    page = build_report(run_dir).read_text()
    checker = _Checker()
    checker.feed(page)
    assert not checker.errors and {"summary", "curves", "per-class", "tuning"} <= checker.ids
    assert "tf_efficientnet_lite0" in page and "320 px" in page and "date" in page
    assert "Kept epoch 3 of 4" in page and "backbone unfrozen from epoch 3" in page  # best: F1 0.8, lower loss
    assert "chosen as the highest on these same photos: optimistic" in page  # an older run kept its best epoch
    assert "Warning: no validation photos of Braeburn" in page and "<td>n/a</td>" in page
    assert "optimization history" in page


def _section(page: str, key: str) -> str:
    start = page.index(f'<section id="{key}"')
    return page[start:page.index("</section>", start)]


def test_report_opens_on_the_results_and_collapses_the_settings_that_differ(trained_run):
    import re

    page = (trained_run / "report.html").read_text()
    order = re.findall(r'<section id="([^"]+)"', page)
    assert order[:4] == ["summary", "confusion", "per-class", "worst"]  # the results first ...
    assert order.index("curves") < order.index("config") and order.index("data") < order.index("config")  # ... then how
    config = _section(page, "config")
    assert "<details>" in config and "<details open" not in config  # collapsed
    assert "<td>model.name</td><td>test_efficientnet</td><td>tf_efficientnet_lite0</td>" in config  # a flag of TINY
    assert "train.optimizer" not in config and "train.lr<" not in config  # at their defaults: not listed


def test_evaluate_elsewhere_writes_its_own_report_and_leaves_the_runs_alone(trained_run, grocery_val_small, tmp_path):
    report = trained_run / "report.html"
    before = (report.read_bytes(), report.stat().st_mtime_ns)
    out = tmp_path / "elsewhere"
    assert run(["evaluate", str(trained_run), "--data", str(grocery_val_small), "--out", str(out),
                "--device", "cpu"]) == 0
    assert (report.read_bytes(), report.stat().st_mtime_ns) == before
    own = (out / "report.html").read_text()
    assert str(grocery_val_small) in own and "photos given" in _section(own, "summary")
