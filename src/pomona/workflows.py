"""What `pomona train`, `pomona evaluate` and `pomona tune` do, as functions a script or a notebook calls with the
settings (`Config`) the command line would have made: the CLI parses its flags, calls one of these, and prints.

    from pomona.workflows import train_run
    train_run(cfg, "runs/g1")  # = pomona train --out runs/g1 with the settings of cfg

- `train_run`: train one model (or self-train with `--unlabeled`, or cross-validate with `folds`), evaluate it on
  its validation split (RUN/eval, RUN/report.html), then score it once on the test photos (`--test-data`,
  `--test-fraction`) into RUN/test.
- `evaluate_run`: score a run on labelled photos (default: its own validation split), the evaluation files and a
  report.html; `score_test_set`: the once-only score on the test photos.
- `tune_run`: the Optuna study, and with test photos `rescore_best_trial` (the best trial's settings retrained and
  scored on them).

They print what the command prints, in the same order (the scores, the files written). Heavy modules are imported
inside the functions (scoring a run never loads training, and nothing but `tune_run` loads optuna).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .config import Config, ScoringConfig, TuneConfig
from .core.errors import UsageError


def check_test_data(cfg: Config) -> None:
    """--test-data must hold new photos: none of --data or --val-data (checked before anything is trained)."""
    if not cfg.data.test_data:
        return
    from .data.bundle import index_data
    from .data.index import index_folder

    seen = {str(Path(p).resolve()) for p in index_data(cfg.data)["path"]}
    if cfg.data.val_data:
        seen |= {str(Path(p).resolve()) for p in index_folder(cfg.data.val_data)["path"]}
    overlap = [p for p in index_folder(cfg.data.test_data)["path"] if str(Path(p).resolve()) in seen]
    if overlap:
        raise UsageError(f"--test-data holds {len(overlap)} photo(s) of --data/--val-data, e.g. {overlap[0]}: a test "
                         "set must be new photos")
    if cfg.data.unlabeled:
        from .training.grouping import check_unlabeled_against_test
        from .training.selftrain import index_unlabeled

        test = index_folder(cfg.data.test_data)
        check_unlabeled_against_test(test, index_unlabeled(cfg.data.unlabeled, test["path"][:0]), cfg.device,
                                     cfg.data.max_pixels)


def train_run(cfg: Config, run_dir: str | Path, overwrite: bool = False, resume: bool = False, folds: int = 0,
              repeats: int = 1, env: Mapping[str, str] | None = None):
    """What `pomona train` does with these settings: train into `run_dir` (a new folder, or with `overwrite` one to
    replace; with `resume` the unfinished run there), self-train with `cfg.data.unlabeled`, or cross-validate with
    `folds` (x `repeats`); evaluate on the validation split and write the report; score the test photos once.
    `env` is the environment torchrun describes its processes in (the entry point's `os.environ`; default: one
    process). Returns the `TrainResult` (`CVResult` with `folds`; None in a torchrun process other than the first)."""
    run_dir = Path(run_dir)
    env = env or {}
    if not resume:
        from .inference.runfolder import check_new_run_folder

        check_new_run_folder(run_dir, overwrite)  # at once, before any photo is read
    check_test_data(cfg)
    if folds:
        return _train_folds(cfg, run_dir, folds, repeats, overwrite, resume, env)
    from .training.distributed import init_distributed, shutdown_distributed
    from .training.train import train_and_evaluate

    dist = init_distributed(env, cfg.device)  # several processes when started by torchrun
    try:
        if cfg.data.unlabeled and not resume:
            result = _self_train(cfg, run_dir, dist, overwrite)
        else:
            result = train_and_evaluate(cfg, run_dir, resume=resume, dist=dist, overwrite=overwrite)
    finally:
        shutdown_distributed(dist)
    if not dist.is_main:
        return None
    from .inference.runfiles import RunFolder

    kept = "best" if cfg.train.keep == "best" else "last"
    print(f"kept the {kept} epoch ({result.kept_epoch + 1}): validation macro-F1 {result.kept_macro_f1:.3f}"
          f"{' (selected on these photos)' if kept == 'best' else ''}; {result.seconds:.0f} s; run folder "
          f"{result.run_dir}")
    if result.bad_images:
        print(f"{len(result.bad_images)} unreadable image(s) skipped, listed in {result.run_dir}/bad_images.json")
    scoring = ScoringConfig(device=cfg.device)
    evaluate_run(result.run_dir, None, RunFolder(result.run_dir).eval_dir, scoring)
    score_test_set(result.run_dir, cfg, scoring)
    return result


def _self_train(cfg: Config, run_dir: Path, dist, overwrite: bool):
    """`train --unlabeled DIR` without folds: a teacher, then students on the confident pseudo-labels (the last
    one into RUN_FOLDER itself, beside teacher/)."""
    from .inference.runfolder import clear_run_folder
    from .training.grouping import prepare_run_data
    from .training.selftrain import index_unlabeled, self_train
    from .training.train import train_and_evaluate

    if dist.enabled:
        raise UsageError("--unlabeled runs in one process (not under torchrun)")
    bundle = prepare_run_data(cfg)
    unlabeled = index_unlabeled(cfg.data.unlabeled, bundle.table["path"])
    if overwrite:
        clear_run_folder(run_dir)
    # RUN_FOLDER was checked before anything was read; its own teacher/ is the one thing found there now
    def train_student(b, folder):
        return train_and_evaluate(cfg, folder, bundle=b, overwrite=True)

    return self_train(train_student, bundle, unlabeled, run_dir, cfg.train.pseudo_threshold,
                      cfg.train.self_train_rounds, cfg.device)


def _train_folds(cfg: Config, run_dir: Path, folds: int, repeats: int, overwrite: bool, resume: bool,
                 env: Mapping[str, str]):
    """`train --folds K`: cross-validation, out-of-fold scores and the fold models' ensemble."""
    from .inference.runfiles import RunFolder
    from .models.metrics import format_metrics
    from .reporting.report import build_report
    from .training.cv import train_folds

    if resume:
        raise UsageError("--resume continues one model's training; a --folds run is not resumable (run it again)")
    if "LOCAL_RANK" in env:
        raise UsageError("--folds runs in one process (not under torchrun)")
    if overwrite:
        from .inference.runfolder import clear_run_folder

        clear_run_folder(run_dir)
    if cfg.data.test_fraction:
        raise UsageError("--test-fraction is for one model; a --folds run's out-of-fold scores are held out already "
                         "(or give --test-data)")
    result = train_folds(cfg, run_dir, folds, repeats)
    cv, folder = result.cv, RunFolder(run_dir)
    lo, hi = cv["oof_macro_f1_ci95"]
    print(format_metrics(json.loads((folder.eval_dir / "metrics.json").read_text())))
    print(f"{cv['folds']}-fold cross-validation" + (f" x {cv['repeats']}" if cv["repeats"] > 1 else "") +
          f": out-of-fold macro-F1 {cv['oof_macro_f1']:.3f} (95% CI {lo:.3f}-{hi:.3f}, over {cv['ci_over']}) on "
          f"{cv['n_photos']} photos; temperature {cv['temperature']:.2f} (ECE {cv['ece_before']:.3f} -> "
          f"{cv['ece_after']:.3f}); {cv['seconds']:.0f} s")
    grouping = cv["grouping"]
    print(f"folds keep near-duplicate groups whole: {grouping['n_groups']} groups ({grouping['by']}; "
          f"{grouping.get('method') or grouping.get('note')}); groups.csv" if grouping["by"] != "none" else
          f"warning: random folds (--group-by none): {grouping['note']}")
    for w in grouping.get("warnings", []):
        print(f"warning: {w}")
    page = build_report(run_dir, folder.eval_dir)
    print(f"wrote {run_dir}/oof.csv, cv.json, eval/ and {page}; the run is the ensemble of the "
          f"{len(cv['per_fold'])} fold models")
    score_test_set(run_dir, cfg, ScoringConfig(device=cfg.device))
    return result


def evaluate_run(run_dir: str | Path, table=None, out: str | Path | None = None, scoring: ScoringConfig | None = None,
                 scored_on: str | None = None, report: bool = True) -> dict:
    """Score the run's model on `table` (default: its own validation split), write the evaluation files into `out`
    (default: RUN/eval) and (with `report`) a report.html: the run's own (RUN/report.html) when `out` is RUN/eval,
    else OUT/report.html, leaving the run's report alone. `scoring`: device, engine, TTA, threads, batch size (and
    the photos' source, named in the report's title). metrics.json says what the photos were (`scored_on`) and
    whether any choice of the run looked at them (`selected_on`: 'val' when the run kept its best epoch by these
    validation photos, else null). Returns the metrics."""
    from .inference.loaded import load_run
    from .inference.predict import score_table
    from .inference.runfiles import RunFolder
    from .models.metrics import format_metrics, write_metrics
    from .reporting.report import build_report

    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    out = Path(out) if out else folder.eval_dir
    s = scoring or ScoringConfig()
    run = load_run(run_dir, s.device, s.engine, s.tta, s.threads, s.batch_size)
    selected_on = None
    if table is None:
        from .data.bundle import load_split

        table = load_split(folder.split, run.classes).subset("val")
        scored_on = scored_on or "the run's validation split"
        selected_on = run.info.get("selected_on")
    metrics, frame = score_table(run, table)
    metrics.update(scored_on=scored_on or "the photos given", selected_on=selected_on)
    write_metrics(metrics, out, frame)
    print(format_metrics(metrics))
    if selected_on:
        print("note: the kept epoch was chosen on these same photos (--keep best): this score is optimistic; "
              "give --test-data or --test-fraction for one nothing selected on")
    if metrics["skipped_images"]:
        print(f"{len(metrics['skipped_images'])} unreadable image(s) skipped")
    if not report:
        print(f"wrote {out}/metrics.json, confusion_matrix.png and predictions.csv")
        return metrics
    own = out.resolve() == folder.eval_dir.resolve()
    source = s.data_dir or s.csv
    page = build_report(run_dir, out, None if own or not source else f"pomona run {run_dir.name} on {source}",
                        out=None if own else out / RunFolder.report.name)
    print(f"wrote {out}/metrics.json, confusion_matrix.png, predictions.csv and {page}")
    return metrics


def score_test_set(run_dir: str | Path, cfg: Config, scoring: ScoringConfig | None = None) -> dict | None:
    """With --test-data or --test-fraction: score the finished run once on photos nothing selected on, into
    RUN/test/ (its report.html stays on the validation or out-of-fold evaluation). Returns the metrics (None
    without test photos)."""
    from .inference.runfiles import RunFolder

    folder = RunFolder(run_dir)
    if cfg.data.test_data:
        from .data.index import index_folder

        table, where = index_folder(cfg.data.test_data, cfg.data.group_by), cfg.data.test_data
    elif cfg.data.test_fraction and folder.split.is_file():
        from .data.bundle import load_split

        table = load_split(folder.split, folder.read_run_info()["classes"]).subset("test")
        where = f"the held-out {cfg.data.test_fraction:g} of --data"
    else:
        return None
    print(f"test set ({len(table)} photos from {where}; nothing was selected on them):")
    return evaluate_run(folder.path, table, folder.test_dir, scoring, scored_on=f"test: {where}", report=False)


def tune_run(cfg: Config, tcfg: TuneConfig, out: str | Path) -> dict:
    """What `pomona tune --out OUT` does: run (or join, or continue) the study, print and write its results, and
    with test photos (--test-data, --test-fraction) `rescore_best_trial`. Returns best.json ({} before any trial
    finished)."""
    from .reporting.report import build_report
    from .tuning.tune import tune as run_tune

    check_test_data(cfg)
    study, best = run_tune(cfg, tcfg, out)
    if not best:
        print(f"no finished trial yet in study {study.study_name!r}")
        return {}
    print(f"best trial {best['best_trial']}: validation macro-F1 {best['best_val_macro_f1']:.3f} (selected on the "
          f"validation photos: optimistic)  {best['params']}")
    print(f"trials: {best['trials']['complete']} complete, {best['trials']['pruned']} pruned, "
          f"{best['trials']['fail']} failed (and queued again)")
    print(f"wrote {out}/best.json, trials.csv, plots/, {build_report(out).name}; retrain with: "
          f"pomona train --from-study {out} --out RUN")
    if best.get("tracker"):
        print(f"tracker runs: {best['tracker']}")
    if cfg.data.test_data or cfg.data.test_fraction:
        return rescore_best_trial(Path(out))
    return best


def rescore_best_trial(out: str | Path) -> dict:
    """`tune --test-data/--test-fraction`: retrain the best trial's settings into OUT/best-retrained and score it
    once on the test photos, which no trial saw; the held-out macro-F1 goes into best.json beside the selected one.
    Returns best.json."""
    from .core.atomic import write_json
    from .inference.runfiles import RunFolder
    from .training.train import train_and_evaluate
    from .tuning.study import best_config

    out = Path(out)
    cfg, _ = best_config(out)
    run_dir = out / "best-retrained"
    print(f"retraining the best trial's settings into {run_dir} to score them on the test photos")
    train_and_evaluate(cfg, run_dir, overwrite=True)
    score_test_set(run_dir, cfg, ScoringConfig(device=cfg.device))
    held = json.loads((RunFolder(run_dir).test_dir / "metrics.json").read_text())
    best = json.loads((out / "best.json").read_text())
    best.update(held_out_macro_f1=held["macro_f1"], held_out_macro_f1_ci95=held["macro_f1_ci95"],
                held_out_n=held["n"], held_out_scored_on=held["scored_on"])
    write_json(out / "best.json", best)
    print(f"best trial on the test photos: macro-F1 {held['macro_f1']:.3f} (held out: nothing selected on them) vs "
          f"{best['best_val_macro_f1']:.3f} selected on validation")
    return best
