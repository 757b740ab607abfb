"""Keeps freed host memory for reuse, so that XLA:CPU's per-step buffers are not mapped and page-faulted anew.

Every CPU step mallocs and frees a large temporary buffer, which glibc maps and unmaps afresh, so the kernel faults
and zeroes its pages each step. ``reuse_freed_memory()`` sets glibc ``mallopt`` options (one arena, no mmap for large
blocks, no heap trimming below M_TRIM_THRESHOLD) so the next step reuses the freed buffer; the process keeps its
peak heap. It must run before jax starts its backend (XLA's threads pick their arena at start); the entry points and
CPU benchmarks call it first. ``VTFUSION_REUSE_HOST_MEMORY=0`` turns it off; a no-op without glibc. Stdlib only.
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
    """Applies the malloc options above once per process (``force``: even when ``VTFUSION_REUSE_HOST_MEMORY=0``,
    tests); returns what it did: {"applied": bool, "reason": str, "glibc": version or None}."""
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
