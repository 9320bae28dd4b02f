"""`pomona ablate`: does class balancing help? The same split, the same seeds, one recipe, four arms.

Arms: `none` (plain training), `augmentor` (Augmentor-generated images for the training fold, `pomona.data.balance`),
`class_weights` (inverse-frequency weighted loss), `sampler` (inverse-frequency weighted sampler) and
`none_matched` (plain training for as many optimisation steps as the augmentor arm takes: its epochs are longer,
so without this control a gain could come from training longer, the original system's confound). Optionally
the training fold is first made strongly imbalanced (`imbalance=0.2` keeps 20% of the chosen minority classes'
training images; validation is never touched). Every arm is scored on the same validation images: macro-F1 with
a bootstrap 95% CI (images resampled, averaged over seeds), the paired difference to `none` with its own CI,
per-class F1 of the minority classes, and wall time (balancing included). Each run is scored with its last
epoch's weights, never the epoch that scored best on these same validation images.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import ARMS, AblationSettings, Config
from ..core.atomic import write_json, write_text
from ..data.balance import plan_balance
from ..data.bundle import DataBundle
from ..inference.loaded import load_run
from ..inference.predict import score_table
from ..inference.runfiles import RunFolder
from ..inference.runfolder import load_training_state
from ..models.metrics import macro_f1
from ..training.grouping import prepare_run_data
from ..training.train import train_and_evaluate

__all__ = ["AblationSettings", "ARMS", "run_ablation", "make_imbalanced", "thin_validation"]


@dataclass
class ArmRun:
    arm: str
    seed: int
    y_true: np.ndarray
    y_pred: np.ndarray
    seconds: float
    train_images: int
    run_dir: str


@dataclass
class AblationResult:
    rows: list[dict]
    runs: list[ArmRun] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def pick_minority(bundle: DataBundle, n: int) -> list[str]:
    """The `n` smallest classes of the training fold (ties broken by name)."""
    counts = bundle.subset("train").groupby("label").size()
    return sorted(counts.index, key=lambda c: (counts[c], c))[:n]


def make_imbalanced(bundle: DataBundle, classes: Sequence[str], keep: float, seed: int = 0) -> DataBundle:
    """Keep a seeded `keep` fraction (at least one) of the training images of `classes`; validation untouched."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"imbalance must be a fraction in (0, 1], got {keep}")
    unknown = sorted(set(classes) - set(bundle.classes))
    if unknown:
        raise ValueError(f"minority classes not in the data: {unknown}; there are {bundle.classes}")
    table = bundle.table
    rng = np.random.default_rng(seed)
    drop = []
    for c in sorted(classes):
        rows = table.index[(table["subset"] == "train") & (table["label"] == c)].to_numpy()
        n_keep = max(1, int(round(keep * len(rows))))
        drop.extend(rng.permutation(rows)[n_keep:])
    return DataBundle(table.drop(index=drop).reset_index(drop=True), bundle.classes)


def thin_validation(bundle: DataBundle, every_nth: int) -> DataBundle:
    """Keep every Nth validation image of each group (sorted by path)."""
    if every_nth <= 1:
        return bundle
    table = bundle.table
    val = table[table["subset"] == "val"].sort_values("path")
    keep = val.index[val.groupby("group", sort=False).cumcount() % every_nth == 0]
    mask = (table["subset"] != "val") | table.index.isin(keep)
    return DataBundle(table[mask].reset_index(drop=True), bundle.classes)


def arm_config(base: Config, arm: str, settings: AblationSettings, seed: int, cache_dir: Path,
               step_ratio: float = 1.0) -> Config:
    """The base recipe with one balancing method switched on (and all others off); `none_matched` trains
    `step_ratio` times as many epochs."""
    cfg = copy.deepcopy(base)
    if arm == "none_matched":
        cfg.train.epochs = max(1, int(round(base.train.epochs * step_ratio)))
        cfg.train.warmup_epochs = base.train.warmup_epochs * step_ratio
    cfg.seed = seed
    cfg.train.class_weighted_loss = arm == "class_weights"
    cfg.train.weighted_sampler = arm == "sampler"
    cfg.balance.mode = settings.balance_mode if arm == "augmentor" else "off"
    cfg.balance.cache_dir = str(cache_dir)
    if arm not in ARMS:
        raise ValueError(f"unknown ablation arm {arm!r}: {', '.join(ARMS)}")
    return cfg


def seed_averaged_f1(y_true: np.ndarray, preds: list[np.ndarray], idx: np.ndarray | None = None) -> float:
    if idx is None:
        return float(np.mean([macro_f1(y_true, p) for p in preds]))
    return float(np.mean([macro_f1(y_true[idx], p[idx]) for p in preds]))


def bootstrap_arms(y_true: np.ndarray, preds: dict[str, list[np.ndarray]], reference: str | None, n_boot: int,
                   seed: int = 0) -> dict[str, dict]:
    """Seed-averaged macro-F1 per arm with a percentile bootstrap CI over validation images, and the paired
    difference to `reference` (same resamples for every arm)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    samples = {arm: [] for arm in preds}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for arm, p in preds.items():
            samples[arm].append(seed_averaged_f1(y_true, p, idx))
    out = {}
    for arm, p in preds.items():
        s = np.array(samples[arm])
        entry = {"macro_f1": seed_averaged_f1(y_true, p), "ci95": [float(np.quantile(s, 0.025)),
                                                                    float(np.quantile(s, 0.975))]}
        if reference in preds and arm != reference:
            d = s - np.array(samples[reference])
            entry["delta"] = entry["macro_f1"] - seed_averaged_f1(y_true, preds[reference])
            entry["delta_ci95"] = [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]
        out[arm] = entry
    return out


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    from sklearn.metrics import f1_score

    return f1_score(y_true, y_pred, labels=list(range(k)), average=None, zero_division=0)


def run_ablation(base: Config, out: str | Path, settings: AblationSettings, bundle: DataBundle | None = None,
                 ) -> AblationResult:
    """Train every arm for every seed on one split and write results.md / results.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = bundle or prepare_run_data(base)
    minority = list(settings.minority or pick_minority(bundle, settings.n_minority))
    before = bundle.subset("train").groupby("label").size().to_dict()
    if settings.imbalance is not None:
        bundle = make_imbalanced(bundle, minority, settings.imbalance, base.seed)
    bundle = thin_validation(bundle, settings.val_every_nth)
    train_counts = bundle.subset("train").groupby("label").size().to_dict()
    val = bundle.subset("val")
    index = {c: i for i, c in enumerate(bundle.classes)}
    y_true = np.array([index[c] for c in val["label"]])
    plan = plan_balance(train_counts, settings.balance_mode)
    step_ratio = (sum(plan.after.values())) / sum(train_counts.values())
    runs: list[ArmRun] = []
    for arm in settings.arms:
        for seed in range(settings.seeds):
            cfg = arm_config(base, arm, settings, seed, out / "balance-cache", step_ratio)
            run_dir = out / f"{arm}-seed{seed}"
            folder = RunFolder(run_dir)
            start = time.perf_counter()
            result = train_and_evaluate(cfg, run_dir, bundle=bundle, overwrite=True)
            seconds = time.perf_counter() - start
            trained = load_run(run_dir, device=cfg.device, engine="torch")
            # score the last epoch: picking the best epoch on these images would select on the test set
            trained.model.load_state_dict(load_training_state(folder.last)["model"])
            _, frame = score_table(trained, val, n_boot=10)
            y_pred = np.array([index.get(c, -1) for c in frame["label"]])
            n_train = int((pd.read_csv(folder.split)["subset"] == "train").sum())
            runs.append(ArmRun(arm, seed, y_true, y_pred, seconds, n_train, str(run_dir)))
            print(f"ablation: {arm} seed {seed}: macro-F1 {macro_f1(y_true, y_pred):.3f}, {seconds:.0f} s "
                  f"(kept epoch {result.kept_epoch + 1})", flush=True)
    preds = {arm: [r.y_pred for r in runs if r.arm == arm] for arm in settings.arms}
    stats = bootstrap_arms(y_true, preds, "none" if "none" in preds else None, settings.n_boot)
    rows = []
    for arm in settings.arms:
        arm_runs = [r for r in runs if r.arm == arm]
        f1s = np.mean([per_class_f1(y_true, r.y_pred, len(bundle.classes)) for r in arm_runs], axis=0)
        row = {"arm": arm, **stats[arm], "per_seed": [macro_f1(y_true, r.y_pred) for r in arm_runs],
               "minority_f1": {c: float(f1s[index[c]]) for c in minority},
               "train_images": arm_runs[0].train_images,
               "epochs": arm_config(base, arm, settings, 0, out, step_ratio).train.epochs,
               "seconds": float(np.mean([r.seconds for r in arm_runs]))}
        rows.append(row)
    info = {"classes": bundle.classes, "minority": minority, "imbalance": settings.imbalance,
            "train_counts_before_cut": before, "train_counts": train_counts, "val_images": len(val),
            "seeds": settings.seeds, "settings": {f.name: getattr(settings, f.name) for f in fields(AblationSettings)},
            "recipe": base.to_dict()}
    result = AblationResult(rows, runs, info)
    write_ablation_report(result, out)
    return result


def format_ablation_table(result: AblationResult) -> str:
    """The markdown table: one row per arm."""
    minority = result.info["minority"]
    head = ["arm", "macro-F1 (mean of seeds)", "95% CI", "Δ vs none [95% CI]", "per seed"]
    head += [f"F1 {c}" for c in minority] + ["train images", "epochs", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        delta = (f"{r['delta']:+.3f} [{r['delta_ci95'][0]:+.3f}, {r['delta_ci95'][1]:+.3f}]"
                 if "delta" in r else "")
        cells = [r["arm"], f"{r['macro_f1']:.3f}", f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}", delta,
                 " ".join(f"{v:.3f}" for v in r["per_seed"])]
        cells += [f"{r['minority_f1'][c]:.3f}" for c in minority]
        cells += [str(r["train_images"]), str(r["epochs"]), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_ablation_report(result: AblationResult, out: Path) -> None:
    info = result.info
    counts = ", ".join(f"{c} {n}" for c, n in info["train_counts"].items())
    text = (f"Training images per class: {counts}. Minority classes: {', '.join(info['minority'])}"
            + (f" (cut to {info['imbalance']:.0%} of their training images)" if info["imbalance"] else "")
            + f". Validation images: {info['val_images']}. Seeds: {info['seeds']}.\n\n"
            + format_ablation_table(result) + "\n")
    write_text(out / "results.md", text)
    write_json(out / "results.json", {"rows": result.rows, "info": info}, default=str)
    print(text)
