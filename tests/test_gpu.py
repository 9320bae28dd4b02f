"""CUDA-only checks: the device augmentation on the GPU against the CPU path's statistics, bf16 autocast, the fused
AdamW step, torch.compile in the epoch loop, and `pomona train --device cuda` end to end on real photos.

Marked `gpu`: `pytest -m gpu` runs only these, `scripts/gpu_check.sh` runs them and `benchmarks/gpu.py` in one go
on a GPU machine. Without CUDA they are skipped, with a reason naming CUDA, which `tests/ci_skips.py` keeps a skip
under CI=true (a CPU-only CI cannot have a GPU)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from pomona.config import TrainConfig
from pomona.data.augment import AugmentError, AugmentSpec
from pomona.models.model import create_model
from pomona.training.optim import create_optimizer
from pomona.training.steps import train_one_epoch
from pomona.training.train import train_and_evaluate

from conftest import tiny_config
from test_batch_augment import PLAIN, check_field, device_path

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU here)")]

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, 16, 0.0, weights="none").cuda()
    return model.to(memory_format=torch.channels_last)


def _batch(n: int = 8, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 3, (n,), generator=g).cuda()


@pytest.mark.parametrize("name", [f.name for f in fields(AugmentSpec)])
def test_device_augmentation_on_cuda_does_each_spec_field_like_the_cpu_path(name):
    check_field(name, partial(device_path, device="cuda"))


def test_device_augmentation_without_random_operations_is_the_same_on_cuda_and_cpu():
    assert torch.allclose(device_path(PLAIN, 4, "cuda"), device_path(PLAIN, 4, "cpu"), atol=1e-4)
    spec = replace(PLAIN, blur=1.0, noise=1.0, random_erasing=1.0, photometric=1.0)
    a = device_path(spec, 16, "cuda")
    assert torch.equal(a, device_path(spec, 16, "cuda"))  # a seed gives the same batch on the GPU too


def test_bf16_autocast_forward_and_backward():
    model, (x, y) = _model(), _batch()
    model.eval()  # no dropout or drop-path: the two passes see the same network
    with torch.no_grad():
        full = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert nn.functional.cosine_similarity(logits.float().flatten(), full.flatten(), dim=0) > 0.98
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fused_adamw_step_matches_the_plain_one():
    model, (x, y) = _model(), _batch()
    twin = copy.deepcopy(model)
    fused = create_optimizer(model, TrainConfig())
    assert fused.defaults.get("fused") is True
    twin_of = dict(zip(map(id, model.parameters()), twin.parameters()))
    plain = torch.optim.AdamW([{"params": [twin_of[id(p)] for p in g["params"]], "lr": g["lr"],
                                "weight_decay": g["weight_decay"]} for g in fused.param_groups], foreach=False)
    model.eval()
    for _ in range(3):  # the same gradients into both
        fused.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            if p.grad is not None:
                twin_of[id(p)].grad = p.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_torch_compile_trains_in_the_epoch_loop():
    model = _model()
    compiled = torch.compile(model)
    optimizer = create_optimizer(model, TrainConfig())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [_batch(seed=i) for i in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_one_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), torch.device("cuda"),
                              backbone_frozen=False, amp=torch.bfloat16, compiled=compiled)
    assert math.isfinite(metrics["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    x = batches[0][0]
    with torch.no_grad():
        fast, eager = compiled(x), model(x)
    assert torch.allclose(fast, eager, atol=1e-2, rtol=1e-2), (fast - eager).abs().max()


def test_training_on_cuda_refuses_jpeg_on_the_device_path(grocery_small, tmp_path):
    cfg = tiny_config(jpeg=0.2)  # --device-augment auto: on with CUDA
    cfg.device, cfg.data.data_dir = "cuda", str(grocery_small)
    with pytest.raises(AugmentError, match="--jpeg .*--device-augment auto"):
        train_and_evaluate(cfg, tmp_path / "run")


def test_pomona_train_one_epoch_on_cuda(grocery_small, grocery_val_small, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pomona", "train", "--data", str(grocery_small), "--val-data",
           str(grocery_val_small), "--out", str(out), "--model", "test_efficientnet", "--weights", "none",
           "--img-size", "64", "--out-features", "16", "--epochs", "1", "--batch-size", "8", "--frozen-epochs", "0",
           "--warmup-epochs", "0", "--head-init", "random", "--device", "cuda", "--device-augment", "on",
           "--amp", "bf16", "--photometric", "0.5", "--blur", "0.3", "--noise", "0.5", "--random-erasing", "0.5"]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 1 and math.isfinite(history["train_loss"].iloc[0])
    assert history["train_images_per_s"].iloc[0] > 0
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["device_augment"], train["amp"]) == ("on", "bf16")
    assert (out / "run.json").is_file()
