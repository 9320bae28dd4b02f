"""Benchmark: CPU inference of one trained run, every way pomona can run it, on the same photos, in one run.

    python benchmarks/inference.py [--run runs/g1] [--images ../shared/data/grocery-apples] [--n 128] [--repeats 3]

Without --run, a run is trained first (a frozen backbone on grocery-apples/train at the default image size, a
minute or two on 2 cores); the run is then exported to every CPU format it lacks (onnx, onnx-int8, torch-bf16),
which records the parity of the low-precision engines with fp32 on the run's held-out photos.

Rows (left-right flip TTA off everywhere, so every row does the same work per photo), at the run's own size:
  eager PyTorch, default   a fresh process WITHOUT the GLIBC_TUNABLES malloc setting (POMONA_NO_REEXEC=1),
                           model.eval() + torch.inference_mode() on NCHW tensors: what a plain script does
  PyTorch, tuned           malloc thresholds raised (pomona.runtime) + channels_last, as `predict --engine torch`
  PyTorch bf16             the same under torch.autocast("cpu", bfloat16) (`--engine torch-bf16`)
  ONNX Runtime, bare       a default InferenceSession on the run's model.onnx (the same graph pomona uses)
  pomona OnnxEngine        pomona's engine on the same preprocessed arrays (fp32 model.onnx; int8 model.int8.onnx)
  ONNX Runtime, bare + plain decode loop   files -> probabilities the plain way: decode the photos of a batch
                           one after the other (pomona's resize/crop/normalise), then one bare session call
  predict --engine E       `load_run(run, engine=E).predict(paths)`: JPEG decoding + preprocessing in threads +
                           the engine, from files to probabilities (what `pomona predict` does); `auto` is what
                           `pomona predict` picks by itself (named in the table)
  serve /predict           `pomona serve` over HTTP from localhost (--engine auto): C concurrent clients

Every row runs in its own subprocess (so the malloc setting is per row, and no row warms another's caches), and
every row is measured --repeats times, the rows interleaved (so a burst of load from other jobs on the machine
hits every row alike): img/s is the median over the repeats, p50/p95 the latency of one call (ms) pooled over
them. Model rows time the model on tensors already preprocessed (the same array for every row); batch 1 = one
photo per call, batch 32 = 32 per call. The parity table is export.json's: each low-precision engine against
PyTorch fp32 on the run's held-out photos, and whether it passes the gate of `--engine auto`.
Targets: `pomona predict` >= 7x eager default throughput; OnnxEngine >= 90% of bare ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from common import print_table  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-apples"
FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "fruits360-apples" / "all"
BATCH = 32
LOW_PRECISION = ("onnx-int8", "torch-bf16")


# ------------------------------------------------------------------------------------------- worker side
def _time_calls(fn, batches: list, warmup: int = 2) -> list[float]:
    for b in batches[:warmup]:
        fn(b)
    times = []
    for b in batches:
        start = time.perf_counter()
        fn(b)
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float], per_call: int) -> dict:
    t = np.asarray(times)
    return {"img_s": per_call * len(t) / t.sum(), "p50_ms": 1000 * float(np.percentile(t, 50)),
            "p95_ms": 1000 * float(np.percentile(t, 95)), "calls": len(t), "times": [float(v) for v in t]}


def combine(runs: list[dict]) -> dict:
    """Repeats of one row: img/s = the median over the repeats, p50/p95 over every call of every repeat."""
    out = {}
    for b in ("b1", "b32"):
        times = np.concatenate([r[b]["times"] for r in runs])
        out[b] = {"img_s": float(np.median([r[b]["img_s"] for r in runs])),
                  "img_s_repeats": [r[b]["img_s"] for r in runs],
                  "p50_ms": 1000 * float(np.percentile(times, 50)), "p95_ms": 1000 * float(np.percentile(times, 95))}
    out["engine"] = runs[0].get("engine")
    return out


def measure_model(fn, x: np.ndarray, single: int) -> dict:
    """batch 1 over the first `single` photos, batch 32 over all (twice)."""
    ones = [x[i:i + 1] for i in range(single)]
    batches = [x[i:i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)] * 2
    return {"b1": _summary(_time_calls(fn, ones), 1), "b32": _summary(_time_calls(fn, batches), BATCH)}


def worker(kind: str, run_dir: Path, array: Path, paths_file: Path, single: int) -> dict:
    x = np.load(array) if array.suffix == ".npy" and array.is_file() else None
    if kind in ("torch-default", "torch-tuned", "torch-bf16"):
        import torch

        from pomona.inference.loaded import load_run

        model = load_run(run_dir, "cpu", engine="torch").model
        channels_last = kind != "torch-default"
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def fn(batch):
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=kind == "torch-bf16"):
                t = torch.from_numpy(batch)
                if channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
                return model(t).float().softmax(-1).numpy()

        result = measure_model(fn, x, single)
        result["threads"] = torch.get_num_threads()
    elif kind == "ort-bare":
        import onnxruntime as ort

        session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        result = measure_model(lambda b: session.run(None, {name: b})[0], x, single)
    elif kind == "ort-bare-files":
        import onnxruntime as ort
        import torch

        from pomona.data.images import load_image
        from pomona.data.preprocessing import Preprocessing, create_eval_transform, create_resize

        session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        pre = Preprocessing.from_dict(json.loads((run_dir / "run.json").read_text())["preprocessing"])
        resize, to_input = create_resize(pre), create_eval_transform(pre)

        def fn(chunk):  # decode one after the other, then run: the plain script
            x = torch.stack([to_input(resize(load_image(p))) for p in chunk]).numpy()
            return session.run(None, {name: x})[0]

        paths = paths_file.read_text().split("\n")
        chunks = [paths[i:i + BATCH] for i in range(0, len(paths) - BATCH + 1, BATCH)]
        result = {"b1": _summary(_time_calls(fn, [[p] for p in paths[:single]]), 1),
                  "b32": _summary(_time_calls(fn, chunks * 2), BATCH)}
    elif kind in ("pomona-engine", "pomona-engine-int8"):
        from pomona.inference.engine import OnnxEngine, softmax

        engine = OnnxEngine(run_dir / ("model.onnx" if kind == "pomona-engine" else "model.int8.onnx"))
        result = measure_model(lambda b: softmax(engine.logits(b)), x, single)
    elif kind == "script-eager":
        result = plain_script(run_dir, paths_file.read_text().split("\n"), array)
    elif kind == "breakdown":
        result = breakdown(run_dir, paths_file.read_text().split("\n"))
    elif kind.startswith("predict:"):
        from pomona.inference.loaded import load_run

        paths = paths_file.read_text().split("\n")
        engine = kind.split(":", 1)[1]
        many = load_run(run_dir, device="cpu", tta=False, engine=engine, batch_size=BATCH)
        one = load_run(run_dir, device="cpu", tta=False, engine=engine, batch_size=1)
        chunks = [paths[i:i + BATCH] for i in range(0, len(paths) - BATCH + 1, BATCH)]
        b32 = _time_calls(many.predict, chunks * 2)
        b1 = _time_calls(one.predict, [[p] for p in paths[:single]])
        result = {"b1": _summary(b1, 1), "b32": _summary(b32, BATCH), "engine": many.engine_name}
    else:
        raise ValueError(kind)
    result["env_malloc_tuned"] = "GLIBC_TUNABLES" in os.environ
    return result


def plain_script(run_dir: Path, paths: list[str], out_csv: Path) -> dict:
    """What a plain PyTorch script does, files in and labels out: the run's timm model in eager mode (NCHW,
    `torch.inference_mode`), each photo opened with PIL at full size and put through pomona's preprocessing (resize,
    centre crop, normalise) one after the other, batches of 32, the labels written as CSV."""
    import csv

    import torch
    from PIL import Image

    from pomona.inference.loaded import load_run
    from pomona.data.preprocessing import create_eval_transform_np

    run = load_run(run_dir, "cpu", engine="torch", tta=False)
    model, classes = run.model.eval(), run.classes
    transform = create_eval_transform_np(run.preprocessing)
    rows = []
    with torch.inference_mode():
        for i in range(0, len(paths), BATCH):
            chunk = paths[i:i + BATCH]
            x = np.stack([transform(Image.open(p).convert("RGB")) for p in chunk])
            rows += [(p, classes[j]) for p, j in zip(chunk, model(torch.from_numpy(x)).argmax(-1).tolist())]
    with open(out_csv, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return {"threads": torch.get_num_threads()}


def breakdown(run_dir: Path, paths: list[str]) -> dict:
    """Where `pomona predict`'s time goes, one stage at a time on one thread each (seconds per 1,000 photos):
    decoding (`load_image`: JPEG DCT scaling to the resize target), preprocessing (resize, crop, normalise), the
    model (the engine `--engine auto` picks, batches of 32 of pre-made tensors), and bare ONNX Runtime on the same
    file and tensors (a default session: the ceiling of the model stage)."""
    from pomona.inference.loaded import load_run
    from pomona.inference.runfolder import EXPORT_FILES
    from pomona.data.images import load_image
    from pomona.data.preprocessing import create_eval_transform_np

    run = load_run(run_dir, "cpu", tta=False)
    pre = run.preprocessing
    transform = create_eval_transform_np(pre)
    start = time.perf_counter()
    images = [load_image(p, run.max_pixels, pre.resize_size) for p in paths]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    arrays = [transform(image) for image in images]
    preprocess = time.perf_counter() - start
    batches = [np.stack(arrays[i:i + BATCH]) for i in range(0, len(arrays) - BATCH + 1, BATCH)]
    model = sum(_time_calls(run.predict_probs, batches, warmup=1))
    out = {"engine": run.engine_name, "photos": len(paths), "decode_s_per_1000": 1000 * decode / len(paths),
           "preprocess_s_per_1000": 1000 * preprocess / len(paths),
           "model_s_per_1000": 1000 * model / (BATCH * len(batches))}
    if run.engine_name.startswith("onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(str(run_dir / EXPORT_FILES[run.engine_name]),
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        bare = sum(_time_calls(lambda b: session.run(None, {name: b}), batches, warmup=1))
        out["bare_ort_s_per_1000"] = 1000 * bare / (BATCH * len(batches))
    return out


def labelled_frames(folder: Path, n: int, parity_pass: bool = False) -> list[Path]:
    """A folder of `n` fruits360 frames of the four varieties the grocery run knows (links, one sub-folder per
    grocery class, spread evenly over the frames of each), for files-in runs scored by macro-F1: from the first
    filming pass (file names without the `r_` prefix), or with `parity_pass` from the second (`r_`), which the
    exports' parity gate is measured on, so that no frame decides the gate and is also scored."""
    from quality import FRUITS360_4

    every = sorted((p, FRUITS360_4[p.parent.name]) for name in FRUITS360_4 for p in (FRAMES / name).glob("*.jpg")
                   if p.name.startswith("r_") == parity_pass)
    picks = every[::max(1, len(every) // n)][:n]
    made = []
    for i, (p, label) in enumerate(picks):
        link = folder / label / f"{i:05d}_{p.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p)
        made.append(link)
    return made


def whole_process(kind: str, run_dir: Path, folder: Path, photos: list[Path], out_csv: Path) -> dict:
    """Files in, labels out, one fresh process, timed from its start to its end. `script-eager`: `plain_script`
    with nothing tuned (no pomona re-exec); `predict:E`: `pomona predict RUN --data FOLDER --engine E --no-tta
    --out CSV` as a user runs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    if kind == "script-eager":
        env = {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        env["POMONA_NO_REEXEC"] = "1"
        (folder.parent / "paths.txt").write_text("\n".join(str(p) for p in photos))
        cmd = [sys.executable, __file__, "--worker", kind, "--run", str(run_dir), "--array", str(out_csv),
               "--paths-file", str(folder.parent / "paths.txt")]
    else:
        cmd = [sys.executable, "-m", "pomona", "predict", str(run_dir), "--data", str(folder), "--no-tta",
               "--engine", kind.split(":", 1)[1], "--device", "cpu", "--batch-size", str(BATCH), "--out", str(out_csv)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "img_s": len(photos) / seconds}


def score_csv(out_csv: Path) -> tuple[float, dict]:
    """Macro-F1 of a labels CSV against the class sub-folder of each path, and the labels by path."""
    import pandas as pd

    from pomona.models.metrics import macro_f1

    table = pd.read_csv(out_csv)
    truth = [Path(p).parent.name for p in table["path"]]
    classes = sorted(set(truth) | set(table["label"]))
    index = {c: i for i, c in enumerate(classes)}
    return (macro_f1(np.array([index[t] for t in truth]), np.array([index[c] for c in table["label"]])),
            dict(zip(map(lambda p: Path(p).name, table["path"]), table["label"])))


def files_section(run_dir: Path, n: int, repeats: int) -> tuple[list[str], dict]:
    """The headline: `pomona predict` against a plain eager PyTorch script, files in and labels out, whole
    processes on the same `n` frames (rows interleaved, best of `repeats`: load from other jobs only slows a run
    down), with macro-F1 on the frames' varieties; then where the time goes (`breakdown`)."""
    tmp = Path(tempfile.mkdtemp(prefix="pomona-files-"))
    photos = labelled_frames(tmp / "photos", n)
    plan = [("plain script: eager PyTorch fp32, PIL decode loop", "script-eager"),
            ("pomona predict --engine torch", "predict:torch"),
            ("pomona predict --engine torch-bf16", "predict:torch-bf16"),
            ("pomona predict --engine onnx", "predict:onnx"),
            ("pomona predict --engine onnx-int8", "predict:onnx-int8"),
            ("pomona predict (no flags: --engine auto)", "predict:auto")]
    got: dict[str, dict] = {kind: {"img_s": 0.0} for _, kind in plan}
    for repeat in range(repeats):
        for label, kind in plan:
            print(f"whole process ({repeat + 1}/{repeats}): {label} ...", flush=True)
            r = whole_process(kind, run_dir, tmp / "photos", photos, tmp / f"{kind.replace(':', '-')}.csv")
            if r["img_s"] > got[kind]["img_s"]:
                got[kind] = r
    scores = {kind: score_csv(tmp / f"{kind.replace(':', '-')}.csv") for _, kind in plan}
    base_f1, base_labels = scores["script-eager"]
    rows = []
    for label, kind in plan:
        f1, labels = scores[kind]
        rows.append({"row": label, "photos": n, "seconds": got[kind]["seconds"], "img_s": got[kind]["img_s"],
                     "vs_plain": got[kind]["img_s"] / got["script-eager"]["img_s"], "macro_f1": f1,
                     "f1_diff": f1 - base_f1,
                     "agree": float(np.mean([labels[k] == v for k, v in base_labels.items()]))})
    parts = [f"files in, labels out: whole processes on {n} fruits360 frames (4 varieties), batch 32, no TTA, best "
             f"of {repeats}", "", print_table(rows, ["row", "photos", "seconds", "img_s", "vs_plain", "macro_f1",
                                                     "f1_diff", "agree"])]
    from pomona.inference.runfolder import read_export_info

    exported = read_export_info(run_dir)
    gate = [{"engine": fmt, "parity_photos": e["parity"]["n"], "top1_agreement": e["parity"]["top1_agreement"],
             "macro_f1_diff": e["parity"]["macro_f1_diff"], "float_layers": len(e["details"].get("float_layers", [])),
             "passes": "yes" if e["passed"] else "no", "img_s_at_export": e["details"].get("img_s", float("nan"))}
            for fmt, e in exported.items() if e.get("parity")]
    parts += ["", "the exports' parity gate (export.json; --parity-data: frames of the other filming pass)", "",
              print_table(gate, ["engine", "parity_photos", "top1_agreement", "macro_f1_diff", "float_layers",
                                 "passes", "img_s_at_export"])]
    print()
    paths_file = tmp / "breakdown.txt"
    paths_file.write_text("\n".join(str(p) for p in photos[:512]))
    b = run_worker("breakdown", run_dir, tmp / "none.npy", paths_file, 0, tuned=False, reexec=True)
    stages = [{"stage": "decode (load_image)", "s_per_1000": b["decode_s_per_1000"]},
              {"stage": "preprocess (resize, crop, normalise)", "s_per_1000": b["preprocess_s_per_1000"]},
              {"stage": f"model ({b['engine']}, batches of 32)", "s_per_1000": b["model_s_per_1000"]}]
    if "bare_ort_s_per_1000" in b:
        stages.append({"stage": "bare ONNX Runtime, same file, same tensors (ceiling)",
                       "s_per_1000": b["bare_ort_s_per_1000"]})
    for r in stages:
        r["img_s"] = 1000 / r["s_per_1000"]
    whole = 1000 / got["predict:auto"]["img_s"]
    stages.append({"stage": "pomona predict, whole process (all stages overlapped on 2 threads)",
                   "s_per_1000": whole, "img_s": 1000 / whole})
    parts += ["", f"where the time goes ({b['photos']} of the frames; each stage alone, one after the other)", "",
              print_table(stages, ["stage", "s_per_1000", "img_s"])]
    print()
    return parts, {"files": got, "breakdown": b, "scores": {k: v[0] for k, v in scores.items()}}


# ------------------------------------------------------------------------------------------- driver side
def run_worker(kind: str, run_dir: Path, array: Path, paths_file: Path, single: int, tuned: bool,
               reexec: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if reexec:  # pomona's own malloc setting, as its entry point makes it
        from pomona.core.runtime import find_tcmalloc, malloc_environment

        env = malloc_environment(env, find_tcmalloc())
    else:
        env["POMONA_NO_REEXEC"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    if tuned:
        from pomona.core.runtime import MALLOC_TUNABLES

        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    cmd = [sys.executable, __file__, "--worker", kind, "--run", str(run_dir), "--array", str(array),
           "--paths-file", str(paths_file), "--single", str(single)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_serve(run_dir: Path, photos: list[Path], clients: int, requests_total: int) -> dict:
    """Start `pomona serve`, send `requests_total` photos from `clients` threads, measure; then stop it."""
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "pomona", "serve", str(run_dir), "--port", str(port), "--no-tta",
                             "--no-explain"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        data = [p.read_bytes() for p in photos]
        for d in data[:4]:
            requests.post(url + "/predict", files={"file": ("a.jpg", d, "image/jpeg")}, timeout=60)
        results: list[tuple[float, int]] = []
        lock = threading.Lock()
        counter = iter(range(requests_total))

        def client() -> None:
            session = requests.Session()
            for i in counter:
                start = time.perf_counter()
                try:
                    status = session.post(url + "/predict", files={"file": ("a.jpg", data[i % len(data)], "image/jpeg")},
                                          timeout=60).status_code
                except requests.RequestException:
                    status = -1
                with lock:
                    results.append((time.perf_counter() - start, status))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    times = np.asarray([t for t, _ in results])
    errors = sum(1 for _, s in results if s != 200)
    return {"req_s": len(results) / wall, "p50_ms": 1000 * float(np.percentile(times, 50)),
            "p95_ms": 1000 * float(np.percentile(times, 95)), "errors": errors, "requests": len(results)}


def train_run(run_dir: Path, images: Path) -> None:
    """A short run to measure: ImageNet Lite0 with a frozen backbone on grocery train, at the default image size
    (a held-out 20% validation split: the photos parity is measured on)."""
    print(f"training {run_dir} (frozen backbone, grocery train) ...", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "pomona", "train", "--data", str(images / "train"), "--out", str(run_dir),
                    "--freeze-backbone", "--epochs", "8", "--lr", "3e-3", "--device", "cpu"], env=env, check=True)


def export_in_subprocess(run_dir: Path, fmt: str | None = None, parity: Path | None = None) -> None:
    """`pomona export RUN` (every CPU engine, timed; or `--format fmt`), its parity gate on `parity` if given."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "pomona", "export", str(run_dir), *(["--format", fmt] if fmt else []),
                    *(["--parity-data", str(parity)] if parity else [])], env=env, check=True)


def select_photos(root: Path, n: int) -> list[Path]:
    """`n` photos spread over every variety and both folders, in a fixed order."""
    from pomona.data.images import IMAGE_EXTENSIONS

    every = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(every) // n)
    return every[::step][:n]


def tensors_section(run_dir: Path, args, info: dict) -> tuple[list[str], dict]:
    """Every engine on pre-made tensors and on files (batch 1 and 32, one process a row), serve, the ratios and
    the parity of the low-precision exports."""
    from pomona.inference.runfolder import read_export_info
    from pomona.data.images import load_image
    from pomona.data.preprocessing import Preprocessing, create_eval_transform_np

    pre = Preprocessing.from_dict(info["preprocessing"])
    photos = select_photos(Path(args.images), args.n)
    transform = create_eval_transform_np(pre)
    x = np.stack([transform(load_image(p)) for p in photos]).astype(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="pomona-bench-"))
    np.save(tmp / "x.npy", x)
    (tmp / "paths.txt").write_text("\n".join(str(p) for p in photos))

    plan = [("eager PyTorch, default", "torch-default", False, "tensors"),
            ("PyTorch, tuned (malloc + channels_last)", "torch-tuned", True, "tensors"),
            ("PyTorch bf16 autocast, tuned", "torch-bf16", True, "tensors"),
            ("ONNX Runtime, bare session (fp32)", "ort-bare", True, "tensors"),
            ("pomona OnnxEngine, fp32", "pomona-engine", True, "tensors"),
            ("pomona OnnxEngine, int8", "pomona-engine-int8", True, "tensors"),
            ("ONNX Runtime, bare session + plain decode loop", "ort-bare-files", True, "files"),
            ("predict --engine torch (tuned fp32)", "predict:torch", True, "files"),
            ("predict --engine torch-bf16", "predict:torch-bf16", True, "files"),
            ("predict --engine onnx (fp32)", "predict:onnx", True, "files"),
            ("predict --engine onnx-int8", "predict:onnx-int8", True, "files"),
            ("pomona predict (--engine auto)", "predict:auto", True, "files")]
    runs: dict[str, list] = {kind: [] for _, kind, _, _ in plan}
    for repeat in range(args.repeats):
        for label, kind, tuned, source in plan:
            print(f"measuring ({repeat + 1}/{args.repeats}): {label} ...", flush=True)
            runs[kind].append(run_worker(kind, run_dir, tmp / "x.npy", tmp / "paths.txt", args.single, tuned))
    raw = {kind: combine(r) for kind, r in runs.items()}
    rows = []
    for label, kind, tuned, source in plan:
        if kind == "predict:auto":
            label += f" = {raw[kind]['engine']}"
        for b in ("b1", "b32"):
            r = raw[kind][b]
            rows.append({"row": label, "input": source, "batch": 1 if b == "b1" else BATCH, "img_s": r["img_s"],
                         "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"]})
    serve_rows = []
    for clients in sorted({1, args.clients}):
        print(f"measuring: serve /predict with {clients} client(s) ...", flush=True)
        s = raw[f"serve-{clients}"] = load_serve(run_dir, photos, clients, args.requests)
        serve_rows.append({"row": f"serve POST /predict, {clients} concurrent client(s)", "requests": s["requests"],
                           "req_s": s["req_s"], "p50_ms": s["p50_ms"], "p95_ms": s["p95_ms"], "errors": s["errors"]})

    def ips(kind, b="b32"):
        return raw[kind][b]["img_s"]

    auto = raw["predict:auto"]["engine"]
    ratios = [
        {"ratio": f"pomona predict (auto = {auto}; files, b32) / eager PyTorch default (tensors, b32)",
         "value": ips("predict:auto") / ips("torch-default"), "target": ">= 7"},
        {"ratio": "pomona predict (auto; files, b32) / PyTorch tuned fp32 (tensors, b32)",
         "value": ips("predict:auto") / ips("torch-tuned"), "target": ""},
        {"ratio": "pomona predict (auto; files, b32) / predict --engine torch (files, b32)",
         "value": ips("predict:auto") / ips("predict:torch"), "target": ""},
        {"ratio": "pomona predict (auto; files, b32) / predict --engine onnx fp32 (files, b32)",
         "value": ips("predict:auto") / ips("predict:onnx"), "target": ""},
        {"ratio": "PyTorch bf16 / PyTorch tuned fp32 (tensors, b32)",
         "value": ips("torch-bf16") / ips("torch-tuned"), "target": ""},
        {"ratio": "OnnxEngine int8 / OnnxEngine fp32 (tensors, b32)",
         "value": ips("pomona-engine-int8") / ips("pomona-engine"), "target": ""},
        {"ratio": "pomona OnnxEngine fp32 / bare ONNX Runtime (b32)", "value": ips("pomona-engine") / ips("ort-bare"),
         "target": ">= 0.9"},
        {"ratio": "PyTorch tuned / eager PyTorch default (b32)", "value": ips("torch-tuned") / ips("torch-default"),
         "target": ""},
    ]
    exported = read_export_info(run_dir)
    parity_rows = []
    for fmt in LOW_PRECISION:
        p = exported[fmt]["parity"]
        parity_rows.append({"engine": fmt, "photos": p["n"], "top1_agreement": p["top1_agreement"],
                            "macro_f1_fp32": p["macro_f1_fp32"], "macro_f1": p["macro_f1"],
                            "macro_f1_diff": p["macro_f1_diff"], "max_prob_diff": p["max_prob_diff"],
                            "passes": "yes" if exported[fmt]["passed"] else "no"})
    header = (f"run {run_dir} ({info['model']['name']} @ {pre.input_size} px, {len(info['classes'])} classes); "
              f"{len(photos)} photos from {args.images}; {os.cpu_count()} CPUs; TTA off; medians of "
              f"{args.repeats} repeats; parity on {parity_rows[0]['photos']} held-out photos")
    print("\n" + header)
    parts = [header, "", print_table(rows, ["row", "input", "batch", "img_s", "p50_ms", "p95_ms"])]
    print()
    parts += ["", print_table(serve_rows, ["row", "requests", "req_s", "p50_ms", "p95_ms", "errors"])]
    print()
    parts += ["", print_table(ratios, ["ratio", "value", "target"])]
    print()
    parts += ["", print_table(parity_rows, ["engine", "photos", "top1_agreement", "macro_f1_fp32", "macro_f1",
                                            "macro_f1_diff", "max_prob_diff", "passes"])]
    return parts, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/bench-inference", help="a trained run folder (trained first, "
                        "frozen backbone on grocery train, when it holds no run; exported to every CPU format)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of every row (medians are shown)")
    parser.add_argument("--images", default=str(DATA), help="folder of photos (searched recursively)")
    parser.add_argument("--n", type=int, default=128, help="photos for the batch-32 rows (multiple of 32)")
    parser.add_argument("--single", type=int, default=40, help="photos for the batch-1 rows")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the serve row")
    parser.add_argument("--requests", type=int, default=200, help="requests for the serve row")
    parser.add_argument("--out", help="also write the table (markdown) and raw numbers (JSON) here")
    parser.add_argument("--parts", default="files,tensors", help="files (whole processes, files in, labels out: "
                        "the headline), tensors (every engine on pre-made tensors and on files, in one process each, "
                        "and serve)")
    parser.add_argument("--files", type=int, default=2000, help="fruits360 frames for the files part")
    parser.add_argument("--parity-frames", type=int, default=240, help="export the run again first, its parity gate "
                        "measured on this many frames of the other filming pass (0: keep the run's exports)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--array", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_dir = Path(args.run)
    if args.worker:
        print(json.dumps(worker(args.worker, run_dir, Path(args.array), Path(args.paths_file), args.single)))
        return

    from pomona.inference.loaded import find_current_export

    if not (run_dir / "run.json").is_file():
        train_run(run_dir, Path(args.images))
    if args.parity_frames:  # what a user gets from `pomona export RUN --parity-data FOLDER`, gated on other frames
        parity = Path(tempfile.mkdtemp(prefix="pomona-parity-")) / "photos"
        labelled_frames(parity, args.parity_frames, parity_pass=True)
        print(f"exporting {run_dir} (every CPU engine; parity on {args.parity_frames} frames of the r_ pass) ...",
              flush=True)
        export_in_subprocess(run_dir, parity=parity)
    for fmt in ("onnx", *LOW_PRECISION):
        if find_current_export(run_dir, fmt)[0] is None:
            print(f"exporting {run_dir} as {fmt} ...", flush=True)
            export_in_subprocess(run_dir, fmt)
    info = json.loads((run_dir / "run.json").read_text())
    parts, raw = [], {}
    if "files" in args.parts.split(","):
        parts, raw = files_section(run_dir, args.files, args.repeats)
        print("\n".join(parts))
    if "tensors" in args.parts.split(","):
        more, raw["tensors"] = tensors_section(run_dir, args, info)
        parts += ["", *more]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "inference.md").write_text("\n".join(parts) + "\n")
        (out / "inference.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
