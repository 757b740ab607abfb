"""Speed switches and measuring helpers that sit outside the model: the persistent compilation cache, a measured
matmul peak for MFU, and the host facts (load average, CPU, versions) every benchmark records.

In-model switches live with the model (``scan_layers``, ``remat_policy``, ``dtype``, ``attention_impl``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def enable_compilation_cache(cache_dir: str, min_compile_time_s: float = 0.0) -> None:
    """Turns on jax's persistent compilation cache in ``cache_dir`` (local or gs://; call before the first jit);
    programs that compiled in under ``min_compile_time_s`` are not written."""
    if not cache_dir.startswith("gs://"):
        os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def matmul_peak(dtype: Any = jnp.float32, n: int = 2048, inner: int = 8, reps: int = 5) -> dict:
    """The FLOP/s MFU is measured against: one jitted chain of ``inner`` [n, n] matmuls in ``dtype`` on the default
    device, best of ``reps`` runs. Returns {"flops_per_s" (best), "median_flops_per_s", "n", "dtype", "inner"}."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    # Scaled so that repeated products keep unit-size entries in any dtype.
    b = (jax.random.normal(k2, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, inner, lambda _, y: (y @ w).astype(dtype), x)

    jax.block_until_ready(chain(a, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(a, b))
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3 * inner
    return {
        "flops_per_s": flops / min(times),
        "median_flops_per_s": flops / float(np.median(times)),
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "inner": inner,
    }


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where /proc/loadavg does not exist)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def wait_for_quiet(threshold: float = 1.5, poll_s: float = 60.0, max_wait_s: float = 1200.0) -> dict:
    """Waits (up to ``max_wait_s``) until the 1-minute load average is at most ``threshold``.

    Returns:
      {"waited_s", "quiet": whether the threshold was reached, "loadavg_start", "loadavg": when it returned}.
    """
    start, first = time.time(), loadavg()
    while True:
        now = loadavg()
        if now is None or now[0] <= threshold:
            return {"waited_s": time.time() - start, "quiet": True, "loadavg_start": first, "loadavg": now}
        if time.time() - start >= max_wait_s:
            return {"waited_s": time.time() - start, "quiet": False, "loadavg_start": first, "loadavg": now}
        time.sleep(poll_s)


_ISA_ORDER = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))  # widest first


def cpu_identity(cpuinfo: str) -> dict:
    """The CPU of a /proc/cpuinfo text: model name, vendor, family, model and the widest float SIMD it offers (cloud
    VMs often mask the model name, so hosts are told apart by all of them)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in _ISA_ORDER if flag in flags), "")
    return {
        "cpu": fields.get("model name", ""),
        "cpu_vendor": fields.get("vendor_id", ""),
        "cpu_family": fields.get("cpu family", ""),
        "cpu_model": fields.get("model", ""),
        "cpu_isa": isa,
    }


def host_info() -> dict:
    """Backend, devices, CPU (name, family, model, widest SIMD) and thread count, library versions."""
    cpu = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            found = cpu_identity(f.read())
        cpu = {**found, "cpu": found["cpu"] or cpu["cpu"]}
    except OSError:
        pass
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        **cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
    }


def provenance(command: str) -> dict:
    """What every run summary under results/ records (DESIGN convention 10): {"git_commit": HEAD or None outside a
    checkout, "git_dirty": tracked files outside results/ (earlier runs' outputs) differ from HEAD, "command" (the
    exact command line), "time", "host"}."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or None
    return {
        "git_commit": commit,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"))
        if commit
        else None,
        "command": command,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": host_info(),
    }


def emit_result(result: dict, out: str = "") -> dict:
    """Prints a benchmark's JSON result and, when ``out`` is given, also writes it there (folders created)."""
    text = json.dumps(result, indent=1, default=float)
    print(text, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return result
