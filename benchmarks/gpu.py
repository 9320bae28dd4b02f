"""Benchmark: training throughput on a GPU -- the model alone against pomona's loop -- or, on a CPU, the input
pipeline alone.

    python benchmarks/gpu.py                        # on a GPU machine (one command, a few minutes)
    python benchmarks/gpu.py --device cpu --quick   # on the CPU: the input pipeline alone (~1-2 minutes)

On CUDA, one table, all rows measured in this one run (grocery-apples: 278 training photos, 22 validation):
  model-only train step      a synthetic batch already on the GPU, same model / size / batch, bf16 autocast,
                             channels_last, fused AdamW: forward + backward + step (the ceiling of the loop)
  pomona loop, device path   `train_and_evaluate` on the grocery photos at --img-size (full fine-tuning from the
                             first epoch): uint8 store on the GPU, batched augmentation there, bf16, channels_last,
                             EMA, validation; img/s = median over the epochs after the first (history.csv's
                             train_images_per_s, the GPU synchronised at the end of every epoch)
  pomona loop, loader path   the same with --device-augment off --amp off --num-workers 6: per-photo torchvision
                             transforms in loader workers, fp32 (what main did before; Lite0 only)
  ratio                      loop img/s / model-only img/s (target >= 0.6 for Lite0; >= 2,000 img/s)
  peak GPU memory            torch.cuda.max_memory_allocated of the row
  grocery default recipe     `pomona train` on grocery train -> val with the default settings, end to end in a
                             fresh process (import, CUDA start, decoding, 10 epochs, files, report): seconds (<= 60)

With --device cpu, the input pipeline alone, no model (what a GPU would be fed): photos decoded once, then
epochs of training batches at --img-size, img/s of
  loader path   per-photo torchvision transforms on the decoded-image cache (DataLoader, --workers processes)
  device path   the uint8 ImageStore + `batch_augment` on the CPU (what runs on the GPU there), in the main process
each with the default geometric recipe and with photometric operations added, and the seconds each way of
decoding takes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from common import print_table  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-apples"
MODELS = {"lite0": "tf_efficientnet_lite0", "lite2": "tf_efficientnet_lite2"}
PHOTOMETRIC = {"colour_jitter": 0.2, "photometric": 0.8, "white_balance": 0.03, "blur": 0.3, "noise": 0.3}
"""The colour settings of the "+ photometric" rows (both paths: one `augment.AugmentSpec`)."""


def base_config(data: Path, img_size: int, batch_size: int, device: str):
    from pomona.config import Config, merge

    return merge(Config(), {"data": {"data_dir": str(data / "train"), "val_data": str(data / "val")},
                            "model": {"img_size": img_size}, "train": {"batch_size": batch_size},
                            "device": device})


# ------------------------------------------------------------------------------------------------ GPU
def model_only(name: str, img_size: int, batch_size: int, steps: int, device) -> dict:
    """img/s of forward + backward + optimiser step on one synthetic batch already on the device."""
    import torch

    from pomona.config import TrainConfig
    from pomona.models.model import create_model
    from pomona.training.optim import create_optimizer

    torch.cuda.reset_peak_memory_stats(device)
    model = create_model(name, 5, 512, 0.3, weights="none").to(device).to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, TrainConfig())
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch_size,), device=device)
    model.train()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"img_s": steps * batch_size / seconds, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def pomona_loop(cfg, out: Path, device) -> dict:
    """img/s of pomona's own loop (train_and_evaluate), median over the epochs after the first."""
    import torch

    from pomona.training.train import train_and_evaluate

    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train_and_evaluate(cfg, out)
    seconds = time.perf_counter() - start
    speeds = [h["train_images_per_s"] for h in result.history]
    return {"img_s": float(np.median(speeds[1:] or speeds)), "first_epoch_img_s": speeds[0], "seconds": seconds,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def end_to_end(data: Path, out: Path) -> float:
    """Seconds of `pomona train` (the default recipe) on grocery train -> val, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pomona", "train", "--data", str(data / "train"), "--val-data",
                    str(data / "val"), "--out", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_gpu(args, out: Path) -> list[dict]:
    import torch

    from pomona.config import merge

    device = torch.device(args.device)
    rows = []
    for key in args.models.split(","):
        name = MODELS[key]
        print(f"model-only {name} ...", flush=True)
        ceiling = model_only(name, args.img_size, args.batch_size, args.steps, device)
        cfg = merge(base_config(args.data, args.img_size, args.batch_size, args.device),
                    {"model": {"name": name, "weights": "none"},
                     "train": {"epochs": args.epochs, "frozen_epochs": 0, "warmup_epochs": 0, "patience": 0}})
        print(f"pomona loop {name}, device path ...", flush=True)
        loop = pomona_loop(cfg, out / f"{key}-device", device)
        rows.append({"row": f"{key} @ {args.img_size}, batch {args.batch_size}: model-only train step (bf16)",
                     "img_s": ceiling["img_s"], "peak_gib": ceiling["peak_gib"]})
        rows.append({"row": f"{key} @ {args.img_size}: pomona loop, device path (bf16)", "img_s": loop["img_s"],
                     "vs_model_only": loop["img_s"] / ceiling["img_s"], "peak_gib": loop["peak_gib"],
                     "seconds": loop["seconds"]})
        if key == "lite0" and not args.skip_loader_path:
            print(f"pomona loop {name}, loader path ...", flush=True)
            old = pomona_loop(merge(cfg, {"train": {"device_augment": "off", "amp": "off"},
                                          "data": {"num_workers": args.workers}}), out / f"{key}-loader", device)
            rows.append({"row": f"{key} @ {args.img_size}: pomona loop, loader path ({args.workers} workers, fp32)",
                         "img_s": old["img_s"], "vs_model_only": old["img_s"] / ceiling["img_s"],
                         "peak_gib": old["peak_gib"], "seconds": old["seconds"]})
    if not args.skip_e2e:
        print("grocery default recipe, end to end ...", flush=True)
        rows.append({"row": "grocery default recipe, `pomona train` end to end",
                     "seconds": end_to_end(args.data, out / "grocery-default")})
    return rows


# ------------------------------------------------------------------------------------------------ CPU
def _iterate(loader, epochs: int) -> float:
    """img/s of `epochs` passes over a loader (reseeded per epoch as fit does)."""
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.generator.manual_seed(epoch)
        for x, y in loader:
            seen += len(y)
    return seen / (time.perf_counter() - start)


def run_cpu(args) -> list[dict]:
    import torch

    from pomona.config import merge
    from pomona.data.bundle import prepare_data
    from pomona.data.preprocessing import resolve_preprocessing
    from pomona.training.datasets import DecodedImages, ImageStore
    from pomona.training.loaders import create_device_loaders, create_loaders

    cfg = base_config(args.data, args.img_size, args.batch_size, "cpu")
    bundle = prepare_data(cfg.data)
    pre = resolve_preprocessing(cfg.model.name, args.img_size)
    paths = list(bundle.table["path"])
    rows = []
    start = time.perf_counter()
    cache = DecodedImages(pre)
    cache.scan(paths)
    decode_cache = time.perf_counter() - start
    start = time.perf_counter()
    store = ImageStore(pre, workers=args.workers or None)
    store.scan(paths)
    decode_store = time.perf_counter() - start
    n_train = len(bundle.subset("train"))
    for label, extra in (("geometric (default recipe)", {}), ("geometric + photometric", "photometric")):
        cpu_cfg = merge(cfg, {"data": {"num_workers": args.workers}, "train": PHOTOMETRIC if extra else {}})
        print(f"loader path, {label} ...", flush=True)
        loader, _ = create_loaders(bundle, cache, pre, cpu_cfg)
        old = _iterate(loader, args.epochs)
        dev_cfg = merge(cfg, {"train": {"device_augment": "on", **(PHOTOMETRIC if extra else {})}})
        print(f"device path on the CPU, {label} ...", flush=True)
        dev_loader, _ = create_device_loaders(bundle, store, pre, dev_cfg, torch.device("cpu"))
        new = _iterate(dev_loader, args.epochs)
        rows.append({"row": f"loader path: per-photo torchvision, {args.workers} workers; {label}"
                            + ("; " + ", ".join(f"{k} {v}" for k, v in PHOTOMETRIC.items()) if extra else ""),
                     "img_s": old})
        rows.append({"row": f"device path on the CPU: ImageStore + batch_augment; {label}"
                            + ("; " + ", ".join(f"{k} {v}" for k, v in PHOTOMETRIC.items()) if extra else ""),
                     "img_s": new, "vs_loader_path": new / old})
    rows.append({"row": f"decoding {len(paths)} photos once: decoded-image cache (1 thread)", "seconds": decode_cache})
    rows.append({"row": f"decoding {len(paths)} photos once: ImageStore ({store.workers} threads)",
                 "seconds": decode_store, "store_mib": store.nbytes / 2**20})
    print(f"({n_train} training photos per epoch, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.img_size} px, torch threads {torch.get_num_threads()})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the full table) or cpu (the input pipeline alone)")
    parser.add_argument("--quick", action="store_true", help="small sizes: 224 px, 2 epochs (CPU checks)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--img-size", type=int, default=None, help="default 384 (224 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="lite0,lite2", help="comma-separated: lite0, lite2")
    parser.add_argument("--epochs", type=int, default=None, help="pomona-loop epochs (default 6 on CUDA, 3 on CPU)")
    parser.add_argument("--steps", type=int, default=100, help="model-only timed steps")
    parser.add_argument("--workers", type=int, default=None, help="loader workers of the loader path "
                        "(default 6 on CUDA, 2 on CPU)")
    parser.add_argument("--skip-loader-path", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="folder for runs, results.md and results.json")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.img_size = args.img_size or (224 if args.quick else 384)
    args.epochs = args.epochs or (2 if args.quick else 3 if cpu else 6)
    args.workers = args.workers if args.workers is not None else (2 if cpu else 6)
    out = args.out or Path(tempfile.mkdtemp(prefix="pomona-gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if cpu:
        rows = run_cpu(args)
        header = (f"input pipeline alone, on the CPU ({os.cpu_count()} cores, no GPU): grocery-apples, "
                  f"{args.img_size} px, batch {args.batch_size}, {args.epochs} epochs")
        columns = ["row", "img_s", "vs_loader_path", "seconds", "store_mib"]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --device cpu for the input-pipeline measurement")
        rows = run_gpu(args, out)
        header = (f"{torch.cuda.get_device_name()}: grocery-apples, {args.img_size} px, batch {args.batch_size}, "
                  f"{args.epochs} epochs per loop row; torch {torch.__version__}")
        columns = ["row", "img_s", "vs_model_only", "peak_gib", "seconds"]
    print("\n" + header)
    text = print_table(rows, columns)
    (out / "results.md").write_text(header + "\n\n" + text + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(f"\n(results in {out})")


if __name__ == "__main__":
    from pomona.core.runtime import reexec_with_malloc_tuning

    reexec_with_malloc_tuning(os.environ)
    main()
