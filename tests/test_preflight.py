"""Workdir problems are found when training starts (`pytest -m faults`): an unusable path, a checkpoint of another
model (the error names the differing state paths and config fields), too little free disk for one checkpoint."""

import os

import jax
import numpy as np
import pytest
from train_testutil import load_config

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import optim, preflight, tasks, train_lib

pytestmark = pytest.mark.faults

QUICK = dict(train__num_steps=2, train__log_every_steps=1, train__eval_every_steps=-1, train__checkpoint_every_steps=2)


def test_unusable_workdirs_fail_at_once(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    config = load_config("tiny", **QUICK)
    with pytest.raises(preflight.WorkdirError, match=r"cannot create workdir .*file/run"):
        train_lib.train_and_evaluate(config, str(a_file / "run"))  # a parent is a file: cannot be created
    with pytest.raises(preflight.WorkdirError, match="is not a folder"):
        train_lib.train_and_evaluate(config, str(a_file))
    preflight.check_writable(str(tmp_path / "missing" / "parents" / "run"))  # missing parents are created
    assert (tmp_path / "missing" / "parents" / "run").is_dir()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(preflight.WorkdirError, match="not writable"):
            preflight.check_writable(str(ro))


def _checkpoint_without_training(config, workdir, step: int) -> None:
    """What a run of ``config`` leaves in ``workdir`` at ``step`` (config.json + a checkpoint of the right shapes,
    zeros), without compiling anything."""
    task = tasks.make_task(config)
    tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
    abstract, _ = train_lib.state_layout(task.model, task.init_batch(), tx, task.mesh)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), asynchronous=False)
    ckpt.save(step, zeros, {"step": step})
    ckpt.close()
    train_lib.write_config(config, workdir)


def test_checkpoint_of_another_model_is_refused_naming_paths_and_fields(tmp_path):
    _checkpoint_without_training(load_config("tiny", **QUICK), str(tmp_path), step=2)
    other = load_config("tiny", model__head=dict(load_config("tiny").model.head.to_dict(), hidden_dim=48), **QUICK)
    with pytest.raises(preflight.WorkdirError) as e:
        train_lib.train_and_evaluate(other, str(tmp_path))
    msg = str(e.value)
    assert "checkpoint (step 2) of a different model" in msg
    assert "params/head/" in msg and "float32[32, 32]" in msg and "float32[32, 48]" in msg
    assert "model.head.hidden_dim: 32 -> 48" in msg


def test_too_little_free_disk_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "FREE_BYTES", lambda path: 1 << 20)  # 1 MiB free
    with pytest.raises(preflight.WorkdirError, match=r"not enough free disk for one checkpoint .* MiB free"):
        train_lib.train_and_evaluate(load_config("tiny", **QUICK), str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was trained
