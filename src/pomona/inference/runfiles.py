"""What a run folder holds: every file and folder that training, evaluation, the test score, the report, export,
cross-validation and self-training write into one, each declared once, as an attribute of `RunFolder`.

    folder = RunFolder("runs/g1")
    folder.split                 # Path("runs/g1/split.csv")
    RunFolder.split.name         # "split.csv" (the declaration)
    folder.read_split()          # its contents (`runfolder.read_split`)

A declaration says whether `pomona train --overwrite` removes the file (an earlier run's file the new run must not
inherit) and whether it marks a folder as a pomona run; `RUN_FILES`, `RUN_MARKERS` and `EXPORT_FILES` are read
from the declarations, so a new file is one line here and nothing can drift. Reading and writing the contents is
`runfolder`'s (run.json, weights, the training state); the `read_*` methods hand over to it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import overload

from ..data.groups import GROUPS_FILE, GROUPS_INFO


class RunFile:
    """One file or folder of a run folder, declared as an attribute of `RunFolder`: on an instance the attribute is
    the path (`RunFolder(d).history`), on the class this declaration (`RunFolder.history.name`)."""

    def __init__(self, name: str, doc: str, *, overwrite: bool = True, marker: bool = False):
        self.name = name
        """The file's name in the run folder."""
        self.doc = doc
        """What it holds."""
        self.overwrite = overwrite
        """`pomona train --overwrite` removes it (see `runfolder.clear_run_folder`)."""
        self.marker = marker
        """It makes a folder a pomona run (a new run there needs --overwrite; see `check_new_run_folder`)."""

    @overload
    def __get__(self, folder: None, owner: type) -> RunFile: ...

    @overload
    def __get__(self, folder: RunFolder, owner: type) -> Path: ...

    def __get__(self, folder, owner=None):
        return self if folder is None else folder.path / self.name

    def __repr__(self) -> str:
        return f"RunFile({self.name!r})"


class RunFolder:
    """The run folder at `path`: each `RunFile` attribute is the path of one of its files (the declarations, in
    `files()`, are what a run writes)."""

    # ------------------------------------------------------------------------ training (`training.train`)
    config = RunFile("config.json", "the full resolved Config", marker=True)
    run_info = RunFile("run.json", "classes, preprocessing, model settings, members, temperature, the kept epoch",
                       marker=True)
    weights = RunFile("model.safetensors", "the kept weights of a one-model run")
    members_dir = RunFile("members", "an ensemble's weights, members/<i>/model.safetensors")
    last = RunFile("last.pt", "the last epoch's full state (model, optimiser, schedule, early stopping), for "
                   "--resume", marker=True)
    probe = RunFile("probe.safetensors", "the weights after the linear probe (head_init='probe')")
    split = RunFile("split.csv", "path, label, group and subset of every photo (the split is never re-drawn)",
                    marker=True)
    groups = RunFile(GROUPS_FILE, "path, label and near-duplicate group of every labelled photo")
    groups_info = RunFile(GROUPS_INFO, "how the near-duplicate groups were found")
    bad_images = RunFile("bad_images.json", "photos skipped as unreadable, with the reason")
    balance = RunFile("balance.json", "with --balance: counts before and after, the cache folder, the time")
    history = RunFile("history.csv", "one row per epoch: losses, validation scores, learning rate, speed")
    val_probs = RunFile("val_probs.npy", "the fast path's validation probabilities of the kept epoch")
    # ------------------------------------------------------------------------ evaluation, report, export
    eval_dir = RunFile("eval", "the evaluation on the validation split (out-of-fold with --folds)")
    report = RunFile("report.html", "the run's report")
    test_dir = RunFile("test", "the once-only score on the test photos")
    export_info = RunFile("export.json", "one entry per exported format: its checks, parity and speed")
    onnx = RunFile("model.onnx", "pomona export --format onnx")
    onnx_int8 = RunFile("model.int8.onnx", "pomona export --format onnx-int8")
    torchscript = RunFile("model.torchscript.pt", "pomona export --format torchscript")
    # ------------------------------------------------------------------------ cross-validation, self-training
    folds_dir = RunFile("folds", "--folds: each fold's run folder, folds/<repeat>-<fold>")
    folds = RunFile("folds.csv", "--folds: path, label, group, repeat and fold of every photo")
    oof = RunFile("oof.csv", "--folds: the out-of-fold predictions")
    cv = RunFile("cv.json", "--folds: the out-of-fold scores, the temperature, per-fold results")
    teacher = RunFile("teacher", "--unlabeled: the teacher's run folder")
    pseudo_labels = RunFile("pseudo_labels.csv", "--unlabeled: the pseudo-labelled photos kept, per round")
    # ------------------------------------------------------------------------ tuning
    confusion_matrix = RunFile("confusion_matrix.png", "a tuning trial's validation confusion matrix",
                               overwrite=False)

    STUDENT = re.compile(r"student-\d+")
    """The folders of a self-trained run's intermediate students (student-1, student-2, ...: one per round);
    `--overwrite` removes them too."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def files(cls) -> tuple[RunFile, ...]:
        """Every declared file and folder, in the order declared."""
        return tuple(v for v in vars(cls).values() if isinstance(v, RunFile))

    def student(self, r: int) -> Path:
        """The folder of the student of self-training round `r` (all but the last, which is the run itself)."""
        return self.path / f"student-{r}"

    def fold(self, repeat: int, fold: int) -> Path:
        """The run folder of fold `fold` of repeat `repeat` of a cross-validation."""
        return self.folds_dir / f"{repeat}-{fold}"

    # ------------------------------------------------------------------------------------------ reading
    def read_run_info(self, check: bool = True) -> dict:
        """run.json (`runfolder.read_run_info`)."""
        from .runfolder import read_run_info

        return read_run_info(self.path, check)

    def read_split(self):
        """split.csv as strings, or None without one (`runfolder.read_split`)."""
        from .runfolder import read_split

        return read_split(self.path)

    def read_export_info(self) -> dict:
        """export.json, or {} when nothing was exported (`runfolder.read_export_info`)."""
        from .runfolder import read_export_info

        return read_export_info(self.path)

    def read_training_state(self) -> dict:
        """last.pt of an interrupted run, checked against run.json (`runfolder.load_resumable_state`)."""
        from .runfolder import load_resumable_state

        return load_resumable_state(self.path)

    def read_bad_images(self) -> dict:
        """bad_images.json, or {} without one."""
        from .runfolder import read_json_file

        return read_json_file(self.bad_images) if self.bad_images.is_file() else {}

    def read_history(self):
        """history.csv as a DataFrame, or None before the first epoch was written."""
        import pandas as pd

        return pd.read_csv(self.history) if self.history.is_file() else None


RUN_FILES = tuple(f.name for f in RunFolder.files() if f.overwrite)
"""What a training run writes (and its evaluation, test score, report and exports): what `--overwrite` removes
(with the student folders, `RUN_FOLDER_PATTERN`)."""
RUN_FOLDER_PATTERN = RunFolder.STUDENT
RUN_MARKERS = tuple(f.name for f in RunFolder.files() if f.marker)
"""Files that make a folder a pomona run folder."""
RUN_INFO, WEIGHTS, TRAINING_STATE = RunFolder.run_info.name, RunFolder.weights.name, RunFolder.last.name
PROBE_WEIGHTS, SPLIT_FILE = RunFolder.probe.name, RunFolder.split.name
EXPORT_INFO, ONNX_FILE = RunFolder.export_info.name, RunFolder.onnx.name
ONNX_INT8_FILE, TORCHSCRIPT_FILE = RunFolder.onnx_int8.name, RunFolder.torchscript.name
EXPORT_FILES = {"onnx": ONNX_FILE, "onnx-int8": ONNX_INT8_FILE, "torchscript": TORCHSCRIPT_FILE,
                "torch-bf16": None}
"""What `pomona export --format F` writes into a run folder (torch-bf16: no file, only its parity in
export.json)."""
