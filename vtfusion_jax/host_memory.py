"""Keeps freed host memory for reuse, so that XLA:CPU's per-step buffers are not mapped and page-faulted anew.

On the CPU backend every execution of a compiled step allocates its temporary buffer (675 MiB for the shared
benchmark model of configs/perf.py) with malloc and frees it at the end. glibc serves blocks that large with a fresh
``mmap`` and returns them with ``munmap``, so each step touches ~170,000 new 4 KiB pages: the kernel faults and
zeroes every one of them (~178,000 minor page faults per step for that model; tests/test_linear.py checks that the
options below remove them, and benchmarks/profile_step.py reports the count per step).

``reuse_freed_memory()`` sets three glibc malloc options (``mallopt``): one arena (M_ARENA_MAX=1, so that every thread
allocates from the main heap), no mmap for large blocks (M_MMAP_MAX=0: they come from the heap) and no trimming of
the heap top below 2 GiB (M_TRIM_THRESHOLD). The buffer freed at the end of a step is then reused by the next step:
0 page faults per step. The cost: the process keeps its peak heap (it was going to need it again next step) and all
threads share one malloc arena (small allocations still go through glibc's per-thread cache).

It must run before jax starts its backend (XLA's threads pick their malloc arena when they start; measured: called
after ``jax.default_backend()`` it changes nothing): the entry points (train.py, eval.py, and every CPU
benchmark through ``bench_args.prepare`` in benchmarks/) call it first thing, when jax will run on the CPU (on GPU/TPU
the step's buffers live on the device). ``VTFUSION_REUSE_HOST_MEMORY=0`` turns it off. It is a no-op where
glibc is not the C library (macOS, musl). Stdlib only: importing this module does not import jax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

# glibc <malloc.h> parameter numbers for mallopt().
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV_SWITCH = "VTFUSION_REUSE_HOST_MEMORY"
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept before glibc returns memory to the OS (mallopt takes an int)

_applied: dict | None = None


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return None  # not glibc
    return libc, version


def reuse_freed_memory(force: bool = False) -> dict:
    """Applies the malloc options above once per process; returns what it did.

    Args:
      force: apply even when ``VTFUSION_REUSE_HOST_MEMORY=0`` (tests).

    Returns:
      {"applied": bool, "reason": str, "glibc": version or None}.
    """
    global _applied
    if _applied is not None:
        return _applied
    if not force and os.environ.get(ENV_SWITCH, "1") == "0":
        _applied = {"applied": False, "reason": f"{ENV_SWITCH}=0", "glibc": None}
        return _applied
    found = _glibc()
    if found is None:
        _applied = {"applied": False, "reason": "the C library is not glibc", "glibc": None}
        return _applied
    libc, version = found
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    )
    _applied = {"applied": ok, "reason": "mallopt" if ok else "mallopt refused a parameter", "glibc": version}
    return _applied


# Accelerator plugins whose presence means jax's default backend is not the CPU.
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def cpu_backend_expected() -> tuple[bool, str]:
    """Whether jax will run on the CPU, decided WITHOUT starting a backend (starting one creates XLA's threads, whose
    malloc arenas are then fixed): JAX_PLATFORMS when set, else whether an accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        first = platforms.split(",")[0].strip().lower()
        return first == "cpu", f"JAX_PLATFORMS={platforms}"
    for name in ACCELERATOR_MODULES:
        if importlib.util.find_spec(name) is not None:
            return False, f"accelerator plugin {name} installed"
    return True, "no accelerator plugin installed"


def reuse_freed_memory_on_cpu() -> dict:
    """``reuse_freed_memory()`` when jax will run on the CPU (``cpu_backend_expected``). Call it before anything
    starts a jax backend (``jax.devices()``, a first jit): XLA's pool threads take their malloc arena when they start,
    and the option only helps threads that allocate from the main one."""
    cpu, why = cpu_backend_expected()
    if not cpu:
        return {"applied": False, "reason": f"{why}: step buffers live on the device", "glibc": None}
    return reuse_freed_memory()
