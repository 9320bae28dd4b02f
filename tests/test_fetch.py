"""`pomona data fetch` against a local HTTP server serving a small archive built here."""

import functools
import http.server
import io
import threading
import zipfile

import pytest
from PIL import Image

from pomona.tools.fetch import FetchError, fetch_dataset

PREFIX = "GroceryStoreDataset-abc/dataset"


def _archive(path, counts):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buf, "JPEG")
    with zipfile.ZipFile(path, "w") as zf:
        for split, classes in counts.items():
            for cls, n in classes.items():
                for i in range(n):
                    zf.writestr(f"{PREFIX}/{split}/Fruit/Apple/{cls}/{cls}_{i:03d}.jpg", buf.getvalue())
        zf.writestr(f"{PREFIX}/train/Fruit/Banana/Banana_001.jpg", buf.getvalue())  # not an apple: left out
        zf.writestr(f"{PREFIX}/README.md", "readme")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_extracts_only_apples_and_checks_counts(server, tmp_path):
    root, url = server
    counts = {"train": {"Fuji": 3, "Gala": 2}, "val": {"Fuji": 1}, "test": {"Gala": 1}}
    _archive(root / "ds.zip", counts)
    out = fetch_dataset("grocery-apples", cache_dir=tmp_path / "cache", url=f"{url}/ds.zip",
                        expected={"train": {"Fuji": 3, "Gala": 2}, "val": {"Fuji": 1}})
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == [
        "test/Gala/Gala_000.jpg", "train/Fuji/Fuji_000.jpg", "train/Fuji/Fuji_001.jpg", "train/Fuji/Fuji_002.jpg",
        "train/Gala/Gala_000.jpg", "train/Gala/Gala_001.jpg", "val/Fuji/Fuji_000.jpg"]
    (root / "ds.zip").unlink()  # cached: no second download
    assert fetch_dataset("grocery-apples", cache_dir=tmp_path / "cache", url=f"{url}/ds.zip") == out


def test_fetch_rejects_wrong_counts_and_bad_downloads(server, tmp_path):
    root, url = server
    _archive(root / "ds.zip", {"train": {"Fuji": 2}})
    with pytest.raises(FetchError, match="unexpected train file counts"):
        fetch_dataset("grocery-apples", cache_dir=tmp_path / "c", url=f"{url}/ds.zip",
                      expected={"train": {"Fuji": 3}})
    assert not (tmp_path / "c" / "grocery-apples").exists()  # nothing half-written left behind
    (root / "junk.zip").write_text("not a zip")
    with pytest.raises(FetchError, match="not a zip"):
        fetch_dataset("grocery-apples", cache_dir=tmp_path / "c", url=f"{url}/junk.zip", expected={})
    with pytest.raises(FetchError, match="could not download"):
        fetch_dataset("grocery-apples", cache_dir=tmp_path / "c", url=f"{url}/missing.zip")
