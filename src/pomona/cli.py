"""The `pomona` command. Each subcommand is one plain function; `train`'s flags come from the Config dataclasses
(their field docstrings are the --help text). This is the only module that knows every other one."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path

from .config import SECTIONS, Config, field_docs, load_overrides, merge

# ----------------------------------------------------------------------------------------------- flag helpers
def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, section: str | None) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(section or "run", (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS:
            continue
        hint = hints[f.name]
        dest = f"{section}.{f.name}" if section else f.name
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if hint is bool:
            group.add_argument(_flag(f), dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        kind = next(a for a in args if a is not type(None)) if optional else hint
        group.add_argument(_flag(f), dest=dest, type=_parse_optional(kind) if optional else kind,
                           default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON file with the settings to change (see configs/)")
    for name, cls in SECTIONS.items():
        _add_dataclass_flags(parser, cls, name)
    _add_dataclass_flags(parser, Config, None)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Defaults <- config file <- flags given on the command line (flags not given are absent from `args`)."""
    cfg = base or Config()
    if getattr(args, "config", None):
        cfg = merge(cfg, load_overrides(args.config))
    overrides: dict = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            if section in SECTIONS:
                overrides.setdefault(section, {})[name] = value
        elif dest in {f.name for f in dataclasses.fields(Config)} and dest not in SECTIONS:
            overrides[dest] = value
    return merge(cfg, overrides)


# ---------------------------------------------------------------------------------------------- subcommands
def train(args: argparse.Namespace) -> int:
    """Train a classifier into a run folder (or continue one with --resume)."""
    from .distributed import init_distributed, shutdown_distributed
    from .train import train_and_evaluate

    if args.resume:
        run_dir = Path(args.resume)
        cfg = Config.load(run_dir / "config.json")
    else:
        if not args.out:
            raise SystemExit("pomona train: --out RUN_FOLDER is required")
        base = None
        if args.from_study:
            from .tune import best_config

            base, best = best_config(args.from_study)
            print(f"retraining trial {best['trial']} of {args.from_study} (macro-F1 {best['val_macro_f1']:.3f}): "
                  f"{best['params']}")
        cfg, run_dir = config_from_args(args, base), Path(args.out)
    dist = init_distributed(os.environ, cfg.device)  # several processes when started by torchrun
    try:
        result = train_and_evaluate(cfg, run_dir, resume=bool(args.resume), dist=dist)
    finally:
        shutdown_distributed(dist)
    if not dist.is_main:
        return 0
    print(f"best validation macro-F1 {result.best_macro_f1:.3f} at epoch {result.best_epoch + 1}; "
          f"{result.seconds:.0f} s; run folder {result.run_dir}")
    if result.bad_images:
        print(f"{len(result.bad_images)} unreadable image(s) skipped, listed in {result.run_dir}/bad_images.json")
    _evaluate_and_report(result.run_dir, None, result.run_dir / "eval", device=cfg.device)
    return 0


def _evaluate_and_report(run: Path, table, out: Path, device: str = "auto", tta: bool | None = None,
                         engine: str = "auto", threads: int | None = None) -> dict:
    """Score the run's best model on `table` (default: its own validation split), write eval files and
    the run's report.html."""
    from .data import load_split
    from .evaluate import format_report, write_report
    from .predict import Predictor
    from .report import build_report

    if table is None:
        info = json.loads((run / "run.json").read_text())
        table = load_split(run / "split.csv", info["classes"]).subset("val")
    metrics, frame = Predictor(run, device=device, tta=tta, engine=engine, threads=threads).evaluate(table)
    write_report(metrics, out, frame)
    print(format_report(metrics))
    if metrics["skipped_images"]:
        print(f"{len(metrics['skipped_images'])} unreadable image(s) skipped")
    report = build_report(run, out)
    print(f"wrote {out}/metrics.json, confusion_matrix.png, predictions.csv and {report}")
    return metrics


# `pomona tune` starts from the original system's recipe: a frozen backbone, 4 epochs per trial.
TUNE_DEFAULTS = {"model": {"freeze_backbone": True}, "train": {"epochs": 4}}


def tune(args: argparse.Namespace) -> int:
    """Search training settings with Optuna (resumable; many machines share a study through --storage)."""
    from .config import TuneConfig, load_search_space
    from .tune import format_space, tune as run_tune

    cfg = config_from_args(args, merge(Config(), TUNE_DEFAULTS))
    tcfg = TuneConfig(**{k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("tune.")})
    if args.show_space:
        print(format_space(load_search_space(tcfg.space), cfg))
        return 0
    if not args.out:
        raise SystemExit("pomona tune: --out RUN_FOLDER is required")
    study, best = run_tune(cfg, tcfg, args.out)
    if not best:
        print(f"no finished trial yet in study {study.study_name!r}")
        return 0
    print(f"best trial {best['best_trial']}: validation macro-F1 {best['best_val_macro_f1']:.3f}  {best['params']}")
    print(f"trials: {best['trials']['complete']} complete, {best['trials']['pruned']} pruned, "
          f"{best['trials']['fail']} failed (and queued again)")
    print(f"wrote {args.out}/best.json, trials.csv, plots/; retrain with: "
          f"pomona train --from-study {args.out} --out RUN")
    if best.get("tracker"):
        print(f"tracker runs: {best['tracker']}")
    return 0


def _labelled_table(args: argparse.Namespace):
    from .index import index_csv, index_folder

    if args.csv:
        if not args.images:
            raise SystemExit("--csv needs --images")
        return index_csv(args.csv, args.images, args.id_column, args.label_column)
    if args.data:
        return index_folder(args.data)
    return None


def evaluate(args: argparse.Namespace) -> int:
    """Score a run on a labelled folder or CSV: metrics.json, confusion_matrix.png, predictions.csv."""
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "eval"
    _evaluate_and_report(run, _labelled_table(args), out, device=args.device, tta=args.tta, engine=args.engine,
                         threads=args.threads)
    return 0


def report(args: argparse.Namespace) -> int:
    """(Re)write RUN/report.html from the run folder and its evaluation."""
    from .report import build_report

    print(build_report(args.run, args.eval_dir))
    return 0


def predict(args: argparse.Namespace) -> int:
    """Predict varieties: a submission CSV for --csv/--images or --data, or the top-k of each photo given."""
    from .index import IMAGE_EXTENSIONS, read_id_csv, resolve_ids
    from .predict import Predictor, write_submission

    predictor = Predictor(args.run, device=args.device, tta=args.tta, engine=args.engine, threads=args.threads)
    if args.csv:
        if not args.images or not args.out:
            raise SystemExit("pomona predict --csv needs --images and --out")
        df = read_id_csv(args.csv, args.id_column)
        preds = predictor.predict(resolve_ids(df, args.images, args.id_column, args.csv))
        out = write_submission(df[args.id_column], preds.labels, args.out, args.id_column, args.label_column,
                               args.sample_submission)
        print(f"wrote {len(df)} predictions to {out}")
    else:
        paths = [Path(p) for p in args.files]
        if args.data:
            paths += sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise SystemExit("pomona predict: give photos, --data FOLDER, or --csv with --images")
        preds = predictor.predict(paths)
        if args.out:
            preds.to_frame(args.top_k).to_csv(args.out, index=False)
            print(f"wrote {len(paths)} predictions to {args.out}")
        else:
            for path, top in zip(preds.paths, preds.top_k(args.top_k)):
                shown = "  ".join(f"{c} {p:.1%}" for c, p in top) if top else f"unreadable: {preds.bad[path]}"
                print(f"{path}: {shown}")
    if preds.bad:
        print(f"{len(preds.bad)} unreadable image(s) got no prediction:", file=sys.stderr)
        for p, why in list(preds.bad.items())[:10]:
            print(f"  {p}: {why}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    """Export a run's model to ONNX or TorchScript, checked against PyTorch (max |logit difference|)."""
    from .export import export_run

    result = export_run(args.run, args.format, args.out, args.opset, args.tolerance)
    out = Path(args.out) if args.out else Path(args.run)
    print(f"wrote {out / result.path}: max |{result.format} - PyTorch| logit difference {result.max_abs_diff:.2e} "
          f"(tolerance {result.tolerance:.0e}; batches {list(result.batch_sizes)}; top class agrees: "
          f"{result.argmax_agree}); classes and preprocessing in {out / 'export.json'}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serve a run: a web page at /, JSON at POST /predict, Grad-CAM at POST /explain, GET /health."""
    from .serve import ServeSettings, serve as run_server

    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    run_server(args.run, ServeSettings(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def explain(args: argparse.Namespace) -> int:
    """Grad-CAM overlay of a photo: where the model looked for the variety it predicts (or --class)."""
    from .datasets import Preprocessing
    from .explain import explain_image, save_overlay
    from .images import load_image
    from .train import load_run

    model, info = load_run(args.run, "cpu")
    pre = Preprocessing.from_dict(info["preprocessing"])
    image = load_image(args.photo)
    result = explain_image(model, image, pre, info["classes"], args.class_name)
    out = save_overlay(image, result.cam, pre, args.out or Path(args.photo).stem + "_gradcam.png", args.size)
    top = sorted(zip(info["classes"], result.probs), key=lambda t: -t[1])[:3]
    print(f"{args.photo}: " + "  ".join(f"{c} {p:.1%}" for c, p in top))
    print(f"Grad-CAM for {result.class_name} written to {out}")
    return 0


def balance(args: argparse.Namespace) -> int:
    """Generate Augmentor images that balance a labelled folder: images + manifest.csv in --out (only the
    generated images; to balance inside training, after the split, use `pomona train --balance`)."""
    from .balance import balance_table
    from .config import BalanceConfig
    from .index import index_folder

    modes = [m for m in (f"target={args.target}" if args.target is not None else None,
                         f"add={args.per_class.lstrip('+')}" if args.per_class else None,
                         "max" if args.to_max else None) if m]
    if len(modes) != 1:
        raise SystemExit("pomona balance: give exactly one of --target N, --per-class +N, --to-max")
    table = _labelled_table(args)
    if table is None:
        raise SystemExit("pomona balance: give --data FOLDER (one sub-folder per class) or --csv and --images")
    if args.masks:
        if not args.data:
            raise SystemExit("pomona balance: --masks works with --data (masks mirror its class folders)")
        table = table.assign(mask=[_find_mask(p, args.data, args.masks) for p in table["path"]])
    cfg = BalanceConfig(mode=modes[0], classes=args.classes, allow_colour=args.allow_colour,
                        image_format=args.format)
    if args.ops:
        cfg.operations = args.ops
    result = balance_table(table, cfg, args.seed, args.out)
    for c, n in result.plan.counts.items():
        print(f"{c:24s} {n:6d} -> {result.plan.after[c]:6d}")
    print(f"generated {len(result.manifest)} images in {result.seconds:.1f} s ({result.images_per_s:.0f} img/s); "
          f"manifest {Path(args.out) / 'manifest.csv'}")
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


def augment_preview(args: argparse.Namespace) -> int:
    """Write a PNG grid of one photo under the online augmentation and the Augmentor balancing operations."""
    from .preview import write_augment_preview

    cfg = config_from_args(args)
    out = write_augment_preview(args.image, args.out, cfg, n=args.n, seed=cfg.seed, which=args.show)
    print(f"wrote {out}")
    return 0


def ablate(args: argparse.Namespace) -> int:
    """Train without balancing, with Augmentor balancing, class weights and a weighted sampler on the same split
    and seeds; write results.md and results.json (macro-F1 with bootstrap CIs, minority-class F1, time)."""
    from .ablate import AblationSettings, run_ablation

    cfg = config_from_args(args)
    settings = AblationSettings(arms=args.arms.split(","), seeds=args.seeds, imbalance=args.imbalance,
                                minority=args.minority.split(",") if args.minority else None,
                                n_minority=args.n_minority, balance_mode=args.balance_mode,
                                val_every_nth=args.val_every_nth)
    run_ablation(cfg, args.out, settings)
    print(f"wrote {Path(args.out) / 'results.md'} and results.json")
    return 0


def data_fetch(args: argparse.Namespace) -> int:
    """Download a public demo data set into the cache and print its path."""
    from .fetch import fetch_dataset

    print(fetch_dataset(args.name, cache_dir=args.cache_dir, url=args.url))
    return 0


# ------------------------------------------------------------------------------------------------- parser
def _add_layout_flags(p: argparse.ArgumentParser, labelled: bool) -> None:
    p.add_argument("--data", help="folder of photos" + (" (one sub-folder per class)" if labelled else ""))
    p.add_argument("--csv", help="CSV of image ids" + (" and labels" if labelled else " (e.g. test.csv)"))
    p.add_argument("--images", help="folder holding the images named in --csv")
    p.add_argument("--id-column", default="img_id", help="CSV id column (default: img_id)")
    p.add_argument("--label-column", default="label", help="CSV label column (default: label)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the left-right flip (default: as the run was trained)")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"],
                   help="auto = ONNX Runtime when the run has an up-to-date model.onnx (pomona export), else PyTorch")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pomona", description="Apple-variety classifiers on EfficientNet.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run in RUN from its last epoch")
    p.add_argument("--from-study", metavar="TUNE_RUN",
                   help="start from the best trial's settings of a `pomona tune` folder (flags still override)")
    add_config_flags(p)
    p.set_defaults(func=train)

    p = sub.add_parser("tune", help=tune.__doc__, description=tune.__doc__ + " Defaults differ from `train` in "
                       "two settings: --freeze-backbone and --epochs 4 (the original system's trials).")
    p.add_argument("--out", help="run folder (holds the SQLite study, features, trials, tracker runs, results)")
    p.add_argument("--show-space", action="store_true", help="print the search space and exit")
    add_config_flags(p)
    from .config import TuneConfig

    _add_dataclass_flags(p, TuneConfig, "tune")
    p.set_defaults(func=tune)

    p = sub.add_parser("evaluate", help=evaluate.__doc__, description=evaluate.__doc__)
    p.add_argument("run", help="run folder")
    _add_layout_flags(p, labelled=True)
    p.add_argument("--out", help="output folder (default: RUN/eval)")
    p.set_defaults(func=evaluate)

    p = sub.add_parser("predict", help=predict.__doc__, description=predict.__doc__)
    p.add_argument("run", help="run folder")
    p.add_argument("files", nargs="*", help="photos to classify")
    _add_layout_flags(p, labelled=False)
    p.add_argument("--out", help="CSV to write (a submission with --csv)")
    p.add_argument("--sample-submission", help="take the submission header from this CSV")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per photo (default: 3)")
    p.set_defaults(func=predict)

    p = sub.add_parser("report", help=report.__doc__, description=report.__doc__)
    p.add_argument("run", help="run folder")
    p.add_argument("--eval-dir", help="evaluation folder to show (default: RUN/eval)")
    p.set_defaults(func=report)

    p = sub.add_parser("export", help=export.__doc__, description=export.__doc__)
    p.add_argument("run", help="run folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="default: onnx")
    p.add_argument("--out", help="folder for the exported model (default: the run folder)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted |exported - PyTorch| logit difference (default: 1e-3)")
    p.set_defaults(func=export)

    from .serve import ServeSettings

    p = sub.add_parser("serve", help=serve.__doc__, description=serve.__doc__)
    p.add_argument("run", help="run folder")
    _add_dataclass_flags(p, ServeSettings, None)
    p.set_defaults(func=serve)

    p = sub.add_parser("explain", help=explain.__doc__, description=explain.__doc__)
    p.add_argument("run", help="run folder")
    p.add_argument("photo", help="the photo to explain")
    p.add_argument("--out", help="PNG to write (default: PHOTO_gradcam.png in the current folder)")
    p.add_argument("--class", dest="class_name", help="explain this class instead of the predicted one")
    p.add_argument("--size", type=int, default=448, help="side of the overlay image in pixels (default: 448)")
    p.set_defaults(func=explain)

    p = sub.add_parser("balance", help=balance.__doc__, description=balance.__doc__)
    _add_layout_flags(p, labelled=True)
    p.add_argument("--out", required=True, help="output folder (images in <class>/ sub-folders, manifest.csv)")
    p.add_argument("--target", type=int, help="bring every class to N images")
    p.add_argument("--per-class", metavar="+N", help="add N images to every class")
    p.add_argument("--to-max", action="store_true", help="bring every class to the largest class's count")
    p.add_argument("--classes", help="comma-separated classes to balance (default: all)")
    p.add_argument("--ops", help="Augmentor operations 'name:probability:args,...' (default: flips, rotate90/270, "
                                 "random_distortion:0.8:4:4:8)")
    p.add_argument("--allow-colour", action="store_true", help="allow colour-changing operations")
    p.add_argument("--masks", help="folder of masks mirroring --data (same class/name): transformed with "
                                   "their images (Augmentor.DataPipeline), written under OUT/masks/")
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="file format (default: png)")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed, same files)")
    p.set_defaults(func=balance)

    p = sub.add_parser("augment-preview", help=augment_preview.__doc__, description=augment_preview.__doc__)
    p.add_argument("image", help="a photo")
    p.add_argument("--out", default="augment_preview.png", help="PNG to write (default: augment_preview.png)")
    p.add_argument("--n", type=int, default=11, help="augmented samples per pipeline (default: 11)")
    p.add_argument("--show", default="both", choices=["online", "balance", "both"], help="which pipelines")
    add_config_flags(p)
    p.set_defaults(func=augment_preview)

    p = sub.add_parser("ablate", help=ablate.__doc__, description=ablate.__doc__)
    p.add_argument("--out", required=True, help="folder for the runs and results.md/results.json")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default: 3)")
    p.add_argument("--imbalance", type=float, help="keep only this fraction of the minority classes' training "
                                                   "images, e.g. 0.2 (default: data as it is)")
    p.add_argument("--minority", help="comma-separated classes to cut (default: the --n-minority smallest)")
    p.add_argument("--n-minority", type=int, default=2, help="classes to cut (default: 2)")
    p.add_argument("--arms", default="none,augmentor,class_weights,sampler,none_matched",
                   help="arms to compare (none_matched: plain training with as many steps as augmentor)")
    p.add_argument("--balance-mode", default="max", help="balancing of the augmentor arm (default: max)")
    p.add_argument("--val-every-nth", type=int, default=1, help="score every Nth validation frame per group")
    add_config_flags(p)
    p.set_defaults(func=ablate)

    p = sub.add_parser("data", help="demo data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help=data_fetch.__doc__, description=data_fetch.__doc__)
    f.add_argument("name", choices=["grocery-apples"])
    f.add_argument("--cache-dir", help="where to keep it (default: ~/.cache/pomona)")
    f.add_argument("--url", help="archive URL (default: the public GroceryStoreDataset archive)")
    f.set_defaults(func=data_fetch)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the subcommand (no re-exec; what tests call)."""
    from .balance import BalanceError
    from .engine import EngineError
    from .explain import ExplainError
    from .export import ExportError
    from .images import BadImageError
    from .index import DataLayoutError
    from .model import WeightsError
    from .train import TooManyBadImages

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataLayoutError, WeightsError, TooManyBadImages, BalanceError, FileNotFoundError, KeyError, EngineError,
            ExportError, ExplainError, BadImageError) as e:
        print(f"pomona {args.command}: error: {e}", file=sys.stderr)
        return 2


def main() -> None:
    """Console entry point: make sure the malloc setting is in force, then run."""
    from .runtime import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()
    sys.exit(run())


__all__ = ["main", "run", "build_parser", "config_from_args"]
