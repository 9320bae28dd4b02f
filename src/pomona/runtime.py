"""Process-level settings that must be in force before PyTorch starts."""

from __future__ import annotations

import os
import sys

# PyTorch on CPU page-faults heavily with glibc's default malloc thresholds: large activations are mmap'ed and
# handed back to the kernel on every free. Measured on 2 cores: Lite0 @224 inference 23 -> 75 img/s with these
# thresholds raised. glibc reads them only at process start, so entry points re-execute themselves once.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def reexec_with_malloc_tuning(environ: dict | None = None) -> None:
    """Re-run this very command line with GLIBC_TUNABLES set, unless it is already set (by us or the user) or
    this is not glibc Linux. Call it first thing in an entry point; it does not return when it re-executes."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in environ or environ.get("POMONA_NO_REEXEC"):
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, dict(environ, GLIBC_TUNABLES=MALLOC_TUNABLES))
    except OSError:
        pass  # carry on without the setting
