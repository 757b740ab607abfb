"""Exact resume: N steps straight == k steps, a fresh process resuming, then N - k steps (identical parameters)."""

import jax
import numpy as np
from train_testutil import config_flags, load_config, run_script, train_losses

from vtfusion_jax import train_lib

N, K = 6, 3
OVERRIDES = dict(
    train__num_steps=N,
    train__log_every_steps=1,
    train__eval_every_steps=-1,
    train__checkpoint_every_steps=100,
)


def test_resume_in_a_fresh_process_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_lib.train_and_evaluate(load_config("tiny", **OVERRIDES), str(straight))

    first = run_script(
        "train.py", "--config=configs/tiny.py", f"--workdir={split}", *config_flags(train__steps_per_run=K, **OVERRIDES)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"stopped (train.steps_per_run) at step {K}" in first.stdout
    second = run_script("train.py", "--config=configs/tiny.py", f"--workdir={split}", *config_flags(**OVERRIDES))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"done at step {N}" in second.stdout
    assert f"Resumed from step {K}" in second.stderr

    # Same losses at every step (steps K+1.. were computed by the resumed process) ...
    a, b = train_losses(str(straight)), train_losses(str(split))
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])
    # ... and bit-identical parameters at the end.
    config = load_config("tiny", **OVERRIDES)
    pa = jax.device_get(train_lib.restore(config, str(straight), "latest")[1])
    pb = jax.device_get(train_lib.restore(config, str(split), "latest")[1])
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)
