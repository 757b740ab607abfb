"""Failure handling: a planted NaN stops training with the step named and the last good checkpoint intact;
SIGTERM (preemption) saves the current step and exits 0, and the next run continues from there."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_testutil import REPO, config_flags, load_config, read_jsonl, subprocess_env

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import eval_lib, train_lib
from vtfusion_jax.data import pipeline


class _PoisonedIterator:
    """Wraps a TrainIterator; the batch of step index `bad` gets NaN images (a corrupt record)."""

    def __init__(self, inner, bad: int):
        self.inner, self.bad = inner, bad

    def __next__(self):
        index = self.inner.step
        batch = next(self.inner)
        if index == self.bad:
            batch = dict(batch, image=batch["image"] * np.nan)
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
    params = jax.device_get(eval_lib.Restored(config, str(tmp_path), "latest").params)
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
    assert "preempted at step" in out
    stopped = int(re.search(r"preempted at step (\d+)", out).group(1))
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
    assert again["step"] == stopped + 2 and not again["preempted"]
    steps = [r["step"] for r in read_jsonl(str(metrics))]
    assert steps[-2:] == [stopped + 1, stopped + 2]
