"""The one training loop (train_lib.train_and_evaluate), for every task: train.nan_policy ("stop" names the step and
keeps the last good checkpoint; "skip" leaves params and optimiser state unchanged and counts the step), SIGTERM
(preemption) saves the current step and exits 0 and the next run continues, train.time_limit_seconds validates,
saves and says which limit stopped it. The step is the one make_train_step builds for any task's loss.
train.profile_steps writes a jax.profiler trace and train.compilation_cache_dir fills jax's persistent cache (checked
in the nan_policy="skip" run, which needs no training of its own)."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testutil import REPO, config_flags, load_config, read_jsonl, subprocess_env

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import train_lib
from vtfusion_jax.data import pipeline


class _PoisonedIterator:
    """Wraps a TrainIterator; the batch of step index `bad` gets NaN images (a corrupt record)."""

    def __init__(self, inner, bad: int = -1, sleep_at: int = -1):
        self.inner, self.bad, self.sleep_at = inner, bad, sleep_at

    def __next__(self):
        index = self.inner.step
        batch = next(self.inner)
        if index == self.bad:
            batch = dict(batch, image=batch["image"] * np.nan)
        if index == self.sleep_at:
            time.sleep(1.0)
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    make = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, "make_train_iterator", lambda **kw: _PoisonedIterator(make(**kw), bad=5))
    config = load_config(
        "tiny",
        train__num_steps=10,
        train__checkpoint_every_steps=2,
        train__eval_every_steps=-1,
        train__log_every_steps=1,
    )
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 6\b.*last good checkpoint: step 4"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [2, 4]  # step 6 (the NaN update) was never saved
    ckpt.close()
    params = jax.device_get(train_lib.restore(config, str(tmp_path), "latest")[1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_sigterm_saves_exits_zero_and_the_next_run_continues(tmp_path):
    flags = config_flags(
        train__num_steps=100000,
        train__log_every_steps=1,
        train__eval_every_steps=-1,
        train__checkpoint_every_steps=100000,
    )
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py", f"--workdir={tmp_path}", *flags],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(str(metrics))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"stopped \(preempted\) at step (\d+)", out).group(1))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    assert ckpt.latest_step() == stopped >= 3
    ckpt.close()
    logged = max(r["step"] for r in read_jsonl(str(metrics)))
    assert logged == stopped  # the checkpoint is at the step training had reached

    # The next run (in this process: a second train.py would add seconds of imports; the exit-code contract is the
    # preempted process's above) continues from the saved step.
    again = train_lib.train_and_evaluate(
        load_config("tiny", train__num_steps=stopped + 2, train__log_every_steps=1, train__eval_every_steps=-1),
        str(tmp_path),
    )
    assert again["step"] == stopped + 2 and not again["preempted"] and again["stop_reason"] == "num_steps"
    steps = [r["step"] for r in read_jsonl(str(metrics))]
    assert steps[-2:] == [stopped + 1, stopped + 2]


def _states(workdir):
    """{step: saved state (numpy)} of every checkpoint in workdir, read from the checkpoints' own metadata."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        out = {}
        for s in ckpt.all_steps():
            meta = ckpt.state_metadata(s)
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
            out[s] = jax.device_get(ckpt.restore(s, abstract)[0])
        return out
    finally:
        ckpt.close()


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_nan_policy_skip_keeps_params_and_optimizer_state_and_counts(tmp_path, monkeypatch):
    make = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, "make_train_iterator", lambda **kw: _PoisonedIterator(make(**kw), bad=1))
    kw = dict(train__checkpoint_every_steps=1, train__eval_every_steps=0, train__log_every_steps=1)
    config = load_config("tiny", train__num_steps=3, train__nan_policy="skip", train__keep_checkpoints=5, **kw)
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 3 and result["skipped_steps"] == 1 and result["stop_reason"] == "num_steps"
    rows = {r["step"]: r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/skipped" in r}
    assert [rows[s]["train/skipped"] for s in (1, 2, 3)] == [0, 1, 0]
    states = _states(str(tmp_path))
    assert sorted(states) == [1, 2, 3]
    # the skipped update changed nothing but the step counter; the next one trains again
    assert _equal(states[1]["params"], states[2]["params"]) and _equal(states[1]["opt_state"], states[2]["opt_state"])
    assert not _equal(states[2]["params"], states[3]["params"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[3]["params"]))


@pytest.mark.slow  # a fresh compilation cache: every program compiles (~20 s)
def test_profile_steps_and_compilation_cache_dir(tmp_path):
    """train.py with the run-time tools (in a subprocess: the profiler and the process-wide cache stay out of the
    test worker): a jax.profiler trace of step 2 that TensorBoard's profile plugin reads, and jax's persistent
    compilation cache in the configured folder."""
    cache, workdir = tmp_path / "xla_cache", tmp_path / "run"
    flags = config_flags(train__num_steps=2, train__eval_every_steps=0, train__checkpoint_every_steps=100,
                         train__profile_steps="2,2", train__compilation_cache_dir=str(cache))  # fmt: skip
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert os.listdir(cache)  # the run's programs went to the configured cache


def test_time_limit_stop_says_which_limit(tmp_path, caplog, monkeypatch):
    make = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, "make_train_iterator", lambda **kw: _PoisonedIterator(make(**kw), sleep_at=2))
    config = load_config("tiny", train__num_steps=50, train__time_limit_seconds=1, train__log_every_steps=100,
                         train__checkpoint_every_steps=100, train__eval_every_steps=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vtfusion_jax.train_lib"):
        result = train_lib.train_and_evaluate(config, str(tmp_path))  # step 3 starts >= 1 s after the start
    assert 1 <= result["step"] <= 3
    assert result["stop_reason"] == "train.time_limit_seconds" and result["stopped_for_run_limit"]
    with open(tmp_path / "train_summary.json") as f:
        assert json.load(f)["stop_reason"] == "train.time_limit_seconds"
    assert f"Stopped at step {result['step']} (train.time_limit_seconds)" in caplog.text
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    try:
        assert ckpt.all_steps() == [result["step"]] and ckpt.metrics(result["step"])  # validated and saved there
    finally:
        ckpt.close()


def test_make_train_step_is_the_gradient_step_of_any_loss():
    """One SGD step of make_train_step on a quadratic equals p - lr * grad; aux metrics and grad_norm come back."""
    import optax

    loss_fn = lambda p, b, rng: (jnp.sum((p["w"] - b["x"]) ** 2), {"aux": jnp.sum(p["w"])})  # noqa: E731
    tx = optax.sgd(0.1)
    p = {"w": jnp.arange(3.0)}
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0))
    new, m = jax.jit(train_lib.make_train_step(loss_fn, tx))(state, {"x": jnp.ones(3)})
    grad = 2 * (p["w"] - 1)
    np.testing.assert_allclose(new.params["w"], p["w"] - 0.1 * grad, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], jnp.linalg.norm(grad), rtol=1e-6)
    assert int(new.step) == 1 and float(m["aux"]) == 3.0 and int(m["skipped"]) == 0


@pytest.mark.slow  # ~40 s: three short training runs
def test_ema_resumes_bit_exact_and_is_what_restore_returns(tmp_path):
    """optim.ema_decay > 0: the average is checkpointed with the optimiser state, so 2 + 2 resumed steps end with
    the same average, bit for bit, as 4 straight ones; restore() (eval, predict) returns it, not the raw params."""
    kw = dict(
        optim__ema_decay=0.5, train__checkpoint_every_steps=2, train__eval_every_steps=0, train__progress_bar=False
    )
    train_lib.train_and_evaluate(load_config("tiny", train__num_steps=4, **kw), str(tmp_path / "straight"))
    for steps in (2, 4):
        train_lib.train_and_evaluate(load_config("tiny", train__num_steps=steps, **kw), str(tmp_path / "resumed"))
    config = load_config("tiny", train__num_steps=4, **kw)
    (task, ema, step), (_, ema2, _) = (
        train_lib.restore(config, str(tmp_path / w), "latest") for w in ("straight", "resumed")
    )
    assert step == 4
    jax.tree.map(np.testing.assert_array_equal, ema, ema2)
    tx, _ = train_lib.make_optimizer(config, task, 1)
    target, _ = train_lib.state_layout(task.model, task.init_batch(), tx, task.mesh)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "straight" / "checkpoints"), read_only=True)
    raw = ckpt.restore_readable(target, "latest")[1]
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, ema, train_lib.optim.ema_params(raw.opt_state))
    assert not np.array_equal(jax.tree.leaves(ema)[0], jax.tree.leaves(raw.params)[0])
