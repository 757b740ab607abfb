"""Numerics (`pytest -m faults`): train.nan_policy="skip" skips a poisoned update and counts it; the same seed gives
identical metrics; bfloat16 training of the easy-VQA model stays finite. ("stop", the default, is tested in
test_train_lib.py.)"""

import jax
import numpy as np
import pytest
from test_train_lib import _PoisonedIterator
from train_testutil import load_config, read_jsonl

from vtfusion_jax import train_lib
from vtfusion_jax.data import pipeline

pytestmark = pytest.mark.faults

# One device: single-device programs compile several times faster than 8-way SPMD ones, and these properties do
# not depend on the mesh (test_sharding.py covers mesh equivalence).
QUICK = dict(
    mesh_shape=(1, 1, 1), train__log_every_steps=1, train__eval_every_steps=-1, train__checkpoint_every_steps=100
)
TIMING = ("train/steps_per_sec", "train/examples_per_sec")


def test_nan_policy_skip_skips_and_counts_the_bad_update_and_same_seed_repeats(tmp_path, monkeypatch):
    """Two runs, same seed: a NaN batch at step 3 is skipped and counted in both, and every logged metric is equal
    (one test for both claims: the second run reuses the first one's compiled programs)."""
    make = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, "make_train_iterator", lambda **kw: _PoisonedIterator(make(**kw), bad=2))
    config = load_config("tiny", train__num_steps=6, train__nan_policy="skip", **QUICK)
    runs = []
    for name in ("a", "b"):
        result = train_lib.train_and_evaluate(config, str(tmp_path / name))
        assert result["step"] == 6 and result["skipped_steps"] == 1
        rows = read_jsonl(str(tmp_path / name / "metrics.jsonl"))
        runs.append([{k: v for k, v in r.items() if k not in TIMING} for r in rows])
    rows = {r["step"]: r for r in runs[0]}
    assert [rows[s]["train/skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]  # step 3 saw the NaN batch
    assert rows[3]["train/loss"] == "nan"  # nothing left to average in that log window
    assert all(np.isfinite(rows[s]["train/loss"]) for s in (1, 2, 4, 5, 6))
    assert runs[0] == runs[1]  # same seed, same metrics
    params = jax.device_get(train_lib.restore(config, str(tmp_path / "a"), "latest")[1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nan_policy_is_validated():
    config = load_config("tiny", train__nan_policy="ignore", **QUICK)
    with pytest.raises(ValueError, match=r"train.nan_policy 'ignore'.*'skip'.*'stop'"):
        train_lib.train_and_evaluate(config, "/nonexistent/never/created")


def test_bfloat16_easy_vqa_model_stays_finite(tmp_path):
    # Plain batches of 16 (image-grouped batches, when the config has them, need one image's questions per batch).
    grouped = dict(train__images_per_batch=0) if "images_per_batch" in load_config("easy_vqa").train else {}
    config = load_config(
        "easy_vqa",
        **grouped,
        mesh_shape=(1, 1, 1),
        model__dtype="bfloat16",
        train__num_steps=4,
        train__global_batch_size=16,
        train__log_every_steps=1,
        train__eval_every_steps=-1,
        train__checkpoint_every_steps=100,
        train__progress_bar=False,
    )
    train_lib.train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows]
    assert len(losses) == 4 and all(isinstance(x, float) and np.isfinite(x) for x in losses), losses
    assert all(np.isfinite(r["train/grad_norm"]) for r in rows)
