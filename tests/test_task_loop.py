"""The retrieval / captioning training loop (vtfusion_jax/tasks/loop.py): train.nan_policy with train_lib's semantics
("stop" names the step and keeps the last good checkpoint; "skip" leaves params and optimiser state unchanged and
counts the step), and a stop for train.time_limit_seconds says so (stop_reason, log line, train_summary.json).

A tiny caption task on one device; validation is stubbed out (the loop is under test, not the decoder), so each test
compiles only the init and the step."""

import json
import logging
import os
import time

import jax
import numpy as np
import pytest
import train_testutil

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax.tasks import loop
from vtfusion_jax.tasks.caption import CaptionTask
from vtfusion_jax.train_lib import NonFiniteLossError


def tiny_caption_config(**train):
    """configs/sort_of_clevr_caption.py at the smallest size: 8 training images, width 16, one device."""
    c = train_testutil.load_config("sort_of_clevr_caption")
    c.dataset.builder_kwargs = dict(num_train=8, num_validation=4, num_test=4, seed=0)
    c.mesh_shape = (1, 1, 1)
    c.model.width = 16
    c.model.image_encoder = dict(c.model.image_encoder, channels=(4, 8, 8))
    c.model.head = dict(c.model.head, num_layers=1, mlp_dim=32, num_heads=2)
    c.model.fusion = dict(c.model.fusion, name="cross", mlp_dim=32, num_heads=2)
    c.model.prompt_len = 2
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.train.global_batch_size = 4
    c.train.eval_batch_size = 4
    c.eval.beam_size = 2
    defaults = dict(num_steps=3, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=1)
    for key, value in {**defaults, **train}.items():
        c.train[key] = value
    return c


def _task(config, poison_steps=(), sleep_at=None):
    """A CaptionTask whose training images are NaN at ``poison_steps`` (0-based) and validation is a stub."""
    task = CaptionTask(config)
    host_batch = task.host_batch

    def batch(step):
        b = host_batch(step)
        if step in poison_steps:
            b["image"] = np.full_like(b["image"], np.nan)
        if step == sleep_at:
            time.sleep(1.0)
        return b

    task.host_batch = batch
    task.validate = lambda params: {task.main_metric: 0.0}
    return task


def _states(workdir):
    """{step: saved state (nested dicts of numpy arrays)} of every checkpoint in workdir, read from the checkpoints'
    own shape metadata (no model init to compile)."""
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


def test_nan_policy_skip_keeps_params_and_optimizer_state_and_counts(tmp_path):
    config = tiny_caption_config(nan_policy="skip", keep_checkpoints=5)
    task = _task(config, poison_steps=(1,))  # the second step (step 2) sees a NaN batch
    wd = str(tmp_path / "run")
    result = loop.train(config, wd, task)
    assert result["step"] == 3 and result["skipped_steps"] == 1
    assert result["stop_reason"] == "num_steps" and not result["stopped_for_run_limit"]
    rows = {r["step"]: r for r in train_testutil.read_jsonl(os.path.join(wd, "metrics.jsonl")) if "train/skipped" in r}
    assert [rows[s]["train/skipped"] for s in (1, 2, 3)] == [0, 1, 0]
    states = _states(wd)
    assert sorted(states) == [1, 2, 3]
    # the skipped update changed nothing but the step counter; the next one trains again
    assert _equal(states[1]["params"], states[2]["params"]) and _equal(states[1]["opt_state"], states[2]["opt_state"])
    assert not _equal(states[2]["params"], states[3]["params"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[3]["params"]))


def test_nan_policy_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Checkpoints every 2 steps and no per-step logging: step 3's NaN is found one step late (the loop checks the
    # previous step's metrics after dispatching the next), and step 4, NaN as well, must not be saved either.
    config = tiny_caption_config(nan_policy="stop", num_steps=6, checkpoint_every_steps=2, log_every_steps=10)
    task = _task(config, poison_steps=(2,))
    wd = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"at step 3;.*last good checkpoint: step 2 in "):
        loop.train(config, wd, task)
    states = _states(wd)
    assert sorted(states) == [2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[2]["params"]))


def test_nan_policy_is_validated():
    config = tiny_caption_config(nan_policy="ignore")
    with pytest.raises(ValueError, match=r"train.nan_policy 'ignore'"):
        loop.train(config, "/nonexistent/never/created", task=None)


def test_time_limit_stop_says_which_limit(tmp_path, caplog):
    config = tiny_caption_config(num_steps=50, time_limit_seconds=1, log_every_steps=100, checkpoint_every_steps=100)
    task = _task(config, sleep_at=2)  # step 3 starts >= 1 s after the start, whatever the compile time
    wd = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="vtfusion_jax.tasks.loop"):
        result = loop.train(config, wd, task)
    assert 1 <= result["step"] <= 3
    assert result["stop_reason"] == "train.time_limit_seconds" and result["stopped_for_run_limit"]
    with open(os.path.join(wd, "train_summary.json")) as f:
        assert json.load(f)["stop_reason"] == "train.time_limit_seconds"
    text = caplog.text
    assert "train.time_limit_seconds" in text and "steps_per_run" not in text
    assert f"Stopped at step {result['step']} (train.time_limit_seconds)" in text
    ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
    try:
        assert ckpt.all_steps() == [result["step"]]  # validated and saved where it stopped
    finally:
        ckpt.close()
