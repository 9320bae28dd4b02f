"""The `pomona` command: a table of subcommands (`COMMANDS`), each one plain function taking one settings dataclass
from `pomona.config`, whose fields are its flags (their docstrings the --help text, `Literal[...]` types the
accepted choices, checked while parsing).

This is the only module that knows every other one, and it imports them inside the subcommands: `pomona --help`,
`pomona SUB --help`, `--version` and usage errors answer at once, without PyTorch. The malloc re-exec
(`pomona.runtime`) happens after parsing, only when a real command runs. Settings resolve as
defaults <- config file (`--config x.yaml|x.json`) <- flags; `--print-config` shows the result and exits.

Errors are one line on stderr, never a traceback (unless `--debug`): pomona's own errors (`PomonaError`: bad data,
a damaged run folder, a missing optional package with the pip command that installs it, ...) and usage errors
exit with 2, anything unexpected with 1 (`errors.explain_error`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

from . import __version__
from .errors import PomonaError, explain_error, require
from .config import (AblateCommand, BalanceCommand, Config, DoctorCommand, EvaluateCommand, ExplainCommand,
                     ExportCommand, FetchCommand, InputConfig, PredictCommand, PreviewCommand, ReportCommand,
                     ServeCommand, SuggestCommand, TrainCommand, TuneCommand, choices, field_docs, load_overrides,
                     merge, out_of_range, range_problems, set_field)


class UsageError(PomonaError):
    """A command line that cannot run as given (exit code 2, like argparse's own usage errors)."""


# ---------------------------------------------------------------------------------------------- subcommands
def train(s: TrainCommand) -> int:
    from .distributed import init_distributed, shutdown_distributed
    from .train import train_and_evaluate

    if s.resume:
        run_dir = Path(s.resume)
        if s.out and Path(s.out).resolve() != run_dir.resolve():
            raise UsageError(f"--resume {s.resume} continues that run in its own folder; drop --out {s.out}")
        if s.overwrite:
            raise UsageError("--resume continues a run; --overwrite would replace it: give one of them")
        conflicts = config_differences(Config.load(run_dir / "config.json"), s.config)
        if conflicts:
            raise UsageError(f"--resume continues {run_dir} with the settings it was started with (its config.json); "
                             f"these differ: {'; '.join(conflicts)}. Drop them, or start a new run with --out")
    elif not s.out:
        raise UsageError("--out RUN_FOLDER is required")
    else:
        run_dir = Path(s.out)
        from .checkpoint import check_new_run_folder

        check_new_run_folder(run_dir, s.overwrite)  # at once, before any photo is read
    cfg = s.config
    _check_test_data(cfg)
    if s.folds:
        return _train_folds(s, run_dir)
    dist = init_distributed(os.environ, cfg.device)  # several processes when started by torchrun
    try:
        if cfg.data.unlabeled and not s.resume:
            result = _self_train(cfg, run_dir, dist, s.overwrite)
        else:
            result = train_and_evaluate(cfg, run_dir, resume=bool(s.resume), dist=dist, overwrite=s.overwrite)
    finally:
        shutdown_distributed(dist)
    if not dist.is_main:
        return 0
    kept = "best" if cfg.train.keep == "best" else "last"
    print(f"kept the {kept} epoch ({result.kept_epoch + 1}): validation macro-F1 {result.kept_macro_f1:.3f}"
          f"{' (selected on these photos)' if kept == 'best' else ''}; {result.seconds:.0f} s; run folder "
          f"{result.run_dir}")
    if result.bad_images:
        print(f"{len(result.bad_images)} unreadable image(s) skipped, listed in {result.run_dir}/bad_images.json")
    scoring = EvaluateCommand(run=str(run_dir), device=cfg.device)
    _evaluate_and_report(result.run_dir, None, result.run_dir / "eval", scoring)
    _score_test_set(result.run_dir, cfg, scoring)
    return 0


def _check_test_data(cfg: Config) -> None:
    """--test-data must hold new photos: none of --data or --val-data (checked before anything is trained)."""
    if not cfg.data.test_data:
        return
    from .data import index_data
    from .index import index_folder

    seen = {str(Path(p).resolve()) for p in index_data(cfg.data)["path"]}
    if cfg.data.val_data:
        seen |= {str(Path(p).resolve()) for p in index_folder(cfg.data.val_data)["path"]}
    overlap = [p for p in index_folder(cfg.data.test_data)["path"] if str(Path(p).resolve()) in seen]
    if overlap:
        raise UsageError(f"--test-data holds {len(overlap)} photo(s) of --data/--val-data, e.g. {overlap[0]}: a test "
                         "set must be new photos")
    if cfg.data.unlabeled:
        from .groups import check_unlabeled_against_test
        from .selftrain import index_unlabeled

        test = index_folder(cfg.data.test_data)
        check_unlabeled_against_test(test, index_unlabeled(cfg.data.unlabeled, test["path"][:0]), cfg.device,
                                     cfg.data.max_pixels)


def _score_test_set(run_dir: Path, cfg: Config, scoring: EvaluateCommand) -> None:
    """With --test-data or --test-fraction: score the finished run once on photos nothing selected on, into
    RUN/test/ (its report.html stays on the validation or out-of-fold evaluation)."""
    if cfg.data.test_data:
        from .index import index_folder

        table, where = index_folder(cfg.data.test_data, cfg.data.group_by), cfg.data.test_data
    elif cfg.data.test_fraction and (run_dir / "split.csv").is_file():
        from .checkpoint import read_run_info
        from .data import load_split

        table = load_split(run_dir / "split.csv", read_run_info(run_dir)["classes"]).subset("test")
        where = f"the held-out {cfg.data.test_fraction:g} of --data"
    else:
        return
    print(f"test set ({len(table)} photos from {where}; nothing was selected on them):")
    _evaluate_and_report(run_dir, table, run_dir / "test", scoring, scored_on=f"test: {where}", report=False)


def _self_train(cfg: Config, run_dir: Path, dist, overwrite: bool):
    """`train --unlabeled DIR` without folds: a teacher, then students on the confident pseudo-labels (the last
    one into RUN_FOLDER itself, beside teacher/)."""
    from .checkpoint import clear_run_folder
    from .groups import prepare_run_data
    from .selftrain import index_unlabeled, self_train
    from .train import train_and_evaluate

    if dist.enabled:
        raise UsageError("--unlabeled runs in one process (not under torchrun)")
    bundle = prepare_run_data(cfg)
    unlabeled = index_unlabeled(cfg.data.unlabeled, bundle.table["path"])
    if overwrite:
        clear_run_folder(run_dir)
    # RUN_FOLDER was checked before anything was read; its own teacher/ is the one thing found there now
    return self_train(lambda b, folder: train_and_evaluate(cfg, folder, bundle=b, overwrite=True), bundle, unlabeled, run_dir,
                      cfg.train.pseudo_threshold, cfg.train.self_train_rounds, cfg.device)


def _train_folds(s: TrainCommand, run_dir: Path) -> int:
    """`train --folds K`: cross-validation, out-of-fold scores and the fold models' ensemble."""
    import json

    from .cv import train_folds
    from .metrics import format_metrics
    from .report import build_report

    if s.resume:
        raise UsageError("--resume continues one model's training; a --folds run is not resumable (run it again)")
    if "LOCAL_RANK" in os.environ:
        raise UsageError("--folds runs in one process (not under torchrun)")
    if s.overwrite:
        from .checkpoint import clear_run_folder

        clear_run_folder(run_dir)
    if s.config.data.test_fraction:
        raise UsageError("--test-fraction is for one model; a --folds run's out-of-fold scores are held out already "
                         "(or give --test-data)")
    result = train_folds(s.config, run_dir, s.folds, s.repeats)
    cv = result.cv
    lo, hi = cv["oof_macro_f1_ci95"]
    print(format_metrics(json.loads((run_dir / "eval" / "metrics.json").read_text())))
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
    print(f"wrote {run_dir}/oof.csv, cv.json, eval/ and {build_report(run_dir, run_dir / 'eval')}; the run is the "
          f"ensemble of the {len(cv['per_fold'])} fold models")
    _score_test_set(run_dir, s.config, EvaluateCommand(run=str(run_dir), device=s.config.device))
    return 0


def config_differences(saved: Config, given: Config) -> list[str]:
    """The settings in which `given` differs from `saved`, as 'train.lr 0.01 (saved: 0.001)'."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    a, b = flat(saved.to_dict()), flat(given.to_dict())
    return [f"{k} {b[k]!r} (saved: {a[k]!r})" for k in a if a[k] != b.get(k)]


def _train_base(s: TrainCommand) -> Config:
    """What train's flags apply to: the run's own config (--resume), the best trial's (--from-study), defaults."""
    if s.resume:
        _run_folder(s.resume)
        return Config.load(Path(s.resume) / "config.json")
    if s.from_study:
        from .study import best_config

        if not Path(s.from_study).exists():
            raise UsageError(f"tuning folder not found: {s.from_study}")

        base, best = best_config(s.from_study)
        print(f"retraining trial {best['trial']} of {s.from_study} (macro-F1 {best['val_macro_f1']:.3f}): "
              f"{best['params']}", file=sys.stderr)
        return base
    return Config()


def _evaluate_and_report(run_dir: Path, table, out: Path, s: EvaluateCommand, scored_on: str | None = None,
                         report: bool = True) -> dict:
    """Score the run's model on `table` (default: its own validation split), write the evaluation files and
    (with `report`) a report.html: the run's own (RUN/report.html) when `out` is RUN/eval, else OUT/report.html,
    leaving the run's report alone. metrics.json says what the photos were (`scored_on`) and whether any
    choice of the run looked at them (`selected_on`: 'val' when the run kept its best epoch by these validation
    photos, else null)."""
    from .checkpoint import load_run
    from .metrics import format_metrics, write_metrics
    from .predict import score_table
    from .report import build_report

    run = load_run(run_dir, s.device, s.engine, s.tta, s.threads, s.batch_size)
    selected_on = None
    if table is None:
        from .data import load_split

        table = load_split(run_dir / "split.csv", run.classes).subset("val")
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
    own = Path(out).resolve() == (run_dir / "eval").resolve()
    source = s.data_dir or s.csv
    page = build_report(run_dir, out, None if own or not source else f"pomona run {run_dir.name} on {source}",
                        out=None if own else Path(out) / "report.html")
    print(f"wrote {out}/metrics.json, confusion_matrix.png, predictions.csv and {page}")
    return metrics


def _tune_base(s: TuneCommand) -> Config:
    from .config import TUNE_DEFAULTS

    return merge(Config(), TUNE_DEFAULTS)


def tune(s: TuneCommand) -> int:
    require("pomona tune", "optuna", *{"wandb": ["wandb"], "mlflow": ["mlflow"]}.get(s.tune.tracker, []))
    from .config import load_search_space
    from .report import build_report
    from .tune import format_space, tune as run_tune

    if s.show_space:
        print(format_space(load_search_space(s.tune.space), s.config))
        return 0
    if not s.out:
        raise UsageError("--out RUN_FOLDER is required")
    _check_test_data(s.config)
    study, best = run_tune(s.config, s.tune, s.out)
    if not best:
        print(f"no finished trial yet in study {study.study_name!r}")
        return 0
    print(f"best trial {best['best_trial']}: validation macro-F1 {best['best_val_macro_f1']:.3f} (selected on the "
          f"validation photos: optimistic)  {best['params']}")
    print(f"trials: {best['trials']['complete']} complete, {best['trials']['pruned']} pruned, "
          f"{best['trials']['fail']} failed (and queued again)")
    print(f"wrote {s.out}/best.json, trials.csv, plots/, {build_report(s.out).name}; retrain with: "
          f"pomona train --from-study {s.out} --out RUN")
    if best.get("tracker"):
        print(f"tracker runs: {best['tracker']}")
    if s.config.data.test_data or s.config.data.test_fraction:
        _rescore_best_trial(Path(s.out))
    return 0


def _rescore_best_trial(out: Path) -> None:
    """`tune --test-data/--test-fraction`: retrain the best trial's settings into OUT/best-retrained and score it
    once on the test photos, which no trial saw; the held-out macro-F1 goes into best.json beside the selected one."""
    import json

    from .study import best_config
    from .train import train_and_evaluate

    cfg, _ = best_config(out)
    run_dir = out / "best-retrained"
    print(f"retraining the best trial's settings into {run_dir} to score them on the test photos")
    train_and_evaluate(cfg, run_dir, overwrite=True)
    scoring = EvaluateCommand(run=str(run_dir), device=cfg.device)
    _score_test_set(run_dir, cfg, scoring)
    held = json.loads((run_dir / "test" / "metrics.json").read_text())
    best = json.loads((out / "best.json").read_text())
    best.update(held_out_macro_f1=held["macro_f1"], held_out_macro_f1_ci95=held["macro_f1_ci95"],
                held_out_n=held["n"], held_out_scored_on=held["scored_on"])
    from .atomic import write_json

    write_json(out / "best.json", best)
    print(f"best trial on the test photos: macro-F1 {held['macro_f1']:.3f} (held out: nothing selected on them) vs "
          f"{best['best_val_macro_f1']:.3f} selected on validation")


def _labelled_table(s: InputConfig):
    from .index import index_csv, index_folder

    if s.csv:
        if not s.images:
            raise UsageError("--csv needs --images")
        return index_csv(s.csv, s.images, s.id_column, s.label_column)
    if s.data_dir:
        return index_folder(s.data_dir)
    return None


def evaluate(s: EvaluateCommand) -> int:
    run_dir = Path(s.run)
    _evaluate_and_report(run_dir, _labelled_table(s), Path(s.out) if s.out else run_dir / "eval", s)
    return 0


def _run_folder(path: str) -> Path:
    """RUN of a command line, which must exist (a folder that holds no run is for `checkpoint` to say)."""
    if not Path(path).exists():
        raise UsageError(f"run folder not found: {path}")
    return Path(path)


def report(s: ReportCommand) -> int:
    from .report import build_report

    print(build_report(_run_folder(s.run), s.eval_dir))
    return 0


def predict(s: PredictCommand) -> int:
    from .checkpoint import load_run
    from .index import read_id_csv, resolve_ids
    from .predict import expand_photos, format_predictions, write_predictions, write_submission

    if s.csv:
        if not s.images or not s.out:
            raise UsageError("--csv needs --images and --out")
        df = read_id_csv(s.csv, s.id_column)
        paths = resolve_ids(df, s.images, s.id_column, s.csv)
    else:
        paths = expand_photos(s.files, s.data_dir)  # missing files and empty patterns stop here, before loading
        if not paths:
            raise UsageError("give photos (or quoted patterns such as \"photos/*.jpg\"), --data FOLDER, or --csv "
                             "with --images")
    preds = load_run(s.run, s.device, s.engine, s.tta, s.threads, s.batch_size).predict(paths)
    if preds.bad and all(p in preds.bad for p in preds.paths):  # nothing usable to print or write
        path, why = next(iter(preds.bad.items()))
        raise UsageError(f"none of the {len(preds.paths)} file(s) could be read as a photo, nothing was predicted "
                         f"(e.g. {path}: {why})")
    if s.csv:
        out = write_submission(df[s.id_column], preds.labels, s.out, s.id_column, s.label_column,
                               s.sample_submission)
        print(f"wrote {len(df)} predictions to {out}")
    elif s.out:
        written = write_predictions(preds, s.out, s.format, s.top_k, s.min_confidence)
        print(f"wrote {len(paths)} predictions to {written}")
    else:
        print(format_predictions(preds, s.format, s.top_k, s.min_confidence))
    if s.save_dir:
        from .annotate import save_annotated

        drawn = save_annotated(preds, s.save_dir, s.top_k, s.min_confidence)
        print(f"wrote {len(drawn)} annotated photos to {s.save_dir}", file=sys.stdout if s.out else sys.stderr)
    if preds.bad:
        print(f"{len(preds.bad)} unreadable image(s) got no prediction:", file=sys.stderr)
        for p, why in list(preds.bad.items())[:10]:
            print(f"  {p}: {why}", file=sys.stderr)
    return 0


def export(s: ExportCommand) -> int:
    if s.format == "onnx":
        require("pomona export --format onnx", "onnx", "onnxruntime")
    from .export import export_run

    _run_folder(s.run)  # before export_run creates the output folder

    result = export_run(s.run, s.format, s.out, s.opset, s.tolerance, calibration=s.calibration,
                        parity_data=s.parity_data)
    out = Path(s.out) if s.out else Path(s.run)
    if result.parity is None:
        print(f"wrote {out / result.path}: max |{result.format} - PyTorch| logit difference {result.max_abs_diff:.2e} "
              f"(tolerance {result.tolerance:.0e}; batches {list(result.batch_sizes)}; top class agrees: "
              f"{result.argmax_agree}); classes and preprocessing in {out / 'export.json'}")
        return 0
    p = result.parity
    if p.get("warning"):
        print(f"warning: {p['warning']}", file=sys.stderr)
    what = f"wrote {out / result.path}" if result.path else f"{result.format} (PyTorch, no file)"
    print(f"{what}: parity with fp32 on {p['n']} held-out photos ({p['photos']}): top-1 agreement "
          f"{p['top1_agreement']:.1%}, macro-F1 {p['macro_f1']:.4f} vs {p['macro_f1_fp32']:.4f} "
          f"(difference {p['macro_f1_diff']:+.4f}), max |probability difference| {p['max_prob_diff']:.4f}; "
          + ("passes: `--engine auto` uses it" if result.passed else
             "FAILS the gate (top-1 agreement >= 99%, |macro-F1 difference| <= 0.005): `--engine auto` will not "
             "use it") + f"; recorded in {out / 'export.json'}")
    return 0


def serve(s: ServeCommand) -> int:
    require("pomona serve", "fastapi", "uvicorn", "python_multipart|multipart")  # before the model is loaded
    from .serve import serve as run_server

    run_server(s)
    return 0


def explain(s: ExplainCommand) -> int:
    from .checkpoint import load_run
    from .explain import explain_image, save_overlay
    from .images import load_image

    run = load_run(s.run, "cpu", s.engine, s.tta)
    image = load_image(s.photo)
    result = explain_image(run, image, s.class_name)
    out = save_overlay(image, result, run.preprocessing, s.out or Path(s.photo).stem + "_gradcam.png", s.size)
    top = sorted(zip(run.classes, result.probs), key=lambda t: -t[1])[:3]
    print(f"{s.photo}: " + "  ".join(f"{c} {p:.1%}" for c, p in top))
    print(f"Grad-CAM for {result.class_name} written to {out}")
    return 0


def balance(s: BalanceCommand) -> int:
    from .balance import balance_table

    if s.balance.mode == "off":
        raise UsageError("give --balance target=N, add=N or max")
    table = _labelled_table(s)
    if table is None:
        raise UsageError("give --data FOLDER (one sub-folder per class) or --csv and --images")
    if s.masks:
        if not s.data_dir:
            raise UsageError("--masks works with --data (masks mirror its class folders)")
        table = table.assign(mask=[_find_mask(p, s.data_dir, s.masks) for p in table["path"]])
    result = balance_table(table, s.balance, s.seed, s.out)
    for c, n in result.plan.counts.items():
        print(f"{c:24s} {n:6d} -> {result.plan.after[c]:6d}")
    print(f"generated {len(result.manifest)} images in {result.seconds:.1f} s ({result.images_per_s:.0f} img/s); "
          f"manifest {Path(s.out) / 'manifest.csv'}")
    print("note: these images are copies of their sources; never split a folder holding both, or copies of one "
          "apple land in training and validation (pomona train --balance balances after the split)")
    return 0


def _find_mask(path: str, data_root: str, mask_root: str) -> str:
    """The mask of `data_root/<class>/<name>.*`: `mask_root/<class>/<name>.*` (any image extension)."""
    from .images import IMAGE_EXTENSIONS
    from .index import DataLayoutError

    rel = Path(path).relative_to(Path(data_root))
    for ext in (Path(path).suffix, *IMAGE_EXTENSIONS, ".PNG"):
        candidate = Path(mask_root) / rel.with_suffix(ext)
        if candidate.is_file():
            return str(candidate)
    raise DataLayoutError(f"no mask for {path} in {mask_root} (expected {Path(mask_root) / rel.with_suffix('.*')})")


def doctor(s: DoctorCommand) -> int:
    require("pomona doctor", "cleanlab", "imagehash")
    from .doctor import KINDS, doctor as check_photos
    from .index import index_folder

    table = _labelled_table(s)
    if table is None:
        raise UsageError("give --data FOLDER (one sub-folder per class) or --csv and --images")
    test = index_folder(s.test_data) if s.test_data else None
    if s.run:
        _run_folder(s.run)
    result = check_photos(table, s.out, test, s.run, s.device, s.max_pixels, s.folds, s.seed, s.show,
                          s.keep_features)
    summary, counts = result.summary, result.summary["findings"]
    photos = summary["photos"]
    g = summary["groups"]
    print(f"{photos['data']} photos, {len(summary['classes'])} classes" +
          (f" (and {photos['test']} test photos)" if "test" in photos else "") +
          f": {g['n_groups']} near-duplicate groups (largest {g['largest']}, cut at cosine distance "
          f"{g['threshold']:.3f})")
    print("findings: " + ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k] or k in ("test leak",
                                                                                          "label conflict")))
    for w in summary["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {Path(s.out) / 'report.html'}, issues.csv ({len(result.issues)} rows, worst first), "
          "summary.json and groups.csv")
    return 0


def suggest(s: SuggestCommand) -> int:
    if not s.run or not s.unlabeled:
        raise UsageError("give --run RUN and --unlabeled DIR")
    _run_folder(s.run)
    from .suggest import suggest as rank_photos

    result = rank_photos(s.run, s.unlabeled, s.out, s.n, s.per_group, s.by, s.device, s.engine, s.batch_size)
    groups = result.picked["group"].nunique()
    print(f"{len(result.picked)} photos to label next, from {groups} near-duplicate groups; wrote "
          f"{Path(s.out) / 'suggest.csv'} and suggest.html")
    if result.skipped:
        print(f"{len(result.skipped)} photo(s) left out (unreadable, or labelled photos of the run)")
    return 0


def augment_preview(s: PreviewCommand) -> int:
    from .preview import write_augment_preview

    print(f"wrote {write_augment_preview(s.image, s.out, s.config, n=s.n, seed=s.config.seed, which=s.show)}")
    return 0


def ablate(s: AblateCommand) -> int:
    from .ablate import run_ablation

    run_ablation(s.config, s.out, s)
    print(f"wrote {Path(s.out) / 'results.md'} and results.json")
    return 0


def data_fetch(s: FetchCommand) -> int:
    from .fetch import fetch_dataset

    print(fetch_dataset(s.name, cache_dir=s.cache_dir, url=s.url))
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: its function, the dataclass of its settings, (for commands with a run `Config`) the
    config that a config file and the flags apply to, and whether its --help lists only the basic settings (fields
    with `metadata={"basic": True}` of its own dataclass and of the run's Config; --help-all lists them all)."""

    function: Callable[[Any], int]
    settings: type
    base: Callable[[Any], Config] | None = None
    brief_help: bool = False


COMMANDS: dict[str, Command] = {
    "train": Command(train, TrainCommand, _train_base, brief_help=True),
    "tune": Command(tune, TuneCommand, _tune_base, brief_help=True),
    "evaluate": Command(evaluate, EvaluateCommand),
    "predict": Command(predict, PredictCommand),
    "report": Command(report, ReportCommand),
    "export": Command(export, ExportCommand),
    "serve": Command(serve, ServeCommand),
    "explain": Command(explain, ExplainCommand),
    "balance": Command(balance, BalanceCommand),
    "doctor": Command(doctor, DoctorCommand),
    "suggest": Command(suggest, SuggestCommand),
    "augment-preview": Command(augment_preview, PreviewCommand),
    "ablate": Command(ablate, AblateCommand),
    "data fetch": Command(data_fetch, FetchCommand),
}


# ------------------------------------------------------------------------------------ flags from dataclasses
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _bool_or_list(hint: Any) -> tuple[str, ...]:
    """The choices of a `bool | list[Literal[...]]` setting (train.tta), else ()."""
    args = typing.get_args(hint)
    lists = [a for a in args if typing.get_origin(a) is list and typing.get_args(a)]
    return tuple(choices(typing.get_args(lists[0])[0]) or ()) if bool in args and lists else ()


def _choice_list(items: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated list of `items`; anything else is a usage error naming them."""
    def parse(text: str) -> list[str]:
        values = _comma_list(text)
        unknown = [v for v in values if v not in items]
        if unknown or not values:
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "an empty list"
            raise argparse.ArgumentTypeError(f"{what}: give a comma-separated list of {', '.join(items)}")
        return values

    return parse


def _help(doc: str, f: dataclasses.Field) -> str:
    """The field's docstring and its default, unless the docstring says it or there is none to say."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        value = ",".join(map(str, value)) if isinstance(value, list) else value
    else:
        value = None
    shown = doc if value is None or "default" in doc.lower() else f"{doc} (default: {value})"
    return shown.replace("%", "%%")


_field_docs = functools.cache(field_docs)  # reading the source is most of building the parser

SECTION_TITLES = {"train": "training"}
"""Titles of --help sections that differ from the name of their settings section."""


def _section(parser: argparse.ArgumentParser, name: str, cls: type | None = None):
    """The --help group of the settings section `name` (created on first use, described by its dataclass)."""
    groups = parser.__dict__.setdefault("pomona_groups", {})
    if name not in groups:
        groups[name] = parser.add_argument_group(SECTION_TITLES.get(name, name),
                                                 (cls.__doc__ or "").strip().split("\n\n")[0] if cls else None)
    return groups[name]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip=(), brief: bool = False,
                        in_config: bool = False) -> None:
    """One flag per field of `cls` (dest `prefix + name`), a group per nested dataclass (dest `prefix.name.`), or
    the group a field's `group` metadata names; flags given on the command line are the only ones present in the
    parsed namespace. With `brief` (a command's --help), fields of `cls` itself (prefix '') and of the run's
    Config (`in_config`) that are not marked basic are accepted but not listed."""
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # the sections' groups first, so that --help lists them in field order
        if dataclasses.is_dataclass(hints[f.name]) and f.name not in skip:
            _section(parser, f.name, hints[f.name])
    name = prefix.rstrip(".").split(".")[-1]
    group = _section(parser, name, cls) if prefix else parser
    nested, elsewhere = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hint):
            nested.append((hint, f"{prefix}{f.name}.", f.metadata.get("skip", ())))
            continue
        if f.metadata.get("group", name) != name:
            elsewhere.append(f)
            continue
        _add_flag(group, f, hints[f.name], docs, prefix, brief and (in_config or not prefix))
    for hint, sub_prefix, sub_skip in nested:
        add_dataclass_flags(parser, hint, sub_prefix, sub_skip, brief, in_config or hint is Config)
    for f in elsewhere:  # after the sections: e.g. the run folder's flags come last, seed and device with training
        _add_flag(_section(parser, f.metadata["group"]), f, hints[f.name], docs, prefix,
                  brief and (in_config or not prefix))


def _add_flag(group, f: dataclasses.Field, hint: Any, docs: dict[str, str], prefix: str, brief: bool) -> None:
    """The flag (or positional argument) of one field; with `brief`, a field not marked basic is not listed."""
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    help_text = _help(docs.get(f.name, ""), f)
    if brief and not (f.metadata.get("basic") or f.metadata.get("positional") or required):
        help_text = argparse.SUPPRESS
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    kind = next(a for a in args if a is not type(None)) if optional else hint
    allowed = choices(hint)
    if f.metadata.get("positional"):
        many = typing.get_origin(kind) is list
        extra = {"nargs": "*", "default": [], "metavar": f.name.upper()} if many else {}
        group.add_argument(f.name, help=help_text, choices=[c for c in allowed if c is not None] if allowed
                           else None, **extra)
        return
    options: dict[str, Any] = {"dest": prefix + f.name}
    if required:
        options["required"] = True
    else:
        options["default"] = argparse.SUPPRESS
    listed = _bool_or_list(kind)
    if listed:  # e.g. --tta, --no-tta or --tta identity,hflip,vflip
        options.update(nargs="?", const=True, type=_choice_list(listed), metavar="A,B,...")
        group.add_argument("--no-" + _flag(f.metadata.get("flag", f.name))[2:], dest=prefix + f.name,
                           action="store_const", const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    elif kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif allowed:
        options.update(choices=[c for c in allowed if c is not None],
                       type=type(next(c for c in allowed if c is not None)))
    elif typing.get_origin(kind) is list:
        options.update(type=_comma_list, metavar="A,B,...")
    else:
        options.update(type=_optional(kind) if optional else kind,
                       metavar=f.metadata.get("metavar", kind.__name__.upper()))
    short = [f"-{f.metadata['short']}"] if "short" in f.metadata else []  # e.g. -n for --n
    group.add_argument(*short, _flag(f.metadata.get("flag", f.name)), help=help_text, **options)
    for alias in f.metadata.get("aliases", []):  # accepted, not listed (e.g. the US spelling of colour)
        group.add_argument(_flag(alias), help=argparse.SUPPRESS, **options)


def _has_config(cls: type) -> bool:
    return any(f.name == "config" for f in dataclasses.fields(cls))


DEBUG_HELP = "show the full traceback of an error instead of its one-line message"


class Parser(argparse.ArgumentParser):
    """argparse that takes no abbreviated flags (`--epoch 1` is not `--epochs 1`) and answers a usage error with
    the relevant usage line and one line saying what is wrong (with a suggestion for a near miss), not the whole
    usage of a command with 80 settings. `commands` maps each subcommand ('data fetch') to its parser."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage: {self.usage_line(message)}\n{self.prog}: error: {_did_you_mean(message)}\n")

    def usage_line(self, message: str = "") -> str:
        """`PROG [options]`, the positional and required arguments, and the argument `message` is about."""
        named = re.match(r"argument (\S+): ", message)
        formatter = self._get_formatter()
        parts = []
        for action in self._actions:
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and not action.required and not (named and named.group(1) == name):
                continue
            if not action.option_strings:
                parts.append(formatter._format_args(action, formatter._get_default_metavar_for_positional(action)))
                continue
            text = action.option_strings[0]
            if action.nargs != 0:
                text += " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            parts.append(text if action.required else f"[{text}]")
        return " ".join([self.prog, "[options]", *parts])

    def unknown(self, extras: list[str]) -> NoReturn:
        """Arguments no flag or positional took: the first unknown flag and the nearest real one."""
        flag = next((a.split("=", 1)[0] for a in extras if a.startswith("-") and len(a) > 1), None)
        if flag is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        near = difflib.get_close_matches(flag, known, n=1)
        self.error(f"unknown flag {flag}" + (f": did you mean {near[0]}?" if near else
                                              f" (`{self.prog} --help` lists the flags)"))


def _did_you_mean(message: str) -> str:
    """argparse's message, with the nearest choice added to an invalid one."""
    bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if bad:
        near = difflib.get_close_matches(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)), n=1)
        if near:
            return f"{message}: did you mean '{near[0]}'?"
    return message


class HelpAll(argparse.Action):
    """--help-all: the command's help listing every setting (its --help lists the basic ones)."""

    def __init__(self, option_strings: list[str], dest: str, command: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)
        self.command = command

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        build_parser(brief=False).commands[self.command].print_help()
        parser.exit()


def parse_line(parser: Parser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, with an unknown flag reported by the subcommand's parser (and the nearest real flag)."""
    ns, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands.get(command_name(ns), parser).unknown(extras)
    return ns


def command_name(ns: argparse.Namespace) -> str:
    """The subcommand of a parsed line, as `COMMANDS` names it ('train', 'data fetch')."""
    return (getattr(ns, "command", None) or "") + (f" {ns.subcommand}" if getattr(ns, "subcommand", None) else "")


def build_parser(brief: bool = True) -> Parser:
    """The `pomona` parser; with `brief`, the --help of a command with `brief_help` lists its basic settings only
    (--help-all builds it again without `brief`)."""
    parser = Parser(prog="pomona", description="Train, tune, evaluate and serve EfficientNet "
                    "classifiers for apple varieties. `pomona COMMAND --help` lists its settings.")
    parser.add_argument("--version", action="version", version=f"pomona {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        full = name
        doc = (command.settings.__doc__ or "").strip()
        first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        where = sub
        if " " in name:  # "data fetch": a group of subcommands
            group, name = name.split(" ", 1)
            if group not in groups:
                groups[group] = sub.add_parser(group, help="demo data sets").add_subparsers(
                    dest="subcommand", required=True, metavar="COMMAND")
            where = groups[group]
        short = brief and command.brief_help
        p = where.add_parser(name, help=first, description=" ".join(doc.split()), epilog=(
            f"Only the basic settings are listed: `pomona {full} --help-all` lists every one." if short else None))
        parser.commands[full] = p
        if command.brief_help:
            p.add_argument("--help-all", action=HelpAll, command=full, help="show the help with every setting and exit")
        if _has_config(command.settings):
            p.add_argument("--config", metavar="FILE", help="YAML or JSON file with the settings to change "
                           "(only those; see configs/); flags given here override it")
            p.add_argument("--print-config", nargs="?", const="yaml", choices=["yaml", "json"], metavar="yaml|json",
                           help="print the resolved settings (default format: yaml) and exit, touching nothing")
        add_dataclass_flags(p, command.settings, brief=short)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for section in p._action_groups:  # a section whose flags are all unlisted is left out of --help
            if all(a.help is argparse.SUPPRESS for a in section._group_actions):
                section.description = None
    return parser


# ------------------------------------------------------------------------------------ settings from the flags
@dataclass
class Invocation:
    """A parsed command line: the subcommand, its settings, and --print-config."""

    name: str
    command: Command
    settings: Any
    print_config: str | None = None
    debug: bool = False


def _set_flags(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Apply the flags given (dests `prefix + name`) to a settings dataclass and its nested ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            _set_flags(getattr(obj, f.name), values, f"{prefix}{f.name}.")
        elif prefix + f.name in values:
            set_field(obj, f.name, values[prefix + f.name], prefix)


def parse(argv: list[str] | None = None) -> Invocation:
    """Parse a command line into the settings of its subcommand: defaults (or the command's base config) <- config
    file <- flags. Help, --version and usage errors exit here (status 0, 0 and 2) while argparse reads the line,
    before anything heavy is imported; a bad value in a config file is a usage error too."""
    parser = build_parser()
    ns = parse_line(parser, argv)
    values = vars(ns)
    name = command_name(ns)
    command = COMMANDS[name]
    usage = parser.commands[name]
    cls = command.settings
    top = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    try:
        settings = cls(**top)
        if _has_config(cls):
            overrides = load_overrides(ns.config) if ns.config else {}
            hints = typing.get_type_hints(cls)
            sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])} - {"config"}
            for section in sections & set(overrides):  # e.g. a `tune:` section for `pomona tune`
                for key, value in overrides.pop(section).items():
                    set_field(getattr(settings, section), key, value, f"{section}.")
            base = command.base(settings) if command.base else Config()
            settings.config = merge(base, overrides)
        _set_flags(settings, {k: v for k, v in values.items() if "." in k}, "")
    except (KeyError, ValueError, OSError) as e:
        usage.error(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    except (ImportError, PomonaError) as e:  # e.g. --from-study without optuna: one line, as execute() reports
        if getattr(ns, "debug", False):
            raise
        print(f"pomona {name}: error: {explain_error(e)[0]}", file=sys.stderr)
        sys.exit(2)
    for dotted, f, why in range_problems(settings)[:1]:  # every number within its bounds, before anything is read
        where = _flag(f.metadata.get("flag", f.name)) if dotted in values else \
            dotted.removeprefix("config.") + (f" (in {ns.config})" if getattr(ns, "config", None) else "")
        _refuse(name, f"{where} {why}")
    return Invocation(name, command, settings, getattr(ns, "print_config", None), bool(getattr(ns, "debug", False)))


def _refuse(name: str, message: str) -> NoReturn:
    print(f"pomona {name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_number_flags(ns: argparse.Namespace) -> None:
    """Refuse a number flag outside its bounds as `parse` does, from the command line alone (what `main` checks
    before the re-exec; `parse` checks config files and base configs too)."""
    name = command_name(ns)
    values = vars(ns)

    def check(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                check(hints[f.name], f"{prefix}{f.name}.")
            elif prefix + f.name in values and (why := out_of_range(values[prefix + f.name], f.metadata)):
                _refuse(name, f"{_flag(f.metadata.get('flag', f.name))} {why}, not {values[prefix + f.name]!r}")

    check(COMMANDS[name].settings, "")


def format_config(settings: Any, fmt: str = "yaml") -> str:
    """The resolved settings of a command with a config: the Config (as config.json holds it), plus the other
    sections that a config file may hold (e.g. `tune`)."""
    data = settings.config.to_dict()
    for f in dataclasses.fields(settings):
        if f.name != "config" and dataclasses.is_dataclass(getattr(settings, f.name)):
            data[f.name] = dataclasses.asdict(getattr(settings, f.name))
    if fmt == "json":
        import json

        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False).rstrip()


def execute(invocation: Invocation) -> int:
    """Run a parsed command. An error is one line on stderr (its traceback only with --debug): exit code 2 for the
    user's data, settings and set-up (PomonaError, usage, missing files or optional packages), 1 for the rest."""
    if invocation.print_config:
        print(format_config(invocation.settings, invocation.print_config))
        return 0
    try:
        return invocation.command.function(invocation.settings)
    except Exception as e:
        if invocation.debug:
            raise
        message, code = explain_error(e)
        print(f"pomona {invocation.name}: error: {message}", file=sys.stderr)
        return code


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the subcommand (no re-exec; what tests call)."""
    return execute(parse(argv))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: parse the command line (help, --version and usage errors end here, at once); for a
    real command make sure the malloc setting is in force (re-running this command line once); then resolve the
    settings (config file, base config) and run."""
    from .runtime import reexec_with_malloc_tuning

    ns = parse_line(build_parser(), argv)
    if not getattr(ns, "print_config", None):
        check_number_flags(ns)  # a number out of range ends here, at once, as a usage error does
        reexec_with_malloc_tuning(os.environ)
    sys.exit(execute(parse(argv)))


__all__ = ["main", "run", "parse", "build_parser", "parse_line", "COMMANDS"]
