"""Image-grouped batches: the packing plan, the pipeline's grouped batches, and the model's gather equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from vtfusion_jax import tasks
from vtfusion_jax.data import datasets, pipeline
from vtfusion_jax.data.grouped import GroupPlan
from vtfusion_jax.data.reader import read_image_ids
from vtfusion_jax.data.tokenizer import Tokenizer

KW = dict(num_train=6, num_validation=1, num_test=1, seed=0)  # 6 images x 20 questions


def _ids(seed=0, n_images=50):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(n_images) * 7 + 3, rng.integers(1, 12, n_images)))


@pytest.mark.parametrize("b,k", [(32, 8), (16, 3), (40, 40)])
def test_plan_epochs_cover_every_record_once_with_whole_images(b, k):
    ids = _ids()
    plan = GroupPlan(ids, seed=3, global_batch_size=b, images_per_batch=k)
    for e in range(3):
        seen = []
        start, _ = plan.locate(0) if e == 0 else (None, None)
        n_batches = len(plan.epoch(e))
        first = plan.steps_for_epochs(e)
        assert plan.locate(first) == (e, 0) and plan.locate(first + n_batches - 1) == (e, n_batches - 1)
        for step in range(first, first + n_batches):
            images, questions, index = plan.batch_at(step)
            real = questions >= 0
            assert real.sum() <= b and (images >= 0).sum() <= k
            # Every question points at a slot holding a record of its own image; padding rows point at slot 0.
            np.testing.assert_array_equal(ids[images[index[real]]], ids[questions[real]])
            assert (index[~real] == 0).all()
            # Whole images: an image's questions never straddle two batches.
            for slot in np.flatnonzero(images >= 0):
                assert real[index == slot].sum() == (ids == ids[images[slot]]).sum()
            seen += list(questions[real])
        assert sorted(seen) == list(range(len(ids)))  # each epoch: every record exactly once
    assert [list(x) for x in plan.epoch(0)] != [list(x) for x in plan.epoch(1)]  # reshuffled per epoch
    other = GroupPlan(ids, seed=3, global_batch_size=b, images_per_batch=k)  # a fresh process: same plan
    for step in (0, 5, plan.steps_for_epochs(2) + 1):
        for a, c in zip(plan.batch_at(step), other.batch_at(step), strict=True):
            np.testing.assert_array_equal(a, c)
    assert plan.steps_for_epochs(1.5) == plan.steps_for_epochs(1) + -(-len(plan.epoch(1)) // 2)


def test_plan_rejects_an_image_with_more_questions_than_a_batch():
    with pytest.raises(ValueError, match="questions but a batch holds only 4"):
        GroupPlan(np.array([1, 1, 1, 1, 1, 2]), seed=0, global_batch_size=4, images_per_batch=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("grouped"))
    datasets.get_builder("sort_of_clevr", data_dir=data_dir, builder_kwargs=KW)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    return dict(data_dir=data_dir, builder_kwargs=KW, mesh=mesh, tokenizer=Tokenizer(max_len=24))


def test_grouped_batches_match_the_records_and_resume_exactly(env):
    args = dict(dataset="sort_of_clevr", split="train", global_batch_size=64, seed=1, mesh=env["mesh"],
                tokenizer=env["tokenizer"], data_dir=env["data_dir"], builder_kwargs=env["builder_kwargs"],
                images_per_batch=8)  # fmt: skip
    it = pipeline.make_train_iterator(**args)
    batches = [jax.tree.map(np.asarray, next(it)) for _ in range(5)]
    state = it.get_state()
    assert state["images_per_batch"] == 8
    it.close()
    ref = pipeline.BatchReader(dataset="sort_of_clevr", split="train", global_batch_size=64, seed=1,
                               tokenizer=env["tokenizer"], rows=slice(0, 64), data_dir=env["data_dir"],
                               builder_kwargs=env["builder_kwargs"])  # fmt: skip
    plan = GroupPlan(read_image_ids(ref.source), 1, 64, 8)
    for step, b in enumerate(batches):
        assert b["image"].shape == (8, 75, 75, 3) and b["image_index"].shape == (64,)
        _, questions, _ = plan.batch_at(step)
        valid = questions >= 0
        np.testing.assert_array_equal(b["valid"], valid)
        want = ref.load(np.maximum(questions, 0), valid)  # the ungrouped reader on the same records
        np.testing.assert_array_equal(b["label"][valid], want["label"][valid])
        np.testing.assert_array_equal(b["text_ids"][valid], want["text_ids"][valid])
        # Each question sees exactly its own (normalised) image.
        np.testing.assert_allclose(b["image"][b["image_index"]][valid], want["image"][valid] / 127.5 - 1.0, atol=1e-6)
    resumed = pipeline.make_train_iterator(**args, start_step=3)
    for b in batches[3:]:
        got = jax.tree.map(np.asarray, next(resumed))
        assert all(np.array_equal(got[k], b[k]) for k in b)
    resumed.close()
    with pytest.raises(ValueError, match="images_per_batch 6 is not divisible"):
        pipeline.make_train_iterator(**{**args, "images_per_batch": 6})


def test_model_gather_equals_repeated_images():
    from vtfusion_jax.models.vtfusion import VisionTextModel

    spec = dict(
        width=32,
        image_encoder=dict(name="cnn", channels=(8, 16), strides=(2, 2)),
        text_encoder=dict(name="bert", vocab_size=50, depth=1, num_heads=4, mlp_dim=64, max_len=8),
        fusion=dict(name="co_attention", num_layers=2, num_heads=4, mlp_dim=64),  # layer 1 per image, then per question
        head=dict(name="classification", hidden_dim=16),
    )
    model = VisionTextModel(spec, 5)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
    index = jnp.asarray([2, 0, 0, 1, 2, 2], jnp.int32)
    text = dict(text_ids=jnp.asarray(rng.integers(1, 50, (6, 8)), jnp.int32), text_mask=jnp.ones((6, 8), bool))
    # Jitted: op by op, init and apply compile every primitive separately (~4x the CPU time).
    params = jax.jit(model.init)(jax.random.key(0), dict(image=images[:1], **{k: v[:1] for k, v in text.items()}))
    apply = jax.jit(lambda p, batch: model.apply(p, batch)["logits"])
    grouped = apply(params, dict(image=images, image_index=index, **text))
    repeated = apply(params, dict(image=images[index], **text))
    np.testing.assert_allclose(grouped, repeated, rtol=1e-5, atol=1e-5)


def test_grouped_training_runs_sharded_and_counts_epochs_from_the_plan(tmp_path):
    """train_and_evaluate with grouped batches on 8 devices (K = 8 image slots, one per data shard)."""
    import math

    from train_testutil import load_config, train_losses

    from vtfusion_jax import train_lib

    overrides = dict(train__global_batch_size=32, train__images_per_batch=8, train__num_steps=3,
                     train__log_every_steps=1, train__eval_every_steps=-1, train__checkpoint_every_steps=100,
                     mesh_shape=(8, 1, 1))  # fmt: skip
    config = load_config("tiny", **overrides)
    result = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 3
    losses = train_losses(str(tmp_path / "run"))
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    # num_epochs counts whole packed epochs: more steps than N / B (batches close before they are full).
    config = load_config("tiny", **dict(overrides, train__num_steps=-1, train__num_epochs=1.0))
    steps = tasks.make_task(config).num_train_steps()
    n = 34_801  # easy-VQA train questions
    assert math.ceil(n / 32) <= steps <= math.ceil(1.25 * n / 32)


def test_plan_is_thread_safe():
    """grain builds batches on several threads: concurrent lookups on a fresh plan give the sequential answers."""
    import threading

    ids = _ids(seed=1, n_images=400)
    want = GroupPlan(ids, seed=2, global_batch_size=32, images_per_batch=8)
    steps = list(range(0, want.steps_for_epochs(6), 7))
    expected = {s: want.batch_at(s)[1] for s in steps}
    plan = GroupPlan(ids, seed=2, global_batch_size=32, images_per_batch=8)
    got, errors = {}, []

    def work(offset):
        try:
            for s in steps[offset::4] + steps[::-1][offset::4]:
                got[s] = plan.batch_at(s)[1]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in steps:
        np.testing.assert_array_equal(got[s], expected[s])


def test_grouped_eval_scores_every_question_once_like_the_plain_eval():
    """Image-grouped validation (train.eval_images_per_batch: each image encoded once) on 8 devices gives the same
    summary and the same per-question predictions, in record order, as one image per question."""
    from train_testutil import load_config

    out = []
    for k in (0, 8):
        config = load_config("tiny", train__eval_images_per_batch=k, mesh_shape=(8, 1, 1))
        task = tasks.make_task(config)
        if k:  # K images per batch, each question pointing at its slot
            batch = next(iter(task.eval_batches(config.dataset.val_split)))
            assert batch["image"].shape[0] == k and batch["image_index"].shape == (config.train.eval_batch_size,)
        params = jax.jit(task.model.init)(jax.random.key(0), task.init_batch())["params"]
        out.append(task.predictions(params, config.dataset.val_split))
    (plain, plain_rows), (grouped, grouped_rows) = out
    assert plain["num_examples"] == grouped["num_examples"] == 256
    np.testing.assert_array_equal(grouped_rows["index"], np.arange(256))
    for key in ("label", "question_type", "pred", "top_ids"):
        np.testing.assert_array_equal(grouped_rows[key], plain_rows[key])
    np.testing.assert_allclose(grouped_rows["top_probs"], plain_rows["top_probs"], rtol=1e-4, atol=1e-6)
    assert grouped["accuracy"] == plain["accuracy"] and grouped["per_type"] == plain["per_type"]
