"""Fast inference on photos: decoding in threads while the model runs on the previous batch, batched model
calls, ONNX Runtime sessions, and a micro-batcher that groups concurrent single-photo requests.

This module knows nothing of run folders (`pomona.inference.loaded` reads them and hands a batch -> probabilities
function to `predict_paths`) and nothing of training.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from ..config import MAX_ASPECT
from ..core.errors import PomonaError
from ..core.progress import Progress
from ..data.images import BadImageError, load_image
from ..data.preprocessing import Preprocessing, create_eval_transform_np
from .records import PredictionRecord


class EngineError(PomonaError, RuntimeError):
    """The requested inference engine cannot be used for this run (missing or stale export, missing package)."""


@dataclass
class Predictions:
    """Probabilities per input path (rows of NaN for unreadable images, listed in `bad`)."""

    paths: list[str]
    probs: np.ndarray
    classes: list[str]
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return ["" if np.isnan(p[0]) else self.classes[int(p.argmax())] for p in self.probs]

    def records(self, min_confidence: float = 0.0) -> list[PredictionRecord]:
        """One `PredictionRecord` per photo, its verdict at `min_confidence` (an unreadable photo's with its error)."""
        return [PredictionRecord.of(p, self.classes, min_confidence, path, self.bad.get(path))
                for path, p in zip(self.paths, self.probs)]

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        return [list(r.top(k)) for r in self.records()]

    def verdicts(self, min_confidence: float = 0.0) -> list[str]:
        """Per photo: the label, or 'not sure: X or Y' below `min_confidence` ('' for an unreadable photo)."""
        return [r.verdict.text if r.verdict else "" for r in self.records(min_confidence)]

    def to_frame(self, k: int = 3, min_confidence: float | None = None) -> pd.DataFrame:
        """One row per photo (`PredictionRecord.to_row`): path, label, probability, (with `min_confidence`)
        whether the model is sure and its verdict, the next k-1 classes, and the error of an unreadable photo."""
        return pd.DataFrame([r.to_row(k, min_confidence is not None) for r in self.records(min_confidence or 0.0)])


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (the avx512_bf16 or amx_bf16 flags of /proc/cpuinfo), where
    PyTorch's bf16 autocast is fast; elsewhere it is emulated and slower than fp32, so never chosen."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxEngine:
    """An ONNX Runtime CPU session on an exported model: float32 NCHW batches in, logits out (see
    `onnx_io.onnx_session` for `threads` and `spin`). `session.run` is thread-safe; concurrent callers are better
    served through a `MicroBatcher`."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None, spin: bool = False):
        from .onnx_io import onnx_session

        try:
            self.session = onnx_session(onnx_path, threads, spin)
        except ImportError as e:
            raise EngineError("the ONNX engine needs `pip install onnxruntime`") from e
        self.path = Path(onnx_path)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def iter_batches(paths: Sequence[str], pre: Preprocessing, max_pixels: int, batch_size: int = 32,
                 workers: int = 2, prefetch: int = 2, pool: concurrent.futures.Executor | None = None,
                 max_aspect: float = MAX_ASPECT) -> Iterator[tuple[list[int], np.ndarray | None, dict]]:
    """Batches of decoded photos `(indices, array, bad)` in input order, decoded in a thread pool that keeps up
    to `prefetch` batches ahead of the consumer (decoding overlaps inference; memory stays bounded).
    `bad` maps the unreadable paths of the batch to the reason; their indices are left out. Pass a long-lived
    `pool` when calling often (threads are then started once), else one of `workers` threads is made here."""
    if pool is None:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="pomona-decode") as own:
            yield from iter_batches(paths, pre, max_pixels, batch_size, workers, prefetch, own, max_aspect)
        return
    transform = create_eval_transform_np(pre)

    def decode(path: str):
        try:
            return transform(load_image(path, max_pixels, pre.resize_size, max_aspect)), None
        except BadImageError as e:
            return None, str(e)

    window = batch_size * (prefetch + 1)
    todo = iter(enumerate(paths))
    pending: deque = deque()

    def fill() -> None:
        while len(pending) < window:
            item = next(todo, None)
            if item is None:
                return
            pending.append((item[0], pool.submit(decode, paths[item[0]])))

    try:
        fill()
        while pending:
            indices, arrays, bad = [], [], {}
            while pending and len(indices) + len(bad) < batch_size:
                i, future = pending.popleft()
                array, reason = future.result()
                if reason is None:
                    indices.append(i)
                    arrays.append(array)
                else:
                    bad[paths[i]] = reason
            fill()
            yield indices, (np.stack(arrays) if arrays else None), bad
    finally:
        for _, future in pending:  # the consumer stopped early: drop what is still queued
            future.cancel()


def predict_paths(fn: Callable[[np.ndarray], np.ndarray], paths: Sequence[str], pre: Preprocessing,
                  num_classes: int, max_pixels: int = 64_000_000, batch_size: int = 32, workers: int = 2,
                  pool: concurrent.futures.Executor | None = None, max_aspect: float = MAX_ASPECT,
                  ) -> tuple[np.ndarray, dict[str, str]]:
    """`fn` (a batch -> probabilities) over every path: probabilities in input order (rows of NaN for unreadable
    photos) and the unreadable ones with reasons."""
    paths = [str(p) for p in paths]
    out = np.full((len(paths), num_classes), np.nan, dtype=np.float32)
    bad: dict[str, str] = {}
    with Progress(total=len(paths), desc="predict", unit="img") as bar:
        for indices, x, batch_bad in iter_batches(paths, pre, max_pixels, batch_size, workers, pool=pool,
                                                      max_aspect=max_aspect):
            if x is not None:
                out[indices] = fn(x)
            bad.update(batch_bad)
            bar.update(len(indices) + len(batch_bad))
    return out, bad


class MicroBatcher:
    """Groups single-photo requests from many threads into one model call: a request waits at most `max_wait_s`
    for others to join, batches hold at most `max_batch`. One worker thread runs the model, so concurrent
    requests never oversubscribe the CPU cores."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 16, max_wait_s: float = 0.002):
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="pomona-batcher", daemon=True)
        self.thread.start()

    def submit(self, x: np.ndarray) -> concurrent.futures.Future:
        """Queue one CHW array; the future resolves to its row of `fn`'s output."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((x, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            items = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(items) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                items.append(nxt)
            try:
                out = self.fn(np.stack([x for x, _ in items]))
            except Exception as e:  # hand the error to every waiting request
                for _, future in items:
                    future.set_exception(e)
                continue
            for row, (_, future) in zip(out, items):
                future.set_result(row)
