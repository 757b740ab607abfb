"""Fault injection (`pytest -m faults`): SIGKILL anywhere, partial checkpoints, a half-written metrics line.

The suite runs the chaos loop of scripts/chaos_kill.py with 2 kills (one the instant a checkpoint write starts, one
at a random moment) to stay within the suite's time budget; `python scripts/chaos_kill.py --kills=10` does >= 10,
and its figures are archived in results/archive/reliability/.
"""

import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testutil import DATA_DIR, REPO, load_config, subprocess_env

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import metrics as metrics_lib
from vtfusion_jax import train_lib

pytestmark = pytest.mark.faults


def _chaos_module():
    spec = importlib.util.spec_from_file_location("chaos_kill", os.path.join(REPO, "scripts", "chaos_kill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the default tier resumes exactly in test_train_resume
def test_sigkill_anywhere_resumes_to_bit_identical_params(tmp_path):
    chaos = _chaos_module()
    # One device: Orbax writes one shard per array, so a save takes milliseconds and most of the time goes to the
    # subprocesses' start-up. The mesh equivalence itself is tested in test_sharding.py.
    overrides = dict(chaos.CHAOS_OVERRIDES, train__num_steps=8, mesh_shape="(1,1,1)")
    config = load_config("tiny", **dict(overrides, mesh_shape=(1, 1, 1)))
    reference = tmp_path / "reference"
    train_lib.train_and_evaluate(config, str(reference))  # in-process: also fills the compilation cache
    report = chaos.chaos(
        str(tmp_path),
        DATA_DIR,
        config,
        kills=2,
        seed=1,
        env=subprocess_env(),
        overrides=overrides,
        reference=str(reference),
        kinds=("save", "random"),
    )
    assert report["ok"], report
    assert report["kills_survived"] == 2 and report["params_bit_identical"]
    assert report["kills_mid_checkpoint_write"] >= 1, report["kills"]  # the "save" kill caught a write in flight


def _tree(v: float) -> dict:
    return {"w": jnp.full((4, 3), v, jnp.float32), "step": jnp.asarray(int(v), jnp.int32)}


def test_partial_checkpoints_are_never_listed_and_are_cleaned_up(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpt = ckpt_lib.Checkpointer(str(folder), keep=2, asynchronous=False)
    for step in (1, 2, 3):
        ckpt.save(step, _tree(step), {"step": step})
    ckpt.close()
    # Retention renamed step 1 into the trash folder and emptied it: no half-deleted step can remain named "1".
    assert sorted(os.listdir(folder)) == ["2", "3", ckpt_lib.TRASH]
    assert os.listdir(folder / ckpt_lib.TRASH) == []

    # What a SIGKILL can leave behind: a write in progress (Orbax's temporary name) and a deletion in progress.
    shutil.copytree(folder / "3", folder / "4.orbax-checkpoint-tmp")
    os.remove(next(p for p in (folder / "4.orbax-checkpoint-tmp").rglob("*") if p.is_file()))
    shutil.copytree(folder / "2", folder / ckpt_lib.TRASH / "1")
    reader = ckpt_lib.Checkpointer(str(folder), read_only=True)
    assert reader.all_steps() == [2, 3] and reader.latest_step() == 3  # neither leftover is a checkpoint
    reader.close()

    ckpt = ckpt_lib.Checkpointer(str(folder), keep=2, asynchronous=False)  # what the next run does
    assert ckpt.latest_step() == 3
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0))
    state, data = ckpt.restore(3, abstract)
    np.testing.assert_array_equal(state["w"], np.full((4, 3), 3.0))
    assert int(state["step"]) == 3 and data == {"step": 3}  # the data-iterator state saved with step 3
    ckpt.close()
    assert sorted(os.listdir(folder)) == ["2", "3", ckpt_lib.TRASH]  # leftovers removed
    assert os.listdir(folder / ckpt_lib.TRASH) == []


def test_metrics_jsonl_drops_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # killed mid-append
    writer = metrics_lib.JsonlWriter(str(path))
    writer.write_scalars(2, {"train/loss": 1.5})
    writer.flush()
    assert metrics_lib.read_jsonl(str(path)) == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
