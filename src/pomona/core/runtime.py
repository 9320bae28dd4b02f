"""The process's memory allocator: the malloc settings that must be in force before PyTorch starts (the
re-exec of the entry point), and handing freed memory back to the operating system."""

from __future__ import annotations

import os
import sys
from typing import Mapping

# PyTorch on CPU page-faults heavily with glibc's default malloc thresholds: large activations are mmap'ed and
# handed back to the kernel on every free. Measured on 2 cores: Lite0 @224 inference 23 -> 75 img/s with these
# thresholds raised. glibc reads them only at process start, so entry points re-execute themselves once.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"

# Where it is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`), tcmalloc replaces glibc's malloc:
# training in slices of 8 images (model.CPU_MICRO_BATCH) then runs as fast as whole batches of 32 did under
# the thresholds above, and peaks at well under half their memory (benchmarks/memory.py). Its report of every
# allocation over 1 GB (a large decoded-image cache) is silenced.
TCMALLOC = "libtcmalloc_minimal.so.4"
TCMALLOC_SETTINGS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> str | None:
    """The tcmalloc library's file name when the dynamic linker can find it, else None."""
    from ctypes.util import find_library

    found = find_library("tcmalloc_minimal")
    return found if found and found.startswith("libtcmalloc_minimal.so") else None


def malloc_environment(environ: Mapping[str, str], tcmalloc: str | None) -> dict[str, str]:
    """`environ` with the malloc settings pomona runs under: GLIBC_TUNABLES, and `tcmalloc` (a library name or
    path) preloaded unless `environ` already preloads something."""
    env = dict(environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    if tcmalloc and not environ.get("LD_PRELOAD"):
        env.update(TCMALLOC_SETTINGS, LD_PRELOAD=tcmalloc)
    return env


def reexec_with_malloc_tuning(environ: Mapping[str, str], tcmalloc: bool = True) -> None:
    """Re-run this very command line with the malloc settings (`malloc_environment`), unless `environ` (the entry
    point's environment) already has GLIBC_TUNABLES (set by us or the user) or POMONA_NO_REEXEC, or this is not
    glibc Linux. `tcmalloc=False` keeps glibc's malloc (the web server: its freed decode memory must go back to the
    system, which glibc's trim does and tcmalloc does not). Call it early in an entry point, before PyTorch is
    imported; it does not return when it re-executes."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in environ or environ.get("POMONA_NO_REEXEC"):
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, malloc_environment(environ, find_tcmalloc() if tcmalloc else None))
    except OSError:
        pass  # carry on without the setting


def release_memory() -> None:
    """Hand the heap memory this process has freed back to the operating system: tcmalloc's free pages where it
    is the allocator (`malloc_environment`), else glibc's (`malloc_trim`). Under either, freed buffers otherwise
    stay in the process, ready for reuse (which is what makes them fast)."""
    import ctypes

    try:
        process = ctypes.CDLL(None)
    except OSError:
        return
    for release, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        if hasattr(process, release):
            getattr(process, release)(*args)
            return
