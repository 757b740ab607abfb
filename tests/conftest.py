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


# Scheduling only (no test depends on the order of files): the most expensive files first, so that the two workers of
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (the README's test command) start with the long end-to-end
# files and the many short files fill in at the end, instead of one worker finishing a long file alone. `loadfile`
# keeps each file on one worker, so module-scoped fixtures (e.g. test_eval_lib's smoke run) and functools caches
# run once. Files not listed keep their collection order after these.
_EXPENSIVE_FILES_FIRST = (
    "test_multiprocess.py",
    "test_sharding.py",
    "test_eval_lib.py",
    "test_report.py",
    "test_fusion.py",
    "test_faults.py",
    "test_tasks.py",
    "test_train_lib.py",
    "test_notebook.py",
    "test_train_resume.py",
    "test_benchmarks.py",
    "test_pretrained_init.py",
    "test_numerics.py",
    "test_viz.py",
    "test_data_grouped.py",
    "test_layers.py",
    "test_speed_switches.py",
    "test_models.py",
    "test_encoders.py",
    "test_flops.py",
    "test_optim.py",
    "test_pretrained.py",
    "test_caption.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_EXPENSIVE_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
