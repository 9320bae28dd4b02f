"""The `pomona` command: a table of subcommands (`COMMANDS`), each one plain function taking one settings dataclass
from `pomona.config`, whose fields are its flags (their docstrings the --help text, `Literal[...]` types the
accepted choices, checked while parsing; the flags are made in `pomona.cli.args`). A subcommand checks what only the
command line can get wrong, calls one library function (the run workflows are `pomona.workflows`') and prints.

This is the only module that knows every other one, and it imports them inside the subcommands: `pomona --help`,
`pomona SUB --help`, `--version` and usage errors answer at once, without PyTorch. The malloc re-exec
(`pomona.core.runtime`) happens after parsing, only when a real command runs. Settings resolve as
defaults <- config file (`--config x.yaml|x.json`) <- flags; `--print-config` shows the result and exits.

Errors are one line on stderr, never a traceback (unless `--debug`): pomona's own errors (`PomonaError`: bad data,
a damaged run folder, a missing optional package with the pip command that installs it, ...) and usage errors
exit with 2, anything unexpected with 1 (`errors.explain_error`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import __version__
from ..config import TRACKER_PACKAGES, Config, InputConfig, apply_size, merge
from ..config.commands import (AblateCommand, BalanceCommand, DoctorCommand, EvaluateCommand, ExplainCommand,
                               ExportCommand, FetchCommand, PredictCommand, PreviewCommand, ReportCommand,
                               ServeCommand, SuggestCommand, TrainCommand, TuneCommand)
from ..core.errors import UsageError, explain_error, require
from . import args
from .args import Command, Invocation, Parser, check_number_flags, format_config, parse_line


# ---------------------------------------------------------------------------------------------- subcommands
def train(s: TrainCommand) -> int:
    from ..workflows import train_run

    if s.size:
        if s.resume:
            raise UsageError("--resume continues a run with its own model; drop --size")
        s.config = apply_size(s.config, s.size)
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
    train_run(s.config, run_dir, s.overwrite, bool(s.resume), s.folds, s.repeats, env=os.environ)
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
        from ..tuning.study import best_config

        if not Path(s.from_study).exists():
            raise UsageError(f"tuning folder not found: {s.from_study}")

        base, best = best_config(s.from_study)
        print(f"retraining trial {best['trial']} of {s.from_study} (macro-F1 {best['val_macro_f1']:.3f}): "
              f"{best['params']}", file=sys.stderr)
        return base
    return Config()


def _tune_base(s: TuneCommand) -> Config:
    from ..config import TUNE_DEFAULTS

    return merge(Config(), TUNE_DEFAULTS)


def tune(s: TuneCommand) -> int:
    require("pomona tune", "optuna", *TRACKER_PACKAGES.get(s.tune.tracker, ()))
    from ..config import load_search_space
    from ..tuning.tune import format_space
    from ..workflows import tune_run

    if s.show_space:
        print(format_space(load_search_space(s.tune.space), s.config))
        return 0
    if not s.out:
        raise UsageError("--out RUN_FOLDER is required")
    tune_run(s.config, s.tune, s.out)
    return 0


def _labelled_table(s: InputConfig):
    from ..data.index import index_csv, index_folder

    if s.csv:
        if not s.images:
            raise UsageError("--csv needs --images")
        return index_csv(s.csv, s.images, s.id_column, s.label_column)
    if s.data_dir:
        return index_folder(s.data_dir)
    return None


def evaluate(s: EvaluateCommand) -> int:
    from ..workflows import evaluate_run

    evaluate_run(s.run, _labelled_table(s), s.out, s)
    return 0


def _run_folder(path: str) -> Path:
    """RUN of a command line, which must exist (a folder that holds no run is for `inference.runfolder` to say)."""
    if not Path(path).exists():
        raise UsageError(f"run folder not found: {path}")
    return Path(path)


def report(s: ReportCommand) -> int:
    from ..reporting.report import build_report

    print(build_report(_run_folder(s.run), s.eval_dir))
    return 0


def predict(s: PredictCommand) -> int:
    from ..data.index import read_id_csv, resolve_ids
    from ..inference.loaded import load_run
    from ..inference.predict import expand_photos, format_predictions, write_predictions, write_submission

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
        from ..reporting.annotate import save_annotated

        drawn = save_annotated(preds, s.save_dir, s.top_k, s.min_confidence)
        print(f"wrote {len(drawn)} annotated photos to {s.save_dir}", file=sys.stdout if s.out else sys.stderr)
    if preds.bad:
        print(f"{len(preds.bad)} unreadable image(s) got no prediction:", file=sys.stderr)
        for p, why in list(preds.bad.items())[:10]:
            print(f"  {p}: {why}", file=sys.stderr)
    return 0


def export(s: ExportCommand) -> int:
    if s.format in ("onnx", "onnx-int8", "auto"):
        require("pomona export" + (f" --format {s.format}" if s.format != "auto" else ""), "onnx", "onnxruntime")
    from ..inference.export import describe_export, export_auto, export_run

    _run_folder(s.run)  # before export_run creates the output folder
    options = dict(out=s.out, opset=s.opset, tolerance=s.tolerance, calibration=s.calibration,
                   parity_data=s.parity_data)
    results = export_auto(s.run, **options) if s.format == "auto" else [export_run(s.run, s.format, **options)]
    for result in results:
        if (result.parity or {}).get("warning"):
            print(f"warning: {result.parity['warning']}", file=sys.stderr)
        print(describe_export(result, Path(s.out or s.run), chosen=s.format == "auto" and result is results[-1]))
    return 0


def serve(s: ServeCommand) -> int:
    require("pomona serve", "fastapi", "uvicorn", "python_multipart|multipart")  # before the model is loaded
    from ..serving.serve import serve as run_server

    run_server(s)
    return 0


def explain(s: ExplainCommand) -> int:
    from ..data.images import load_image
    from ..inference.loaded import load_run
    from ..reporting.explain import explain_image, save_overlay

    run = load_run(s.run, "cpu", s.engine, s.tta)
    image = load_image(s.photo)
    result = explain_image(run, image, s.class_name)
    out = save_overlay(image, result, run.preprocessing, s.out or Path(s.photo).stem + "_gradcam.png", s.size)
    top = sorted(zip(run.classes, result.probs), key=lambda t: -t[1])[:3]
    print(f"{s.photo}: " + "  ".join(f"{c} {p:.1%}" for c, p in top))
    print(f"Grad-CAM for {result.class_name} written to {out}")
    return 0


def balance(s: BalanceCommand) -> int:
    from ..data.balance import balance_table

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
    from ..data.images import IMAGE_EXTENSIONS
    from ..data.index import DataLayoutError

    rel = Path(path).relative_to(Path(data_root))
    for ext in (Path(path).suffix, *IMAGE_EXTENSIONS, ".PNG"):
        candidate = Path(mask_root) / rel.with_suffix(ext)
        if candidate.is_file():
            return str(candidate)
    raise DataLayoutError(f"no mask for {path} in {mask_root} (expected {Path(mask_root) / rel.with_suffix('.*')})")


def doctor(s: DoctorCommand) -> int:
    require("pomona doctor", "cleanlab", "imagehash")
    from ..curation.doctor import KINDS, doctor as check_photos
    from ..data.index import index_folder

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
    from ..curation.suggest import suggest as rank_photos

    result = rank_photos(s.run, s.unlabeled, s.out, s.n, s.per_group, s.by, s.device, s.engine, s.batch_size)
    groups = result.picked["group"].nunique()
    print(f"{len(result.picked)} photos to label next, from {groups} near-duplicate groups; wrote "
          f"{Path(s.out) / 'suggest.csv'} and suggest.html")
    if result.skipped:
        print(f"{len(result.skipped)} photo(s) left out (unreadable, or labelled photos of the run)")
    return 0


def augment_preview(s: PreviewCommand) -> int:
    from ..tools.preview import write_augment_preview

    print(f"wrote {write_augment_preview(s.image, s.out, s.config, n=s.n, seed=s.config.seed, which=s.show)}")
    return 0


def ablate(s: AblateCommand) -> int:
    from ..tools.ablate import run_ablation

    run_ablation(s.config, s.out, s)
    print(f"wrote {Path(s.out) / 'results.md'} and results.json")
    return 0


def data_fetch(s: FetchCommand) -> int:
    from ..tools.fetch import fetch_dataset

    print(fetch_dataset(s.name, cache_dir=s.cache_dir, url=s.url))
    return 0


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


def build_parser(brief: bool = True) -> Parser:
    """The `pomona` parser of `COMMANDS`; with `brief`, the --help of a command with `brief_help` lists its basic
    settings only (--help-all builds it again without `brief`)."""
    return args.build_parser(COMMANDS, __version__, brief)


def parse(argv: list[str] | None = None) -> Invocation:
    """Parse a command line into the settings of its subcommand (`args.parse`); help, --version and usage errors
    exit here."""
    return args.parse(build_parser(), COMMANDS, argv)


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
    from ..core.runtime import reexec_with_malloc_tuning

    ns = parse_line(build_parser(), argv)
    if not getattr(ns, "print_config", None):
        check_number_flags(ns, COMMANDS)  # a number out of range ends here, at once, as a usage error does
        reexec_with_malloc_tuning(os.environ, tcmalloc=getattr(ns, "command", None) != "serve")
    sys.exit(execute(parse(argv)))


__all__ = ["main", "run", "parse", "build_parser", "parse_line", "COMMANDS", "Command", "UsageError",
           "config_differences", "format_config"]
