"""Input pipeline: epoch permutations, determinism, exact resume, process slices, sharding, eval coverage, crops."""

import json
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from vtfusion_jax import sharding
from vtfusion_jax.data import datasets, pipeline
from vtfusion_jax.data.tokenizer import Tokenizer

KW = dict(num_train=5, num_validation=1, num_test=2, seed=0)  # 100 / 20 / 40 questions
B = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("pipeline"))
    datasets.get_builder("sort_of_clevr", data_dir=data_dir, builder_kwargs=KW)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    return dict(data_dir=data_dir, builder_kwargs=KW, mesh=mesh, tokenizer=Tokenizer(max_len=24))


def _train(env, **kw):
    args = dict(dataset="sort_of_clevr", split="train", global_batch_size=B, seed=1, mesh=env["mesh"],
                tokenizer=env["tokenizer"], data_dir=env["data_dir"], builder_kwargs=env["builder_kwargs"])  # fmt: skip
    return pipeline.make_train_iterator(**{**args, **kw})


def _reader(env, rows=slice(0, B), **kw):
    args = dict(dataset="sort_of_clevr", split="train", global_batch_size=B, seed=1, tokenizer=env["tokenizer"],
                rows=rows, data_dir=env["data_dir"], builder_kwargs=env["builder_kwargs"])  # fmt: skip
    return pipeline.BatchReader(**{**args, **kw})


def _host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_epochs_are_permutations_and_seeded():
    n, b = 100, 32
    stream = np.concatenate([pipeline.train_indices(5, s, b, n) for s in range(25)])  # 8 epochs
    for e in range(8):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled each epoch
    assert not np.array_equal(stream[:n], np.arange(n))
    assert not np.array_equal(pipeline.train_indices(5, 0, b, n), pipeline.train_indices(6, 0, b, n))


def test_process_slice():
    assert pipeline.process_slice(32, 0, 2) == slice(0, 16) and pipeline.process_slice(32, 1, 2) == slice(16, 32)
    rows = [np.arange(48)[pipeline.process_slice(48, p, 3)] for p in range(3)]
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(48))
    with pytest.raises(ValueError, match="divisible"):
        pipeline.process_slice(30, 0, 4)


def test_batch_contents_shapes_and_sharding(env):
    it = _train(env)
    try:
        batch = next(it)
    finally:
        it.close()
    expect = {"image": ((B, 75, 75, 3), np.float32), "text_ids": ((B, 24), np.int32),
              "text_mask": ((B, 24), bool), "label": ((B,), np.int32), "question_type": ((B,), np.int32),
              "valid": ((B,), bool), "family": ((B,), np.int32), "question_code": ((B, 11), np.float32)}  # fmt: skip
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expect
    for v in batch.values():
        assert isinstance(v, jax.Array) and len(v.addressable_shards) == 8
        assert v.sharding.spec[0] == ("data", "fsdp")
        assert {s.data.shape[0] for s in v.addressable_shards} == {B // 8}
    host = _host(batch)
    assert host["valid"].all()
    # Contents equal the records the index stream names, normalised with mean = std = 0.5.
    src = datasets.get_data_source("sort_of_clevr", "train", data_dir=env["data_dir"], builder_kwargs=KW)
    for row, idx in enumerate(pipeline.train_indices(1, 0, B, len(src))[:4]):
        ex = src[int(idx)]
        np.testing.assert_allclose(host["image"][row], ex["image"] / 127.5 - 1.0, atol=1e-6)
        assert host["label"][row] == ex["answer"] and host["question_type"][row] == ex["subtype"]
        assert host["family"][row] == ex["family"]
        np.testing.assert_array_equal(host["question_code"][row], ex["question_code"])
        np.testing.assert_array_equal(host["text_ids"][row], env["tokenizer"]([ex["question"].decode()])["text_ids"][0])


def test_determinism_and_exact_resume(env):
    full = _train(env)
    ref = [_host(next(full)) for _ in range(7)]  # crosses 2 epochs (100 examples, 32 per step)
    state = full.get_state()
    full.close()
    assert state["step"] == 7
    again = _train(env)
    assert all(_equal(_host(next(again)), r) for r in ref)
    again.close()
    resumed = _train(env, start_step=4)
    assert all(_equal(_host(next(resumed)), r) for r in ref[4:])
    resumed.close()
    # set_state from a JSON round trip, as a checkpoint would store it
    it = _train(env)
    next(it)
    it.set_state(json.loads(json.dumps({**state, "step": 3})))
    assert it.step == 3 and _equal(_host(next(it)), ref[3]) and it.get_state()["step"] == 4
    it.close()
    other = _train(env, seed=2)
    assert not _equal(_host(next(other)), ref[0])
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    other.close()


def test_two_simulated_processes_disjoint_and_complete(env):
    for augment in (False, True):
        full = _reader(env, augment=augment)
        halves = [_reader(env, rows=pipeline.process_slice(B, p, 2), augment=augment) for p in range(2)]
        for step in (0, 3):
            whole = full.train_batch(step)
            parts = [h.train_batch(step) for h in halves]
            idx = [pipeline.train_indices(1, step, B, full.num_examples)[h.rows] for h in halves]
            assert not set(idx[0]) & set(idx[1])  # disjoint records within an epoch
            for k in whole:
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_local_rows_single_process(env):
    assert pipeline.local_rows(sharding.batch_sharding(env["mesh"]), B) == slice(0, B)
    with pytest.raises(ValueError, match="divisible"):
        _train(env, global_batch_size=12)


def test_augmentation_is_a_shifted_window_and_deterministic(env):
    plain, aug = _reader(env), _reader(env, augment=True)
    a, p = aug.train_batch(2), plain.train_batch(2)
    assert _equal(a, aug.train_batch(2)) and not np.array_equal(a["image"], p["image"])
    assert not np.array_equal(a["image"], aug.train_batch(3)["image"])
    pad = 5  # round(75 / 16)
    for row in range(6):
        padded = np.pad(p["image"][row], ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        windows = [padded[dy : dy + 75, dx : dx + 75] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(np.array_equal(w, a["image"][row]) for w in windows)  # a crop, never a flip
    for k in ("label", "text_ids", "question_code"):
        np.testing.assert_array_equal(a[k], p[k])


def test_resize(env):
    batch, full = _reader(env, image_size=32).train_batch(0), _reader(env).train_batch(0)
    assert batch["image"].shape == (B, 32, 32, 3) and batch["image"].dtype == np.uint8  # normalised on device
    # bilinear resizing keeps the mean colour of a 75 px scene to within a few levels
    np.testing.assert_allclose(batch["image"].mean((1, 2)), full["image"].mean((1, 2)), atol=6.0)


@pytest.mark.parametrize("batch_size", [24, 16, 40, 48])
def test_eval_counts_every_example_once(env, batch_size):
    ev = pipeline.make_eval_iterator(dataset="sort_of_clevr", split="test", global_batch_size=batch_size,
                                     mesh=env["mesh"], tokenizer=env["tokenizer"], data_dir=env["data_dir"],
                                     builder_kwargs=KW)  # fmt: skip
    n = 40
    assert len(ev) == -(-n // batch_size) and ev.num_examples == n
    src = datasets.get_data_source("sort_of_clevr", "test", data_dir=env["data_dir"], builder_kwargs=KW)
    for _ in range(2):  # re-iterable, same order
        seen, correct = [], 0
        for batch in ev:
            h = _host(batch)
            assert h["image"].shape[0] == batch_size
            assert ((h["index"] >= 0) == h["valid"]).all()
            seen += h["index"][h["valid"]].tolist()
            # "label == stored answer" masked by valid: a metric over the padded batch counts exactly n rows.
            answers = np.array(
                [src[int(i)]["answer"] if v else -1 for i, v in zip(h["index"], h["valid"], strict=True)]
            )
            correct += int(((h["label"] == answers) & h["valid"]).sum())
        assert sorted(seen) == list(range(n)) and seen == sorted(seen)
        assert correct == n


def test_prefetch_keeps_batches_ready(env):
    it = _train(env, prefetch=3)
    try:
        next(it)
        deadline = time.time() + 20
        while it._prefetcher._queue.qsize() < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert it._prefetcher._queue.qsize() == 3
    finally:
        it.close()


def test_dataset_meta_and_unknown_name(env):
    meta = pipeline.dataset_meta("sort_of_clevr", data_dir=env["data_dir"], builder_kwargs=KW)
    assert meta["num_examples"] == {"train": 100, "validation": 20, "test": 40}
    assert meta["type_names"] == ["shape", "horizontal", "vertical", "closest", "furthest", "count"]
    with pytest.raises(ValueError, match="easy_vqa"):
        pipeline.dataset_meta("nope", data_dir=env["data_dir"])


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert datasets.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert datasets.default_data_dir().endswith("tensorflow_datasets")
