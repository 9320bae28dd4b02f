"""`pomona data fetch`: demo data for users off these machines, downloaded once into a cache folder."""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ..core.errors import PomonaError
from ..core.progress import Progress

# The Grocery Store Dataset (Klasson et al., WACV 2019), MIT licence, pinned to the commit the shared copy uses.
GROCERY_COMMIT = "fc80ba90f803d79d0383df52c5a4ac5de99ff6fc"
GROCERY_URL = f"https://github.com/marcusklasson/GroceryStoreDataset/archive/{GROCERY_COMMIT}.zip"
# Images per split and class at that commit (train/val as in ../shared/data/grocery-apples).
GROCERY_COUNTS = {
    "train": {"Golden-Delicious": 45, "Granny-Smith": 59, "Pink-Lady": 59, "Red-Delicious": 50, "Royal-Gala": 65},
    "val": {"Golden-Delicious": 6, "Granny-Smith": 6, "Pink-Lady": 5, "Royal-Gala": 5},
}


class FetchError(PomonaError, RuntimeError):
    """The download failed or did not hold what was expected."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pomona"


def download(url: str, dest: Path) -> Path:
    """Stream `url` to `dest` with a progress bar."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress(total=total, unit="B", desc=f"downloading {Path(url).name}", unit_scale=True) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        raise FetchError(f"could not download {url}: {e}") from e
    return dest


def extract_apples(archive: Path, target: Path) -> dict[str, dict[str, int]]:
    """Extract only the apple classes (`dataset/<split>/Fruit/Apple/<class>/*`) into `target/<split>/<class>/`."""
    counts: dict[str, dict[str, int]] = {}
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            parts = Path(member.filename).parts
            # <repo-commit>/dataset/<split>/Fruit/Apple/<class>/<file>
            if member.is_dir() or len(parts) != 7 or parts[1] != "dataset" or parts[3:5] != ("Fruit", "Apple"):
                continue
            split, cls, name = parts[2], parts[5], parts[6]
            if split not in ("train", "val", "test") or name.startswith("."):
                continue
            out = target / split / cls / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            counts.setdefault(split, {}).setdefault(cls, 0)
            counts[split][cls] += 1
    return counts


def check_counts(counts: dict[str, dict[str, int]], expected: dict[str, dict[str, int]]) -> None:
    for split, classes in expected.items():
        got = {c: n for c, n in counts.get(split, {}).items() if n}
        want = {c: n for c, n in classes.items() if n}
        if got != want:
            raise FetchError(f"unexpected {split} file counts: got {got}, expected {want}")


def fetch_dataset(name: str, cache_dir: str | Path | None = None, url: str | None = None,
                  expected: dict[str, dict[str, int]] | None = None) -> Path:
    """Download and extract `name` (only 'grocery-apples' for now) unless already cached; return its folder."""
    if name != "grocery-apples":
        raise FetchError(f"unknown data set {name!r}; available: grocery-apples")
    target = Path(cache_dir or default_cache_dir()) / name
    if (target / ".complete").is_file():
        return target
    expected = GROCERY_COUNTS if expected is None else expected
    tmp = Path(tempfile.mkdtemp(prefix="pomona-fetch-"))
    try:
        archive = download(url or GROCERY_URL, tmp / "archive.zip")
        staging = tmp / name
        try:
            counts = extract_apples(archive, staging)
        except zipfile.BadZipFile as e:
            raise FetchError(f"the download is not a zip archive: {e}") from e
        check_counts(counts, expected)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
        (target / ".complete").write_text(str(counts))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
