"""Benchmark: `pomona doctor` and `pomona suggest` on real photos with planted faults.

    python benchmarks/doctor.py [--out runs/bench-doctor] [--fruits360 auto|all|N] [--budget-min 20]

- **Planted label errors** (grocery-apples train, 278 photos): 15 random photos get another random label; the
  recall of those 15 among the top 30 suspects of `doctor()` (frozen-feature out-of-fold model + cleanlab) and
  the precision of those top 30, mean over 5 seeds (target: recall >= 0.8).
- **Planted leaks**: 10 training photos copied into a test folder (resized, JPEG re-compressed, flipped, or
  several of these) beside the real val folder; how many of the 10 are test leaks (and of 2 more, cropped copies,
  reported apart), and how many real grocery val photos duplicate a train photo (listed, if any).
- **Time and peak memory** of `pomona doctor` (a fresh process, every process of it sampled from /proc) on the
  300 grocery photos (train + val as --test-data) and on fruits360-apples (all 19,554 frames, or a 5,000-frame
  subset when the feature extraction alone is projected past --budget-min minutes on this machine, from the rate
  measured on the grocery photos; the table says which).
- **Groups vs filming passes** on those fruits360 frames: adjusted Rand index of doctor's groups.csv against
  the passes (class + file-name prefix r0_/r1_/r2_/r_/none).
- **Label next** on those frames: each class's last filming pass is held out; the rest is a pool with hidden
  labels. Start from 5 labelled photos per class; 3 rounds of `suggest.choose_next` (margin of a logistic
  regression on the frozen features, at most one photo per near-duplicate group, the group cut of the labelled
  photos as a run's groups.json gives it) against 3 rounds of random picks of the same size (50), each round
  followed by training; macro-F1 on the held-out passes, 3 seeds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table  # noqa: E402
from scale import make_subset, run_job  # noqa: E402

from pomona.core.runtime import MALLOC_TUNABLES, reexec_with_malloc_tuning  # noqa: E402
from pomona.data.index import index_folder  # noqa: E402
from pomona.models.metrics import macro_f1  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GROCERY = SHARED / "grocery-apples"
FRUITS = SHARED / "fruits360-apples" / "all"
PASS = re.compile(r"^(r\d?_)?")


# ---------------------------------------------------------------------------------------------- label errors
def planted_label_errors(train: pd.DataFrame, features: np.ndarray, out: Path, seeds: int = 5, flips: int = 15,
                         top: int = 30) -> dict:
    from pomona.curation.doctor import doctor

    classes = sorted(set(train["label"]))
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        table = train.copy()
        flipped = rng.choice(len(table), flips, replace=False)
        for i in flipped:
            table.loc[i, "label"] = rng.choice([c for c in classes if c != table.loc[i, "label"]])
        result = doctor(table, out / f"flips-{seed}", features=features, seed=seed, show=top)
        shown = list(result.suspects["row"][:top])
        hits = len(set(shown) & set(flipped.tolist()))
        rows.append({"seed": seed, "flagged": len(result.suspects), "hits": hits, "recall": hits / flips,
                     "precision": hits / max(1, len(shown))})
        print(f"label errors, seed {seed}: {hits}/{flips} flipped labels among the top {len(shown)} suspects "
              f"({len(result.suspects)} flagged)", flush=True)
    return {"recall": float(np.mean([r["recall"] for r in rows])),
            "precision": float(np.mean([r["precision"] for r in rows])),
            "flagged": float(np.mean([r["flagged"] for r in rows])), "per_seed": rows}


# ---------------------------------------------------------------------------------------------- leaks
def _copy(img, how: list[str], rng):
    from PIL import Image

    for step in how:
        if step == "resize":
            f = rng.uniform(0.4, 0.8)
            img = img.resize((max(16, int(img.width * f)), max(16, int(img.height * f))), Image.Resampling.BILINEAR)
        elif step == "flip":
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif step == "crop":
            dx, dy = int(img.width * 0.06), int(img.height * 0.06)
            img = img.crop((dx, dy, img.width - dx, img.height - dy))
    return img


LEAKS = [["resize"], ["jpeg"], ["jpeg"], ["resize", "jpeg"], ["resize", "jpeg"], ["resize", "jpeg"], ["flip"],
         ["flip", "jpeg"], ["flip", "resize", "jpeg"], ["flip", "resize", "jpeg"]]
"""The 10 planted leaks: resized (to 40-80%), JPEG re-compressed (quality 30-60), left-right flipped, or several."""
CROPS = [["crop", "resize", "jpeg"], ["crop", "flip", "jpeg"]]
"""Two more, cropped (6% off each side): reported apart, as a limit (a crop changes the pHash)."""


def planted_leaks(train: pd.DataFrame, val: pd.DataFrame, f_train: np.ndarray, f_val: np.ndarray, out: Path,
                  seed: int = 0) -> dict:
    from PIL import Image

    from pomona.curation.doctor import doctor
    from pomona.training.grouping import compute_grouping_features

    rng = np.random.default_rng(seed)
    folder = out / "planted-test"
    chosen = rng.choice(len(train), len(LEAKS) + len(CROPS), replace=False)
    planted = []
    for k, (i, how) in enumerate(zip(chosen, LEAKS + CROPS)):
        src = train.loc[i]
        img = _copy(Image.open(src["path"]).convert("RGB"), how, rng)
        target = folder / src["label"] / f"leak{k}_{'-'.join(how)}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(30, 61)) if "jpeg" in how else 95)
        target.write_bytes(buf.getvalue())
        planted.append({"path": str(target), "label": src["label"], "source": src["path"], "how": "+".join(how),
                        "crop": "crop" in how})
    planted = pd.DataFrame(planted)
    test = pd.concat([val, planted[["path", "label"]].assign(group="")], ignore_index=True)
    f_planted = compute_grouping_features(list(planted["path"]))
    result = doctor(train, out / "leaks", test, features=np.concatenate([f_train, f_val, f_planted]))
    leaks = result.issues[result.issues["kind"] == "test leak"]
    found = planted.merge(leaks[["photo", "other_photo", "detail"]], left_on="path", right_on="photo", how="left")
    found["right_source"] = found["other_photo"] == found["source"]
    real = leaks[~leaks["photo"].isin(set(planted["path"]))]
    for r in found.itertuples():
        print(f"planted leak {Path(r.path).name}: " + (f"found ({r.detail})" if r.right_source else "MISSED"),
              flush=True)
    for r in real.itertuples():
        print(f"real train-val duplicate: {r.photo} ~ {r.other_photo} ({r.detail})")
    crops = found["crop"].to_numpy(bool)
    return {"found": int(found["right_source"][~crops].sum()), "planted": int((~crops).sum()),
            "crops_found": int(found["right_source"][crops].sum()), "crops": int(crops.sum()), "real": len(real),
            "real_pairs": [[r.photo, r.other_photo] for r in real.itertuples()],
            "missed": list(found.loc[~found["right_source"], "how"])}


# ---------------------------------------------------------------------------------------------- label next
def _fit(x, y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(x, y)


def label_next(groups: pd.DataFrame, features: np.ndarray, seeds: int = 3, start: int = 5, rounds: int = 3,
               n: int = 50) -> pd.DataFrame:
    from pomona.curation.suggest import choose_next, uncertainty
    from pomona.data.groups import choose_threshold

    table = groups.reset_index(drop=True)
    passes = table["label"] + "/" + [PASS.match(Path(p).name).group(0) for p in table["path"]]
    last = passes.groupby(table["label"]).transform("max")
    test, pool = np.flatnonzero(passes == last), np.flatnonzero(passes != last)
    classes = sorted(set(table["label"]))
    y = np.array([classes.index(c) for c in table["label"]])
    names = [Path(p).name for p in table["path"]]
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        first = np.concatenate([rng.choice(pool[y[pool] == c], start, replace=False) for c in range(len(classes))])
        for arm in ("suggest", "random"):
            labelled = list(first)
            for r in range(rounds + 1):
                model = _fit(features[labelled], y[labelled])
                f1 = macro_f1(y[test], model.predict(features[test]))
                rows.append({"arm": arm, "seed": seed, "round": r, "labelled": len(labelled), "macro_f1": f1})
                if r == rounds:
                    break
                left = np.setdiff1d(pool, labelled)
                if arm == "random":
                    labelled += list(rng.choice(left, n, replace=False))
                    continue
                probs = np.zeros((len(left), len(classes)))
                probs[:, model[-1].classes_] = model.predict_proba(features[left])
                cut = choose_threshold(features[labelled], y[labelled])
                picked, _, _ = choose_next(uncertainty(probs, "margin"), features[left], probs.argmax(1), n,
                                           names=[names[i] for i in left], cut=cut)
                labelled += list(left[picked])
        print(f"label next, seed {seed}: " + ", ".join(f"{r['arm']} {r['labelled']}: {r['macro_f1']:.3f}"
                                                        for r in rows if r["seed"] == seed), flush=True)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- main
def doctor_job(argv: list[str]) -> tuple[float, float]:
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, PYTHONPATH=str(ROOT / "src"), POMONA_NO_REEXEC="1")
    return run_job([sys.executable, "-m", "pomona", "doctor", "--device", "cpu", *argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-doctor")
    parser.add_argument("--fruits360", default="auto", help="auto (all frames unless projected past --budget-min), "
                        "all, or a number of frames")
    parser.add_argument("--budget-min", type=float, default=20.0)
    args = parser.parse_args()
    reexec_with_malloc_tuning(os.environ)  # the malloc setting pomona's entry points use (3x faster features)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pomona.training.grouping import compute_grouping_features

    train, val = index_folder(GROCERY / "train"), index_folder(GROCERY / "val")
    start = time.perf_counter()
    features = compute_grouping_features(list(train["path"]) + list(val["path"]))
    per_photo = (time.perf_counter() - start) / (len(train) + len(val))
    f_train, f_val = features[:len(train)], features[len(train):]

    errors = planted_label_errors(train, f_train, out)
    leaks = planted_leaks(train, val, f_train, f_val, out)
    g_wall, g_rss = doctor_job(["--data", str(GROCERY / "train"), "--test-data", str(GROCERY / "val"), "--out",
                                str(out / "grocery")])
    print(f"doctor on grocery: {g_wall:.0f} s, peak {g_rss:.0f} MiB", flush=True)

    total = sum(1 for _ in FRUITS.glob("*/*.jpg"))
    projected = per_photo * total / 60
    size = None if args.fruits360 == "all" or (args.fruits360 == "auto" and projected <= args.budget_min) else \
        (5000 if args.fruits360 == "auto" else int(args.fruits360))
    with tempfile.TemporaryDirectory() as tmp:
        data = FRUITS if size is None else make_subset(size, Path(tmp) / "subset")
        f_wall, f_rss = doctor_job(["--data", str(data), "--out", str(out / "fruits360"), "--keep-features"])
        groups = pd.read_csv(out / "fruits360" / "groups.csv")
        fx = np.load(out / "fruits360" / "features.npy")
        n_frames = len(groups)
        print(f"doctor on fruits360 ({n_frames} frames): {f_wall:.0f} s, peak {f_rss:.0f} MiB", flush=True)
        from sklearn.metrics import adjusted_rand_score

        passes = groups["label"] + "/" + [PASS.match(Path(p).name).group(0) for p in groups["path"]]
        ari = adjusted_rand_score(passes, groups["group"])
        curve = label_next(groups, fx)
    f_summary = json.loads((out / "fruits360" / "summary.json").read_text())
    mean = curve.groupby(["arm", "round"]).agg(labelled=("labelled", "first"), macro_f1=("macro_f1", "mean"),
                                               sd=("macro_f1", "std")).reset_index()
    final = mean[mean["round"] == mean["round"].max()].set_index("arm")["macro_f1"]
    which = "all" if size is None else f"a {n_frames}-frame subset (features projected at {projected:.0f} min " \
                                       f"for all {total})"
    rows = [
        {"check": "planted label errors (15 of 278 grocery photos): recall in the top 30 suspects, mean of 5 seeds",
         "value": f"{errors['recall']:.2f}", "target": ">= 0.8"},
        {"check": "  precision of the top 30 (mean flagged per seed)",
         "value": f"{errors['precision']:.2f} ({errors['flagged']:.0f} flagged)", "target": ""},
        {"check": "planted leaks (10 copies: resized, re-compressed, flipped, or several) found as test leaks",
         "value": f"{leaks['found']}/{leaks['planted']}", "target": "10/10"},
        {"check": "  cropped copies (6% off each side, then resized or flipped, re-compressed): found",
         "value": f"{leaks['crops_found']}/{leaks['crops']}", "target": ""},
        {"check": "real grocery val photos that duplicate a train photo", "value": str(leaks["real"]), "target": ""},
        {"check": f"fruits360 groups vs filming passes, ARI ({n_frames} frames: "
                  f"{f_summary['groups']['n_groups']} groups, {passes.nunique()} passes)",
         "value": f"{ari:.3f}", "target": ""},
        {"check": "label next, macro-F1 on held-out passes after 3 x 50 labels: suggest vs random (3 seeds)",
         "value": f"{final['suggest']:.3f} vs {final['random']:.3f}", "target": "suggest > random"},
        {"check": "pomona doctor on grocery (278 + 22 test photos): seconds, peak RSS MiB",
         "value": f"{g_wall:.0f} s, {g_rss:.0f} MiB", "target": ""},
        {"check": f"pomona doctor on fruits360 ({which}): seconds, peak RSS MiB",
         "value": f"{f_wall:.0f} s, {f_rss:.0f} MiB", "target": ""},
    ]
    text = print_table(rows, ["check", "value", "target"])
    print()
    curve_text = print_table(mean.to_dict("records"), ["arm", "round", "labelled", "macro_f1", "sd"])
    (out / "results.md").write_text(text + "\n\n" + curve_text + "\n")
    (out / "results.json").write_text(json.dumps({"label_errors": errors, "leaks": leaks, "ari": ari,
                                                  "curve": curve.to_dict("records"), "grocery_s": g_wall,
                                                  "grocery_rss_mib": g_rss, "fruits360_frames": n_frames,
                                                  "fruits360_s": f_wall, "fruits360_rss_mib": f_rss,
                                                  "fruits360_projected_min": projected}, indent=2, default=str))


if __name__ == "__main__":
    main()
