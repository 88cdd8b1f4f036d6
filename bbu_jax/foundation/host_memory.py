"""glibc malloc settings for training on the CPU. Import and call before jax: no jax import here.

XLA:CPU allocates each execution's temporaries afresh; glibc serves blocks that large with mmap
and unmaps them on free, so every step page-faults all of them in again. With one arena, no mmap
and no trimming, freed memory stays in the heap and the next step reuses it (the page faults and
step times with and without are in benchmarks/RESULTS.md). It must run before XLA starts its
threads (each thread would get its own arena); on accelerator hosts it is skipped, their
temporaries live on the device.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/kfd", "/dev/accel0")  # NVIDIA, ROCm, TPU


def cpu_only_host(environ=os.environ) -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says only cpu, or no accelerator device."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not any(os.path.exists(d) for d in ACCELERATOR_DEVICES)


def keep_freed_memory() -> bool:
    """One malloc arena, no mmap, never trim (on glibc, CPU-only hosts); True if applied."""
    if not cpu_only_host():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS)
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(key, value) == 1 for key, value in settings)
