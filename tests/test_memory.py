"""Memory (issue 21, point 2; measured by benchmarks/memory.py): the allocator the re-exec puts in force
(pomona.core.runtime), and running the model on slices of a batch, in training (steps.backward_in_slices: the whole
batch's loss and gradients) and inference (model.forward_in_slices: the same outputs), which holds one slice's
activations instead of the batch's."""

import contextlib

import pytest
import torch
from torch import nn

from pomona.config import TrainConfig
from pomona.core import runtime
from pomona.models.model import forward_in_slices
from pomona.training.steps import backward_in_slices, micro_batch_size


def reexec_environments(monkeypatch, environ: dict, tcmalloc: str | None) -> list[dict]:
    """The environments `reexec_with_malloc_tuning(environ)` re-executes with (os.execve recorded), where the
    dynamic linker finds `tcmalloc` (None: not installed)."""
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda path, argv, env: calls.append(env))
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: tcmalloc)
    runtime.reexec_with_malloc_tuning(environ)
    return calls


GLIBC_CHOSEN = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def test_the_reexec_preloads_tcmalloc_where_it_is_installed(monkeypatch):
    (env,) = reexec_environments(monkeypatch, {"PATH": "/usr/bin"}, "libtcmalloc_minimal.so.4")
    assert env == {"PATH": "/usr/bin", "GLIBC_TUNABLES": GLIBC_CHOSEN, "LD_PRELOAD": "libtcmalloc_minimal.so.4",
                   "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def test_without_tcmalloc_or_with_the_users_own_preload_glibc_gets_the_thresholds(monkeypatch):
    (env,) = reexec_environments(monkeypatch, {"PATH": "/usr/bin"}, None)
    assert env == {"PATH": "/usr/bin", "GLIBC_TUNABLES": GLIBC_CHOSEN}
    (env,) = reexec_environments(monkeypatch, {"LD_PRELOAD": "libjemalloc.so.2"}, "libtcmalloc_minimal.so.4")
    assert env == {"LD_PRELOAD": "libjemalloc.so.2", "GLIBC_TUNABLES": GLIBC_CHOSEN}


def test_the_users_own_setting_or_no_reexec_runs_as_it_is(monkeypatch):
    tcmalloc = "libtcmalloc_minimal.so.4"
    assert reexec_environments(monkeypatch, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, tcmalloc) == []
    assert reexec_environments(monkeypatch, {"POMONA_NO_REEXEC": "1"}, tcmalloc) == []


def test_tcmalloc_is_found_by_its_library_name_or_not_at_all():
    assert runtime.find_tcmalloc() in (None, "libtcmalloc_minimal.so.4")
    runtime.release_memory()  # glibc here (tests run without the re-exec): malloc_trim


def tiny_net() -> nn.Module:
    # batch norm in eval mode, as --freeze-bn fine-tunes: each image's output does not depend on the others
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("weighted", [False, True])
def test_slices_give_the_whole_batchs_loss_and_gradients(weighted):
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]) if weighted else None, label_smoothing=0.1)
    x, y = torch.randn(11, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0])
    results = []
    for size in (0, 4, 1):  # whole batch; 4 + 4 + 3; one image at a time
        model = tiny_net()
        loss = backward_in_slices(model, loss_fn, x, y, size)
        results.append((loss, [p.grad for p in model.parameters()]))
    (whole, whole_grads), *sliced = results
    assert torch.allclose(whole, loss_fn(tiny_net()(x), y))
    for loss, grads in sliced:
        assert torch.allclose(loss, whole, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, whole_grads))


def test_micro_batch_default_is_eight_on_the_cpu_and_whole_batches_on_a_gpu():
    assert micro_batch_size(TrainConfig(), torch.device("cpu")) == 8
    assert micro_batch_size(TrainConfig(), torch.device("cuda")) == 0
    assert micro_batch_size(TrainConfig(micro_batch=0), torch.device("cpu")) == 0
    assert micro_batch_size(TrainConfig(micro_batch=16), torch.device("cuda")) == 16


def test_under_ddp_gradients_are_reduced_once_after_the_last_slice():
    class FakeDDP:  # records which slices ran inside no_sync (gradients kept local, not all-reduced)
        def __init__(self, model):
            self.model, self.inside, self.calls = model, False, []

        def __call__(self, x):
            self.calls.append(self.inside)
            return self.model(x)

        @contextlib.contextmanager
        def no_sync(self):
            self.inside = True
            yield
            self.inside = False

    ddp = FakeDDP(tiny_net())
    backward_in_slices(ddp, nn.CrossEntropyLoss(), torch.randn(11, 3, 8, 8), torch.zeros(11, dtype=torch.long), 4,
                       ddp=ddp)
    assert ddp.calls == [True, True, False]


def test_inference_in_slices_gives_the_same_outputs():
    model, x = tiny_net(), torch.randn(11, 3, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(forward_in_slices(model, x, 4), model(x), atol=1e-6)
        assert torch.equal(forward_in_slices(model, x, 0), model(x))
