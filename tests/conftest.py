"""Test setup: every test sees 8 CPU devices (set before jax is imported anywhere)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Unoptimised LLVM code generation (train_testutil.XLA_TEST_FLAGS): tiny test programs compile ~8x faster. Set here,
# before any test module can start the CPU backend at import, so every in-process program is compiled like the
# train.py subprocesses the exact-resume / chaos tests compare against (optimisation levels differ in FMA
# contraction, i.e. in the last bit of a loss).
if "--xla_backend_optimization_level=0" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
