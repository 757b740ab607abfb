"""Shared helpers for the training tests (test_train_*.py, test_sharding.py, test_eval_lib.py).

* One easy-VQA TFDS build per test session, in a temporary folder (about 6 s; never the user's ~/tensorflow_datasets).
* A persistent XLA compilation cache for the session, shared with subprocesses, so that the identical tiny
  programs compiled by several tests (and by train.py subprocesses) compile once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SESSION_DIR = tempfile.mkdtemp(prefix="vtfusion_train_tests_")
DATA_DIR = os.path.join(_SESSION_DIR, "tfds")
CACHE_DIR = os.path.join(_SESSION_DIR, "xla_cache")


def _xla_test_flags() -> str:
    """Compiler flags for the tests: they compile hundreds of tiny programs that run for milliseconds.

    * --xla_backend_optimization_level=0: unoptimised LLVM code generation (an init: 18 s -> 2 s).
    * --xla_cpu_use_fusion_emitters=false: XLA's older elemental fusion emitters, which compile ~2.5x faster than
      the MLIR fusion emitters (a whole-model forward-over-reverse program: 6.2 s -> 2.5 s; tests/test_models.py
      182 s -> 89 s). The flag is dropped where this XLA does not know it (an unknown XLA flag aborts the process),
      probed once in a subprocess.
    """
    flags = ["--xla_backend_optimization_level=0"]
    probe = "--xla_cpu_use_fusion_emitters=false"
    env = dict(os.environ, XLA_FLAGS=probe, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True).returncode
    return " ".join(flags + [probe] * (ok == 0))


XLA_TEST_FLAGS = os.environ.get("VTFUSION_XLA_TEST_FLAGS") or _xla_test_flags()
os.environ["VTFUSION_XLA_TEST_FLAGS"] = XLA_TEST_FLAGS  # subprocesses and xdist workers skip the probe
if XLA_TEST_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_TEST_FLAGS).strip()
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_config(name: str = "tiny", arg: str | None = None, **overrides):
    """configs/<name>.py with the session data folder and dotted-key ``overrides`` ("train__num_steps" style)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.dataset.data_dir = DATA_DIR
    for key, value in overrides.items():
        node = config
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir: str) -> dict[int, float]:
    """{step: train/loss} from workdir/metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}


def subprocess_env(optimized: bool = False) -> dict:
    """Environment for train.py / eval.py / predict.py subprocesses (``optimized``: full XLA optimisation, for
    runs whose execution time matters more than their compile time)."""
    env = dict(os.environ)
    if optimized:
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(XLA_TEST_FLAGS, "").strip()
    env.update(
        JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def config_flags(**overrides) -> list[str]:
    """--config.a.b=v command-line overrides (keys with "__" for dots); the session data folder is always set."""
    flags = [f"--config.dataset.data_dir={DATA_DIR}"]
    for key, value in overrides.items():
        flags.append(f"--config.{key.replace('__', '.')}={value}")
    return flags


def run_script(
    script: str, *args: str, timeout: float = 240, optimized: bool = False, **popen
) -> subprocess.CompletedProcess:
    """Runs ``python <repo>/<script> args`` and returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args],
        cwd=REPO,
        env=subprocess_env(optimized),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
