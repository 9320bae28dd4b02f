"""Benchmark: peak memory and speed of training, 5-fold cross-validation, prediction and serving, under each
memory option (malloc settings, allocators, training settings), in one table.

    nice -n 19 python benchmarks/memory.py [--options today,default] [--parts train,folds,predict,serve]
                                           [--repeats 2] [--epochs 1] [--probe-epochs 5] [--out runs/bench-memory]

Parts (each a fresh `python -m pomona ...` process tree, started with the option's environment):
  train    `pomona train --data grocery/train --val-data grocery/val`, the default recipe shortened to --epochs
           and --probe-epochs (peak memory is reached in the first epoch)
  folds    the same with `--folds 5`, over all 300 photos
  predict  `pomona predict` of the first training row's run (engine auto) on 2000 fruits360 frames
  serve    `pomona serve` of that run on 127.0.0.1: RSS once /health answers (idle), then --requests POSTs of
           the grocery photos from 4 client threads; RSS 3 s after the last answer (the server hands freed
           memory back 0.5 s after its last request), and the peak while they ran

An option that sets GLIBC_TUNABLES (even to nothing) stops pomona's own malloc re-exec, so what it names is
what runs; `default` sets nothing: the re-exec in pomona.core.runtime, as a user gets it.

Columns: peak_mb is the largest sum of VmRSS over the process and all its children, sampled every 0.2 s from
/proc (never below the main process's own VmHWM), the largest over an option's runs; img_s is training's
images/s (history.csv, the mean over epochs and folds), or photos (requests) per second of wall time for predict
(serve); cpu_s is the CPU time (user + system) of the whole process tree. The options run interleaved
(A B C A B C) and each option's best img_s and least cpu_s are shown: on a machine shared with other jobs a run
is only ever slowed down, by the load of its moment (its CPU time grows too, with threads spinning while they
wait for each other), so the least disturbed run is the measure. `_vs_ref` compares with the part's first
option.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table  # noqa: E402
from scale import tree_rss_mib  # noqa: E402

from pomona.core.runtime import TCMALLOC_SETTINGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DATA = ROOT.parent / "shared" / "data"
GROCERY = DATA / "grocery-apples"
FRAMES = DATA / "fruits360-apples" / "all"
LIBS = Path("/usr/lib/x86_64-linux-gnu")
BEFORE = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
"""What pomona's re-exec set before this benchmark: thresholds (4 GB, 16 GB) under which nothing is ever
mmap'ed or trimmed."""
MB = 1 << 20


def glibc(mmap_mb: int, trim_mb: int, arenas: int = 0) -> dict:
    tunables = f"glibc.malloc.mmap_threshold={mmap_mb * MB}:glibc.malloc.trim_threshold={trim_mb * MB}"
    return {"GLIBC_TUNABLES": tunables + (f":glibc.malloc.arena_max={arenas}" if arenas else "")}


def preload(library: str) -> dict:
    return {"LD_PRELOAD": str(LIBS / library), "GLIBC_TUNABLES": BEFORE, **TCMALLOC_SETTINGS}


WHOLE = ["--micro-batch", "0"]
OPTIONS: dict[str, tuple[str, dict, list[str]]] = {
    "today": ("glibc mmap 4 GB, trim 16 GB; whole batches (before)", {"GLIBC_TUNABLES": BEFORE}, WHOLE),
    "default": ("pomona's re-exec and defaults as they are now", {}, []),
    "tcmalloc-whole": ("tcmalloc; whole batches", preload("libtcmalloc_minimal.so.4"), WHOLE),
    "today-mb8": ("glibc mmap 4 GB, trim 16 GB; slices of 8", {"GLIBC_TUNABLES": BEFORE}, []),
    "tcmalloc-mb8": ("tcmalloc; slices of 8", preload("libtcmalloc_minimal.so.4"), []),
    "jemalloc-mb8": ("jemalloc; slices of 8", preload("libjemalloc.so.2"), []),
    "glibc-mb8": ("glibc as it comes (no tunables); slices of 8", {"GLIBC_TUNABLES": ""}, []),
    "g256-mb8": ("glibc mmap 256 MB, trim 256 MB; slices of 8", glibc(256, 256), []),
    "g64-mb8": ("glibc mmap 64 MB, trim 1 GB; slices of 8", glibc(64, 1024), []),
    "arena2-mb8": ("glibc mmap 4 GB, trim 16 GB, MALLOC_ARENA_MAX=2; slices of 8",
                   {"GLIBC_TUNABLES": BEFORE, "MALLOC_ARENA_MAX": "2"}, []),
    "cache224": ("defaults + --cache-side 224 (uint8 at the input size, not 2x)", {}, ["--cache-side", "224"]),
    "mb4": ("defaults + slices of 4", {}, ["--micro-batch", "4"]),
    "mb4-cache224": ("defaults + slices of 4 + --cache-side 224", {}, ["--micro-batch", "4", "--cache-side", "224"]),
}
"""name -> (description, environment, extra training flags)."""


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def status_mb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the live process tree of `pid` (from /proc/PID/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def allocator(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "glibc")


class Sampler(threading.Thread):
    """Samples the resident memory of a process tree every `every` seconds: `last`, and `peak` since the last
    `reset()` (the main process's VmHWM counts when the tree is that one process)."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.last = pid, every, 0.0, 0.0
        self.stopped = threading.Event()
        self.allocator, self.began = "", time.monotonic()

    def sample(self) -> float:
        self.last = tree_rss_mib(self.pid)
        if not self.allocator and time.monotonic() - self.began > 5:  # after the re-exec: which malloc is loaded
            self.allocator = allocator(self.pid)
        self.peak = max(self.peak, self.last, status_mb(self.pid, "VmHWM") if len(tree(self.pid)) == 1 else 0)
        return self.last

    def reset(self) -> None:
        self.peak = self.sample()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()


def environment(option: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "POMONA_NO_REEXEC")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env | OPTIONS[option][1]


def pomona(option: str, args: list[str], log: Path) -> dict:
    """Run `python -m pomona ARGS` with `option`'s environment to the end: peak MB, wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pomona", *args], env=environment(option), stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        sampler = Sampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stopped.set()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"pomona {' '.join(args)} failed ({option}):\n{log.read_text()[-3000:]}")
    return {"peak_mb": sampler.peak, "seconds": time.perf_counter() - start, "malloc": sampler.allocator,
            "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def training_speed(run: Path) -> float:
    """Mean training images/s over the epochs of a run, or of every fold of a cross-validation."""
    files = [run / "history.csv"] if (run / "history.csv").exists() else sorted(run.glob("folds/*/history.csv"))
    return float(pd.concat([pd.read_csv(f) for f in files])["train_images_per_s"].mean())


def train(option: str, out: Path, args: argparse.Namespace, folds: int = 0) -> dict:
    run = out / f"{'folds' if folds else 'train'}-{option}"
    flags = ["--folds", str(folds)] if folds else []
    got = pomona(option, ["train", "--data", str(GROCERY / "train"), "--val-data", str(GROCERY / "val"),
                          "--out", str(run), "--overwrite", "--epochs", str(args.epochs), "--probe-epochs",
                          str(args.probe_epochs), *flags, *OPTIONS[option][2]], out / f"{run.name}.log")
    return got | {"img_s": training_speed(run), "run": run}


def predict(option: str, out: Path, run: Path, photos: Path) -> dict:
    got = pomona(option, ["predict", str(run), "--data", str(photos), "--out", str(out / f"predict-{option}.csv")],
                 out / f"predict-{option}.log")
    return got | {"img_s": len(list(photos.iterdir())) / got["seconds"]}


def serve(option: str, out: Path, run: Path, requests_total: int, clients: int = 4) -> dict:
    """Idle RSS, then `requests_total` POSTs of the grocery photos from `clients` threads: RSS after, peak, req/s."""
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    photos = [p.read_bytes() for p in sorted(GROCERY.rglob("*.jpg"))]
    with open(out / f"serve-{option}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pomona", "serve", str(run), "--host", "127.0.0.1",
                                 "--port", str(port)], env=environment(option), stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    sampler = Sampler(proc.pid)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if requests.get(url + "/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pomona serve did not start ({option}): see {log.name}")
            time.sleep(0.5)
        time.sleep(2)
        idle, kind = sampler.sample(), allocator(proc.pid)
        sampler.reset()
        sampler.start()
        cpu = cpu_seconds(proc.pid)

        def one(i: int) -> int:
            files = {"file": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")}
            return requests.post(url + "/predict", files=files, timeout=300).status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            codes = list(pool.map(one, range(requests_total)))
        seconds = time.perf_counter() - start
        cpu = cpu_seconds(proc.pid) - cpu
        time.sleep(3)
        after = sampler.sample()
        sampler.stopped.set()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"idle_mb": idle, "after_mb": after, "peak_mb": sampler.peak, "img_s": requests_total / seconds,
            "malloc": kind,
            "cpu_s": cpu, "seconds": seconds, "errors": sum(c != 200 for c in codes)}


def frames(folder: Path, n: int) -> Path:
    """A flat folder of symlinks to `n` fruits360 frames, spread over every variety."""
    every = sorted(FRAMES.rglob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(every[:: max(1, len(every) // n)][:n]):
        (folder / f"{i:05d}-{p.name}").symlink_to(p)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated names, the reference first: "
                        + ", ".join(OPTIONS))
    parser.add_argument("--parts", default="train,folds,predict,serve")
    parser.add_argument("--fold-options", default=None, help="options of the folds part (default: --options)")
    parser.add_argument("--serve-options", default=None, help="options of predict and serve (default: --options)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the training part")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--probe-epochs", type=int, default=5)
    parser.add_argument("--photos", type=int, default=2000, help="fruits360 frames for predict")
    parser.add_argument("--requests", type=int, default=1000, help="requests to the server")
    parser.add_argument("--run", default=None, help="run folder for predict and serve (default: the first "
                                                    "training row's)")
    parser.add_argument("--out", default="runs/bench-memory")
    parser.add_argument("--from-rows", default=None, help="only print the table of these rows.csv files "
                                                          "(comma-separated: runs of several invocations)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_rows:
        summarize(pd.concat([pd.read_csv(f) for f in args.from_rows.split(",")], ignore_index=True), out)
        return
    options = args.options.split(",")
    parts = args.parts.split(",")
    rows: list[dict] = []
    run = Path(args.run) if args.run else None

    def record(part: str, option: str, got: dict, round_: int) -> None:
        rows.append({"part": part, "option": option, "round": round_, **got})
        print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(out / "rows.csv", index=False)

    fold_options = (args.fold_options or args.options).split(",")
    for part, names, repeats in (("train", options, args.repeats), ("folds", fold_options, 1)):
        if part not in parts:
            continue
        for r in range(repeats):
            for option in names:
                got = train(option, out, args, folds=5 if part == "folds" else 0)
                trained = got.pop("run")
                run = run or trained
                record(part, option, got, r)
    if run is None and {"predict", "serve"} & set(parts):
        raise SystemExit("predict and serve need --run or the train part")
    with tempfile.TemporaryDirectory() as tmp:
        photos = frames(Path(tmp) / "frames", args.photos) if "predict" in parts else None
        for option in (args.serve_options or args.options).split(","):
            if photos is not None:
                record("predict", option, predict(option, out, run, photos), 0)
            if "serve" in parts:
                record("serve", option, serve(option, out, run, args.requests), 0)

    summarize(pd.DataFrame(rows), out)


def summarize(table: pd.DataFrame, out: Path) -> str:
    """One row per part and option: the largest peak (and idle, after) RSS of its runs, its best training img/s
    and least CPU time (the run least disturbed by other jobs), and these against the part's first option."""
    summary = []
    for (part, option), group in table.groupby(["part", "option"], sort=False):
        description, _, flags = OPTIONS[option]
        row = {"part": part, "option": f"{option}: {description}" + "".join(f" {f}" for f in flags),
               "malloc": "/".join(sorted(set(group["malloc"].dropna()))) if "malloc" in group else "",
               "runs": len(group)}
        for c, pick in (("peak_mb", max), ("idle_mb", max), ("after_mb", max), ("img_s", max), ("cpu_s", min)):
            if c in group and group[c].notna().any():
                row[c] = float(pick(group[c].dropna()))
        ref = next(r for r in summary if r["part"] == part) if any(r["part"] == part for r in summary) else row
        row["img_s_vs_ref"], row["cpu_vs_ref"] = row["img_s"] / ref["img_s"], row["cpu_s"] / ref["cpu_s"]
        summary.append(row)
    text = print_table(summary, ["part", "option", "malloc", "runs", "peak_mb", "idle_mb", "after_mb", "img_s",
                                 "img_s_vs_ref", "cpu_s", "cpu_vs_ref"])
    (out / "results.md").write_text(text + "\n")
    return text

if __name__ == "__main__":
    main()
