"""optim.py: schedule shape, weight-decay mask, per-tower multipliers and freezing, gradient accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from train_testutil import load_config

from vtfusion_jax import optim, sharding, tasks, train_lib


def _optim_config(**kw):
    c = load_config("tiny").optim
    c.unlock()
    for k, v in kw.items():
        c[k] = v
    return c


def test_warmup_then_cosine_to_end_lr():
    c = _optim_config(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_factor=0.1)
    s = optim.schedule(c, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # half-way down the cosine: (1 + 0.1) / 2
    assert float(s(110)) == pytest.approx(0.1)
    lin = optim.schedule(_optim_config(lr=1.0, warmup_steps=0, schedule="linear", end_lr_factor=0.0), 100)
    assert float(lin(25)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="valid"):
        optim.schedule(_optim_config(schedule="step"), 10)


def test_no_weight_decay_on_biases_and_norms():
    params = {
        "fusion": {
            "layers_0": {"self_attn": {"query": {"kernel": 0, "bias": 0}}, "self_attn_ln": {"ln": {"scale": 0}}}
        },
        "image_encoder": {"conv0": {"kernel": 0}, "norm0": {"scale": 0, "bias": 0}, "pos_emb": {"pos_embedding": 0}},
        "text_encoder": {"word_embeddings": {"embedding": 0}, "final_ln": {"ln": {"bias": 0}}},
    }
    mask = optim.decay_mask(params)
    assert mask["fusion"]["layers_0"]["self_attn"]["query"] == {"kernel": True, "bias": False}
    assert mask["fusion"]["layers_0"]["self_attn_ln"]["ln"]["scale"] is False
    assert mask["image_encoder"]["conv0"]["kernel"] is True
    assert mask["image_encoder"]["norm0"] == {"scale": False, "bias": False}
    assert mask["text_encoder"]["word_embeddings"]["embedding"] is True
    assert mask["text_encoder"]["final_ln"]["ln"]["bias"] is False


def _tree(v=1.0):
    return {t: {"w": jnp.full((3, 2), v), "bias": jnp.full((2,), v)} for t in optim.TOWERS}


def test_per_tower_multipliers_and_freezing():
    c = _optim_config(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip_norm=0.0)
    c.lr_multipliers.update(dict(image_encoder=2.0, text_encoder=0.5, fusion=1.0, head=1.0))
    tx, _ = optim.make_optimizer(c, 10, frozen=frozenset({"head"}))
    params, grads = _tree(1.0), _tree(0.3)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first update is lr * sign(g) (bias-corrected m / sqrt(v)), so each tower moves by lr * multiplier.
    np.testing.assert_allclose(updates["fusion"]["w"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["image_encoder"]["w"], -0.2, rtol=1e-5)
    np.testing.assert_allclose(updates["text_encoder"]["bias"], -0.05, rtol=1e-5)
    np.testing.assert_array_equal(updates["head"]["w"], 0.0)  # frozen
    with pytest.raises(ValueError, match="valid"):
        c.lr_multipliers.unlock()
        c.lr_multipliers["vision"] = 1.0
        optim.make_optimizer(c, 10)


def test_frozen_gradients_do_not_count_towards_clipping():
    c = _optim_config(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip_norm=1.0)
    clip_only = optax.chain(
        optim._zero_frozen(lambda p: optim.tower_labels(p, frozenset({"head"}))), optax.clip_by_global_norm(1.0)
    )
    grads = _tree(0.01)
    grads["head"] = {"w": jnp.full((3, 2), 100.0), "bias": jnp.full((2,), 100.0)}
    out, _ = clip_only.update(grads, clip_only.init(grads))
    np.testing.assert_allclose(out["fusion"]["w"], 0.01, rtol=1e-6)  # not scaled down by the frozen head's norm
    del c


def _synthetic_batch(n, seed, config):
    rng = np.random.default_rng(seed)
    s, length = config.dataset.image_size, config.dataset.max_len
    mask = np.arange(length)[None] < rng.integers(3, length, size=(n, 1))
    return {
        "image": rng.normal(size=(n, s, s, 3)).astype(np.float32),
        "text_ids": rng.integers(0, 1000, size=(n, length)).astype(np.int32),
        "text_mask": mask,
        "label": rng.integers(0, 13, size=(n,)).astype(np.int32),
        "valid": np.ones((n,), bool),
    }


def test_gradient_accumulation_equals_one_big_batch():
    """4 micro-batches of B with accum_steps=4 == one step on the 4B batch (dropout off: no per-step noise)."""
    # Adam eps well above float32 noise: near-zero gradients would otherwise turn rounding into visible updates.
    config = load_config("tiny", model__text_encoder__dropout_rate=0.0, optim__warmup_steps=0, optim__eps=1e-3)
    task = tasks.make_task(config)
    model = task.model
    init = {k: v[:1] for k, v in _synthetic_batch(1, 0, config).items() if k in ("image", "text_ids", "text_mask")}
    mesh = sharding.make_mesh((1, 1, 1))
    big = _synthetic_batch(32, 0, config)
    results = []
    for accum, batches in ((4, [{k: v[i * 8 : (i + 1) * 8] for k, v in big.items()} for i in range(4)]), (1, [big])):
        c = ml_collections.ConfigDict(config.optim.to_dict())
        c.accum_steps = accum
        tx, _ = optim.make_optimizer(c, 10)
        state, _ = train_lib.create_train_state(model, init, tx, mesh, config.seed)
        step = jax.jit(train_lib.make_train_step(task.loss, tx))
        params0 = jax.device_get(state.params)
        for b in batches:
            state, _ = step(state, b)
        results.append(jax.device_get(state.params))
    changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params0, results[1])
    assert max(jax.tree.leaves(changed)) > 1e-4  # the update really happened
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 100.0])
def test_clip_by_global_norm_matches_optax(max_norm):
    """optim.clip_by_global_norm (one scalar factor) == optax.clip_by_global_norm (per-element division): identical
    below the threshold, within float32 rounding above it, and the clipped tree has the norm max_norm."""
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=(11,)))}}
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads))))
    for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        if norm < max_norm:
            np.testing.assert_array_equal(o, r)
        else:
            np.testing.assert_allclose(o, r, rtol=2e-7, atol=0)
    clipped = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(ours)))
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-6)
    assert norm > 1.0  # the 0.5 and 1.0 cases clip, the 100.0 case does not


@pytest.mark.parametrize("accum", [1, 2])
def test_params_ema_is_the_moving_average_of_the_updated_params(accum):
    """ema <- d * ema + (1 - d) * params after every real update, from the initial params; the parameters follow
    exactly the path they follow without it (also inside optax.MultiSteps)."""
    d, params = 0.75, _tree()
    c = dict(lr=0.1, warmup_steps=0, schedule="constant", accum_steps=accum)
    tx, _ = optim.make_optimizer(_optim_config(ema_decay=d, **c), 10)
    ref_tx, _ = optim.make_optimizer(_optim_config(**c), 10)
    state, ref_state, ref, want = tx.init(params), ref_tx.init(params), params, params
    assert optim.ema_params(ref_state) is None
    for i in range(4 * accum):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1) + jnp.arange(p.size).reshape(p.shape)), params)
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = ref_tx.update(grads, ref_state, ref)
        params, ref = optax.apply_updates(params, updates), optax.apply_updates(ref, ref_updates)
        if (i + 1) % accum == 0:
            want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, want, params)
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), optim.ema_params(state), want)
    assert not np.allclose(want["head"]["w"], params["head"]["w"])  # the average lags the parameters
