"""Progress of long loops, for a person or for a log.

On a terminal (stdout is a TTY) a tqdm bar; otherwise -- output redirected to a file, a CI log, nohup -- one
plain line about every `INTERVAL_S` seconds on stderr, e.g. `epoch 3/10: 120/400 batch, 85.1 img/s, ETA 0:01:05`
(stderr, so that a command's own output, such as `pomona predict --format json`, stays clean). Every long loop
of pomona (training and validation epochs, decoding, feature extraction, prediction, balancing, downloads) goes
through `Progress`; `write` prints a message without breaking a bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable

INTERVAL_S = 30.0
"""Seconds between two plain progress lines."""


def write(message: str) -> None:
    """Print a line to stdout (above a running bar, if any)."""
    from tqdm.auto import tqdm

    tqdm.write(message)
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Wrap an iterable (or call `update`) to show progress.

    `count(item)` says how many images an item holds (e.g. a batch), for the img/s figure; without it, items/s.
    `enabled=False` shows nothing (e.g. on the other ranks of a distributed run)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", count: Callable[[Any], int] | None = None, enabled: bool = True,
                 interval: float | None = None, unit_scale: bool = False):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.count = total, desc, unit, count
        self.interval = INTERVAL_S if interval is None else interval
        self.done = self.items = 0
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0, file=sys.stderr,
                            unit_scale=unit_scale)
        self.enabled = enabled

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1, self.count(item) if self.count else None)
        self.close()

    def update(self, n: int = 1, items: int | None = None) -> None:
        self.done += n
        self.items += n if items is None else items
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        """The plain progress line: done/total, speed and time left."""
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        what = "img" if self.count or self.unit == "img" else self.unit
        text = f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}, " \
               f"{self.items / elapsed:.1f} {what}/s"
        if self.total and self.done:
            text += f", ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
