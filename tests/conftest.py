"""Test setup: every test sees 8 CPU devices (set before jax is imported anywhere)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The test compiler flags (train_testutil.XLA_TEST_FLAGS: unoptimised code generation, ~2-8x faster compiles of the
# tiny test programs), set before any test module can start the CPU backend at import, so every in-process program
# is compiled like the train.py subprocesses the exact-resume / chaos tests compare against (compiler settings differ
# in FMA contraction, i.e. in the last bit of a loss). train_testutil imports jax but does not start a backend.
import train_testutil  # noqa: E402,F401  (appends XLA_TEST_FLAGS to XLA_FLAGS)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

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
    # The slow tier (@pytest.mark.slow) is left out of a plain `pytest` (the whole suite, no -m): it runs with
    # `pytest -m slow`, or when its file or test is named on the command line.
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.markexpr:
        slow = [item for item in items if item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
