"""The checks of `pomona doctor` that look at the photos themselves (`pomona.curation.doctor` describes them all).

One pass per photo (`photo_stats`: size, brightness, sharpness, pHashes, SHA-256), the neighbours of each photo in
the frozen features (`neighbours`) and the pairs of photos with one pHash (`phash_pairs`) give the findings of a
set of photos: label conflicts and copies within a class (`duplicate_findings`), test photos that copy a --data
photo (`leak_findings`), image quality (`quality_findings`) and outliers (`outlier_findings`). A finding is a row
of issues.csv (`issue_row`, ISSUE_COLUMNS) of one of KINDS.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.progress import Progress
from ..data.groups import DUPLICATE_FACTOR, cross_set_duplicates, normalize

PHASH_COPY = 2
"""Two photos whose 64-bit pHashes differ in at most this many bits, the one or the other mirrored left-right, are
one picture when their features are close too: within SAME_PICTURE_FACTOR grouping cuts for test leaks and
label conflicts (`same_picture`), within the duplicate cut for copies within a class. Resized, re-compressed and
flipped copies keep their pHash; a cropped copy does not, and is found only when its features are within the
duplicate cut."""
SAME_PICTURE_FACTOR = 1.5
"""See `same_picture`: on the grocery photos a flipped copy shrunk to 40% and re-compressed at quality 30-60 lies
at about the grouping cut; different fruits360 frames that share a pHash lie at 2 cuts and more."""
STATS_SIDE = 256
"""Blur and brightness are measured on the photo resized to this square, so that resolution does not matter."""
BLUR_FACTOR = 10.0
"""Blurred: sharpness (variance of the Laplacian over the variance of the grey levels) below 1/BLUR_FACTOR of
the collection's median."""
EXPOSURE_FACTOR = 0.3
"""Too dark: mean brightness below this fraction of the collection's median; too bright: the headroom to white
(255 - brightness) below this fraction of the median headroom."""
DARKEST, BRIGHTEST = 20.0, 240.0
"""Mean brightness (0-255) below or above which a photo is too dark or too bright whatever the collection."""
TINY_SIDE = 64
"""Tiny: shorter side below this many pixels, or below a quarter of the collection's median shorter side."""
MAX_RATIO = 3.0
"""Extreme aspect ratio: longer side more than this many times the shorter (the centre crop keeps a strip)."""
OUTLIER_K, OUTLIER_Z, OUTLIER_MIN_PHOTOS = 5, 3.5, 20
"""Outliers: mean cosine distance to the K nearest photos of the set; flagged above this robust z-score of its
logarithm (median and MAD), in sets of at least this many readable photos."""
COPY_SHARE = 0.5
"""A class more than this share of whose photos are copies of one another is warned about (video frames)."""

KINDS = ["test leak", "label conflict", "suspect label", "duplicate", "unreadable", "blurred", "too dark",
         "too bright", "tiny", "extreme aspect ratio", "outlier"]
"""The kinds of finding, worst first (the order of issues.csv and of the report)."""
ISSUE_COLUMNS = ["photo", "kind", "score", "suggestion", "other_photo", "set", "label", "other_label",
                 "suggested_label", "confidence", "detail"]


# ------------------------------------------------------------------------------------------- one pass per photo
def photo_stats(paths: list[str], max_pixels: int = 64_000_000) -> pd.DataFrame:
    """Per photo: width, height (upright), brightness (mean grey level 0-255), sharpness (variance of the
    Laplacian at STATS_SIDE x STATS_SIDE over the variance of the grey levels: a darker or flatter photo is not
    taken for a blurred one), phash and phash_mirror (64-bit pHashes of the photo and of its left-right
    mirror image), sha256 of the file, and the error of an
    unreadable one (as training would skip it)."""
    import imagehash
    from PIL import Image

    from ..data.images import BadImageError, image_size, load_image

    rows = []
    for path in Progress(paths, desc="checking photos", unit="img"):
        row = {"width": np.nan, "height": np.nan, "brightness": np.nan, "sharpness": np.nan, "phash": 0,
               "phash_mirror": 0, "sha256": "", "error": ""}
        try:
            row["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            row["width"], row["height"] = image_size(path, max_pixels)
            img = load_image(path, max_pixels, target=STATS_SIDE)
            grey = np.asarray(img.convert("L").resize((STATS_SIDE, STATS_SIDE), Image.Resampling.BILINEAR),
                              dtype=np.float32)
            lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
            row.update(brightness=float(grey.mean()), sharpness=float(lap.var() / max(float(grey.var()), 1e-6)),
                       phash=int(str(imagehash.phash(img)), 16),
                       phash_mirror=int(str(imagehash.phash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), 16))
        except BadImageError as e:
            row["error"] = str(e)
        except OSError as e:  # a file that vanished or cannot be read at all
            row["error"] = f"cannot read: {e.strerror or e}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("phash", "phash_mirror"):
        frame[column] = frame[column].astype(np.uint64)
    return frame


def _popcount(a) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has `bitwise_count`)."""
    a = np.asarray(a, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(a)
    return np.unpackbits(a[..., None].view(np.uint8), axis=-1).sum(-1)


@dataclass
class Neighbours:
    """Within one set of photos: the k nearest photos of each (indices and cosine distances, nearest first) and
    the nearest photo of another class (-1 and inf when there is none)."""

    knn: np.ndarray
    knn_dist: np.ndarray
    other: np.ndarray
    other_dist: np.ndarray


def neighbours(features: np.ndarray, labels: np.ndarray, k: int = OUTLIER_K, block: int = 1024) -> Neighbours:
    """`Neighbours` from blocks of the distance matrix (memory: block x N, never N x N)."""
    x = normalize(features)
    n = len(x)
    codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)[1]
    k = max(0, min(k, n - 1))
    knn, knn_dist = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    other, other_dist = np.full(n, -1), np.full(n, np.inf)
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = np.clip(1.0 - x[start:stop] @ x.T, 0.0, 2.0)
        rows = np.arange(stop - start)
        d[rows, rows + start] = np.inf
        if k:
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
            knn[start:stop] = np.take_along_axis(part, order, 1)
            knn_dist[start:stop] = np.take_along_axis(d, knn[start:stop], 1)
        d[codes[start:stop, None] == codes[None, :]] = np.inf
        nearest = d.argmin(1)
        other_dist[start:stop] = d[rows, nearest]
        other[start:stop] = np.where(np.isfinite(other_dist[start:stop]), nearest, -1)
    return Neighbours(knn, knn_dist, other, other_dist)


def phash_pairs(stats: pd.DataFrame, others: pd.DataFrame | None = None, limit: int = PHASH_COPY,
                block: int = 1024) -> np.ndarray:
    """(i, j) of every two photos whose pHashes are within `limit` bits, the one or the other mirrored (a
    left-right flipped copy): i < j within `stats`, or i in `stats` and j in `others` (blocks of the N x M
    comparison)."""
    h = stats["phash"].to_numpy(dtype=np.uint64)
    other = stats if others is None else others
    o, m = other["phash"].to_numpy(dtype=np.uint64), other["phash_mirror"].to_numpy(dtype=np.uint64)
    found = [np.zeros((0, 2), np.int64)]
    for start in range(0, len(h), block):
        x = h[start:start + block, None]
        i, j = np.nonzero(np.minimum(_popcount(x ^ o[None, :]), _popcount(x ^ m[None, :])) <= limit)
        i = i + start
        if others is None:  # both orders of a pair: keep it once
            keep = i != j
            i, j = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
        found.append(np.stack([i, j], 1))
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if others is None and len(pairs) else pairs


def hash_bits(a: pd.Series, b: pd.Series) -> int:
    """pHash distance of two photos (rows of `photo_stats`), the one or the other mirrored."""
    return int(min(_popcount(np.uint64(a["phash"]) ^ np.uint64(b["phash"])),
                   _popcount(np.uint64(a["phash"]) ^ np.uint64(b["phash_mirror"]))))


def _distances(x: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine distance of each (row of unit features x, row of y) pair."""
    if not len(pairs):
        return np.zeros(0)
    return np.clip(1.0 - np.einsum("ij,ij->i", x[pairs[:, 0]], y[pairs[:, 1]]), 0.0, 2.0)


def same_picture(pairs: np.ndarray, d: np.ndarray, cut: float) -> np.ndarray:
    """Which pHash pairs (within PHASH_COPY bits) are one picture: their features are also within
    SAME_PICTURE_FACTOR times the grouping cut. (A copy shrunk to 40% and re-compressed keeps its pHash while
    its features move as far as photos of one shelf lie apart; two different photos of a plain background can
    share a pHash, but their features lie further apart.)"""
    return d <= SAME_PICTURE_FACTOR * cut


# ------------------------------------------------------------------------------------------- findings
def issue_row(photo, kind, score, suggestion, *, other="", set_name="data", label="", other_label="", suggested="",
              confidence=np.nan, detail="") -> dict:
    """One row of issues.csv (ISSUE_COLUMNS): a finding of kind `kind` (one of KINDS) about `photo`."""
    return {"photo": photo, "kind": kind, "score": round(float(score), 4), "suggestion": suggestion,
            "other_photo": other, "set": set_name, "label": label, "other_label": other_label,
            "suggested_label": suggested, "confidence": confidence, "detail": detail}


def _how_alike(same_file: bool, bits: int, distance: float) -> str:
    if same_file:
        return "the same file"
    if bits <= PHASH_COPY:
        return (f"the same picture, resized, re-compressed or mirrored (pHash {bits} bits apart, cosine distance "
                f"{distance:.3f})")
    return f"a near-duplicate: cropped, edited or shot again (cosine distance {distance:.3f})"


def duplicate_findings(paths: list[str], labels: np.ndarray, stats: pd.DataFrame, x: np.ndarray,
                       nb: Neighbours, cut: float, set_name: str) -> list[dict]:
    """Label conflicts (a photo of another class within the duplicate cut, or the same file) and copies within a
    class (the same file, or the same pHash and near-duplicate features) of one set; `x` unit features."""
    close = cut * DUPLICATE_FACTOR
    sha = stats["sha256"].to_numpy()
    n = len(paths)

    def bits(i: int, j: int) -> int:
        return hash_bits(stats.iloc[i], stats.iloc[j])

    found = []
    conflicts = {}  # near-identical photos under two labels: features within the duplicate cut, or the same picture
    for i in np.flatnonzero(nb.other_dist <= close):
        conflicts.setdefault((min(i, int(nb.other[i])), max(i, int(nb.other[i]))), float(nb.other_dist[i]))
    pairs = phash_pairs(stats)
    d = _distances(x, x, pairs)
    across = (labels[pairs[:, 0]] != labels[pairs[:, 1]]) & same_picture(pairs, d, cut)
    for (i, j), dij in zip(pairs[across], d[across]):
        conflicts.setdefault((int(i), int(j)), float(dij))
    for (i, j), dij in sorted(conflicts.items(), key=lambda kv: kv[1]):
        found.append(issue_row(paths[i], "label conflict", 1 - dij / cut, f"near-identical photos under two labels, "
                               f"{labels[i]} and {labels[j]}: if they show the same apple, one label is wrong (keep "
                               "the right one); if not, the photos do not tell these varieties apart",
                               other=paths[j], set_name=set_name, label=labels[i], other_label=labels[j],
                               detail=_how_alike(sha[i] == sha[j], bits(i, j), dij)))
    # copies within a class: same file, or same pHash with near-duplicate features
    by_sha = pd.Series(np.arange(n)).groupby(sha).apply(list)
    same = np.asarray([(g[0], g[k]) for g in by_sha for k in range(1, len(g))], np.int64).reshape(-1, 2)
    pairs = np.concatenate([pairs, same])
    d = np.concatenate([d, _distances(x, x, same)])
    same_class = (labels[pairs[:, 0]] == labels[pairs[:, 1]]) & ((sha[pairs[:, 0]] == sha[pairs[:, 1]]) | (d <= close))
    copies = pd.DataFrame({"i": pairs[same_class, 0], "j": pairs[same_class, 1], "d": d[same_class]})
    # each photo that copies an earlier one (in table order) names the nearest of those: n - 1 rows for n copies
    for r in copies.sort_values("d", kind="stable").drop_duplicates("j").sort_values("j").itertuples():
        i, j = int(r.i), int(r.j)
        found.append(issue_row(paths[j], "duplicate", 1 - r.d / cut, f"a copy of {paths[i]} in its class: keep one of "
                               "the two (a copy weighs one picture twice)", other=paths[i], set_name=set_name,
                               label=labels[j], other_label=labels[i], detail=_how_alike(sha[i] == sha[j], bits(i, j),
                                                                                         float(r.d))))
    return found


def copy_warnings(issues: list[dict], labels: np.ndarray) -> list[str]:
    """Classes most of whose photos are copies of one another (video or turntable frames)."""
    frame = pd.DataFrame([r for r in issues if r["kind"] == "duplicate" and r["set"] == "data"],
                         columns=["photo", "other_photo", "label"])
    involved = pd.concat([frame[["photo", "label"]], frame[["other_photo", "label"]].set_axis(
        ["photo", "label"], axis=1)]).drop_duplicates().groupby("label").size()
    counts = pd.Series(labels).value_counts()
    return [f"{label}: {k} of its {counts[label]} photos are near-identical copies of another of its photos (the "
            "frames of a video or of a turntable pass?): the near-duplicate groups keep them on one side of a "
            "split, and `pomona train --train-every-nth N` trains on every Nth of them at little cost"
            for label, k in involved.items() if k > COPY_SHARE * counts[label]]


def leak_findings(test: dict, data: dict, cut: float) -> list[dict]:
    """Test photos that copy a --data photo: the same file, the same picture (`same_picture`), or features within
    the duplicate cut (`groups.cross_set_duplicates`); the nearest such photo of --data for each."""
    tok, dok = test["ok"], data["ok"]
    found = {}
    for i, j, d in cross_set_duplicates(test["features"][tok], data["features"][dok], cut):
        found[int(tok[i])] = (int(dok[j]), d)
    pairs = phash_pairs(test["stats"].iloc[tok], data["stats"].iloc[dok])
    d = _distances(normalize(test["features"][tok]), normalize(data["features"][dok]), pairs)
    keep = same_picture(pairs, d, cut)
    for (i, j), dij in zip(pairs[keep], d[keep]):
        if int(tok[i]) not in found or dij < found[int(tok[i])][1]:
            found[int(tok[i])] = (int(dok[j]), float(dij))
    by_sha = {s: i for i, s in reversed(list(enumerate(data["stats"]["sha256"]))) if s}
    for i, s in enumerate(test["stats"]["sha256"]):
        if s in by_sha and i not in found:
            found[i] = (by_sha[s], 0.0)
    rows = []
    for i, (j, d) in sorted(found.items(), key=lambda kv: kv[1][1]):
        same = test["stats"]["sha256"][i] == data["stats"]["sha256"][j]
        rows.append(issue_row(test["paths"][i], "test leak", 1 - d / cut, f"a copy of the training photo "
                              f"{data['paths'][j]}: remove it from the test set (or that photo from --data); a test "
                              "photo the model trained on flatters the score", other=data["paths"][j], set_name="test",
                              label=test["labels"][i], other_label=data["labels"][j],
                              detail=_how_alike(same, hash_bits(test["stats"].iloc[i], data["stats"].iloc[j]), d)))
    return rows


def _median(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.median()) if len(v) else float("nan")


def quality_findings(paths: list[str], labels: np.ndarray, stats: pd.DataFrame, set_name: str) -> list[dict]:
    """Unreadable, tiny, extreme aspect ratio, blurred, too dark, too bright: each relative to the set."""
    found = []
    ok = stats["error"] == ""
    short = np.minimum(stats["width"], stats["height"])
    long = np.maximum(stats["width"], stats["height"])
    med_short, med_sharp = _median(short[ok]), _median(stats.loc[ok, "sharpness"])
    med_bright = _median(stats.loc[ok, "brightness"])
    for i, r in stats.iterrows():
        row = dict(set_name=set_name, label=labels[i])
        if r["error"]:
            found.append(issue_row(paths[i], "unreadable", 1.0, "training skips it: replace the file or remove it",
                                   detail=r["error"], **row))
            continue
        side, ratio = short[i], long[i] / max(short[i], 1)
        tiny = min(TINY_SIDE, med_short / 4)
        if side < tiny:
            found.append(issue_row(paths[i], "tiny", 1 - side / tiny, "the model sees it blown up: use a larger "
                                   "photo, or drop it", detail=f"{int(r['width'])}x{int(r['height'])} pixels (the "
                                   f"collection's median shorter side: {med_short:.0f})", **row))
        if ratio > MAX_RATIO:
            found.append(issue_row(paths[i], "extreme aspect ratio", 1 - MAX_RATIO / ratio, "the centre crop keeps a "
                                   "small part of it: crop it around the apple", detail=f"{int(r['width'])}x"
                                   f"{int(r['height'])} pixels ({ratio:.1f}:1)", **row))
        if med_sharp > 0 and r["sharpness"] < med_sharp / BLUR_FACTOR:
            found.append(issue_row(paths[i], "blurred", 1 - r["sharpness"] / med_sharp, "out of focus or shaken: "
                                   "retake it, or drop it", detail=f"sharpness {r['sharpness']:.4f}, "
                                   f"{med_sharp / max(r['sharpness'], 1e-9):.0f}x below the collection's median "
                                   f"({med_sharp:.4f})", **row))
        b = r["brightness"]
        if b < DARKEST or b < EXPOSURE_FACTOR * med_bright:
            found.append(issue_row(paths[i], "too dark", 1 - b / max(med_bright, 1e-9), "under-exposed: retake it "
                                   "in better light, or drop it", detail=f"mean brightness {b:.0f}/255 (the "
                                   f"collection's median: {med_bright:.0f})", **row))
        elif b > BRIGHTEST or 255 - b < EXPOSURE_FACTOR * (255 - med_bright):
            found.append(issue_row(paths[i], "too bright", 1 - (255 - b) / max(255 - med_bright, 1e-9), "over-exposed: "
                                   "retake it, or drop it", detail=f"mean brightness {b:.0f}/255 (the collection's "
                                   f"median: {med_bright:.0f})", **row))
    return found


def outlier_findings(paths: list[str], labels: np.ndarray, nb: Neighbours, set_name: str) -> list[dict]:
    """Photos far from every other photo of their set (see OUTLIER_Z)."""
    if len(paths) < OUTLIER_MIN_PHOTOS or not nb.knn_dist.size:
        return []
    score = np.log(np.maximum(nb.knn_dist.mean(1), 1e-9))
    med = np.median(score)
    mad = 1.4826 * np.median(np.abs(score - med))
    if mad <= 0:
        return []
    z = (score - med) / mad
    return [issue_row(paths[i], "outlier", 1 - math.exp(med - score[i]), "not like the other photos: check that it is "
                      "an apple photo of this collection (and of its label)", set_name=set_name, label=labels[i],
                      other=paths[int(nb.knn[i, 0])], other_label=labels[int(nb.knn[i, 0])],
                      detail=f"mean distance to its {nb.knn.shape[1]} nearest photos {math.exp(score[i]):.3f}, the "
                      f"collection's median {math.exp(med):.3f} (robust z {z[i]:.1f}); nearest photo: other_photo")
            for i in np.flatnonzero(z > OUTLIER_Z)]
