"""Process-level settings that must be in force before PyTorch starts."""

from __future__ import annotations

import os
import sys
from typing import Mapping

# PyTorch on CPU page-faults heavily with glibc's default malloc thresholds: large activations are mmap'ed and
# handed back to the kernel on every free. Measured on 2 cores: Lite0 @224 inference 23 -> 75 img/s with these
# thresholds raised. glibc reads them only at process start, so entry points re-execute themselves once.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def reexec_with_malloc_tuning(environ: Mapping[str, str]) -> None:
    """Re-run this very command line with GLIBC_TUNABLES set, unless `environ` (the entry point's environment)
    already has it (set by us or the user) or POMONA_NO_REEXEC, or this is not glibc Linux. Call it early in an
    entry point, before PyTorch is imported; it does not return when it re-executes."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in environ or environ.get("POMONA_NO_REEXEC"):
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, dict(environ, GLIBC_TUNABLES=MALLOC_TUNABLES))
    except OSError:
        pass  # carry on without the setting
