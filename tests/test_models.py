"""VisionTextModel: components chosen by config name, composed end to end."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vtfusion_jax import layers, linear
from vtfusion_jax.models import FUSIONS
from vtfusion_jax.models.vtfusion import VisionTextModel

CFG = dict(
    width=32,
    dtype="float32",
    attention_impl="xla",
    scan_layers=False,
    remat_policy="none",
    image_encoder=dict(name="cnn", channels=(8, 16, 16)),
    text_encoder=dict(name="bert", vocab_size=64, depth=1, num_heads=4, mlp_dim=64, post_ln=False),
    fusion=dict(name="co_attention", num_layers=1, num_heads=4, mlp_dim=64),
    head=dict(name="classification", hidden_dim=32),
)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, size=n)
    image = rng.normal(size=(n, 64, 64, 3)).astype(np.float32) * 0.1
    image[label == 1, :32] += 1.0  # the answer is in the image: top half bright or not
    return dict(
        image=jnp.asarray(image),
        text_ids=jnp.asarray(rng.integers(1, 64, size=(n, 5)), jnp.int32),
        text_mask=jnp.ones((n, 5), bool),
        label=jnp.asarray(label, jnp.int32),
    )


def test_model_learns_an_image_dependent_label():
    """A few AdamW steps on a label that only the image reveals: the fused model must fit it."""
    model = VisionTextModel(CFG, num_classes=2)
    batch = _batch(16)
    params = layers.unbox(jax.jit(model.init)(jax.random.key(0), batch))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            logits = model.apply(p, batch)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    first = None
    for _ in range(30):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    logits = jax.jit(model.apply)(params, batch)["logits"]
    assert logits.shape == (16, 2) and logits.dtype == jnp.float32
    assert float(loss) < 0.2 * first
    assert np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])) == 1.0


def test_bfloat16_model_keeps_float32_params_and_logits():
    model = VisionTextModel(dict(CFG, dtype="bfloat16"), num_classes=3)
    params = jax.eval_shape(model.init, jax.random.key(0), _batch(2))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(layers.unbox(params)))
    assert jax.eval_shape(model.apply, params, _batch(2))["logits"].dtype == jnp.float32


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("fusion", dict(name="coattention"), "unknown fusion 'coattention'; valid:"),
        ("image_encoder", dict(name="cnn", chanels=(8,)), "has no field 'chanels'"),
        ("head", dict(name="itm"), "unknown head 'itm'; valid: \\['classification'\\]"),
        ("dtype", "fp8", "unknown dtype 'fp8'"),
    ],
)
def test_bad_config_names_raise_listing_valid_ones(key, value, message):
    model = VisionTextModel(dict(CFG, **{key: value}), num_classes=2)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), _batch(2))


@pytest.mark.parametrize("image_encoder", ["cnn", "resnet18", "vit"])
@pytest.mark.parametrize("text_encoder", ["bert", "gru"])
def test_every_parameter_has_logical_axis_names(image_encoder, text_encoder):
    """The training code shards parameters from these names alone, so none may be missing or mis-sized."""
    allowed = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", "conv_in", "conv_out", "layers", None}
    for fusion in ("co_attention", "bottleneck", "query", "merged", "gated_cross"):
        cfg = dict(
            CFG,
            scan_layers=True,
            image_encoder=dict(name=image_encoder),
            text_encoder=dict(name=text_encoder),
            fusion=dict(name=fusion, num_layers=1, num_heads=4, mlp_dim=64),
        )
        variables = jax.eval_shape(VisionTextModel(cfg, 3).init, jax.random.key(0), _batch(2))
        leaves = jax.tree_util.tree_leaves_with_path(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for path, leaf in leaves:
            where = f"{fusion}: {jax.tree_util.keystr(path)}"
            assert isinstance(leaf, nn.Partitioned), f"{where} has no logical axis names"
            assert len(leaf.names) == leaf.value.ndim, where
            assert set(leaf.names) <= allowed, where


def _fusion_spec(name, **fields):
    """``{"name": name}`` plus those of ``fields`` the variant has (the probe has no sizes)."""
    have = {f.name for f in dataclasses.fields(FUSIONS[name].cls)}
    return dict(name=name, **{k: v for k, v in fields.items() if k in have})


def test_every_fusion_accepts_multiscale_image_tokens():
    for fusion in FUSIONS:
        cfg = dict(
            CFG,
            image_encoder=dict(name="cnn", channels=(8, 16, 16), scales=(0, 1, 2)),
            fusion=_fusion_spec(fusion, num_layers=1, num_heads=4, mlp_dim=64),
        )
        model = VisionTextModel(cfg, num_classes=3)
        variables = jax.eval_shape(model.init, jax.random.key(0), _batch(2))
        assert jax.eval_shape(model.apply, variables, _batch(2))["logits"].shape == (2, 3), fusion


def _loss_and_flat_params(fusion: str):
    """(loss(flat params) of a tiny VisionTextModel with this fusion, flat float32 params): a padded batch."""
    cfg = dict(
        CFG,
        width=16,
        image_encoder=dict(name="vit", depth=1, num_heads=2, mlp_dim=32, patch_size=4),  # smooth: GELU, no ReLU
        text_encoder=dict(name="bert", vocab_size=64, depth=1, num_heads=2, mlp_dim=32),
        fusion=_fusion_spec(fusion, num_layers=1, num_heads=2, mlp_dim=32, num_bottleneck=2, num_queries=2),
        head=dict(name="classification", hidden_dim=16),
    )
    rng = np.random.default_rng(1)
    batch = dict(
        image=jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32),
        text_ids=jnp.asarray(rng.integers(1, 64, size=(2, 5)), jnp.int32),
        text_mask=jnp.asarray(np.arange(5)[None] < np.array([[5], [3]])),
    )
    model = VisionTextModel(cfg, 3)
    params = layers.unbox(model.init(jax.random.key(0), batch))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    # Perturbed parameters: zero-initialised gates / FiLM generators would hide their second derivatives.
    flat = flat + 0.05 * jnp.asarray(rng.normal(size=flat.shape), jnp.float32)

    def loss(p):
        logits = model.apply(unravel(p), batch)["logits"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])))

    return loss, flat


def _hvp(loss):
    """jit(p, t) -> (jvp of the loss along t, <grad, t>, Hessian-vector product (jvp of grad)), one program."""

    def run(p, t):
        (_, g), (directional, hvp) = jax.jvp(jax.value_and_grad(loss), (p,), (t,))
        return directional, jnp.vdot(g, t), hvp

    return jax.jit(run)


def _tangent(p):
    t = jax.random.normal(jax.random.key(3), p.shape)
    return t / jnp.linalg.norm(t)


# Three variants in the default tier (cross-attention in both directions, bottleneck tokens, FiLM's ReLU generator);
# every other registered variant in the slow tier (`pytest -m slow`, run by .ci/run).
_AUTODIFF_DEFAULT = ("co_attention", "bottleneck", "film")


@pytest.mark.parametrize(
    "fusion", [pytest.param(f, marks=() if f in _AUTODIFF_DEFAULT else pytest.mark.slow) for f in FUSIONS]
)
def test_forward_mode_autodiff_through_the_whole_model(fusion):
    """Every registered variant, by default: the jvp of the loss along a random tangent equals <grad, t>, and the
    Hessian-vector product (jvp of grad: forward over reverse) traces and is finite and non-zero."""
    loss, p = _loss_and_flat_params(fusion)
    directional, grad_dot_t, hvp = _hvp(loss)(p, _tangent(p))
    np.testing.assert_allclose(directional, grad_dot_t, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(hvp)) and float(jnp.linalg.norm(hvp)) > 0, fusion


def test_hessian_vector_product_matches_a_finite_difference_of_gradients():
    """Independent of autodiff: (grad(p + eps t) - grad(p - eps t)) / 2 eps, on a variant without ReLU kinks (in
    rn or FiLM a step may cross one, where the gradient jumps)."""
    loss, p = _loss_and_flat_params("co_attention")
    t, eps = _tangent(p), 3e-4
    _, _, hvp = _hvp(loss)(p, t)
    grad = jax.jit(jax.grad(loss))
    fd = (grad(p + eps * t) - grad(p - eps * t)) / (2 * eps)
    assert float(jnp.linalg.norm(hvp - fd)) < 0.01 * float(jnp.linalg.norm(hvp))


def test_the_cpu_weight_grad_switch_keeps_the_gradients(monkeypatch):
    """linear.CPU_TRANSPOSED_WEIGHT_GRAD (opt-in) changes how the kernel gradients are computed, not their values."""
    loss, p = _loss_and_flat_params("co_attention")
    plain = jax.jit(jax.grad(loss))(p)
    monkeypatch.setattr(linear, "CPU_TRANSPOSED_WEIGHT_GRAD", True)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(p), plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):  # the price of the switch: why it is opt-in
        jax.jvp(loss, (p,), (_tangent(p),))


def _repeated_text_batch(distinct: int, n: int = 8, seed: int = 2):
    """A padded batch of n questions drawn from ``distinct`` different (ids, mask) rows: two rows share their ids but
    not their mask, so the distinct rows are the (ids, mask) pairs."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(distinct, 5))
    lengths = rng.integers(2, 6, size=distinct)
    ids[1], lengths[1] = ids[0], (lengths[0] - 1 if lengths[0] > 2 else 5)
    pick = np.concatenate([np.arange(distinct), rng.integers(0, distinct, size=n - distinct)])[rng.permutation(n)]
    return dict(
        image=jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32),
        text_ids=jnp.asarray(ids[pick], jnp.int32),
        text_mask=jnp.asarray(np.arange(5)[None] < lengths[pick][:, None]),
        label=jnp.asarray(rng.integers(0, 2, size=n), jnp.int32),
    )


@pytest.mark.parametrize("distinct", [3, pytest.param(6, marks=pytest.mark.slow)])
def test_text_dedup_equals_one_text_encoder_pass_per_question(distinct, monkeypatch):
    """model.text_dedup = 4: logits, gradients w.r.t. every parameter and a jvp equal the plain model's with 3
    distinct questions in 8 (the branch that encodes 4 rows runs) and with 6 (> 4: nn.cond takes the plain path)."""
    from vtfusion_jax.models import vtfusion

    taken = []
    real_cond = vtfusion.nn.cond

    def cond(pred, *args):  # records the branch when it is known (eager calls), then branches as before
        if not isinstance(pred, jax.core.Tracer):
            taken.append(bool(pred))
        return real_cond(pred, *args)

    monkeypatch.setattr(vtfusion.nn, "cond", cond)
    batch = _repeated_text_batch(distinct)
    cfg = dict(CFG, fusion=dict(name="cross", num_layers=1, num_heads=4, mlp_dim=64))
    plain, dedup = VisionTextModel(cfg, 2), VisionTextModel(dict(cfg, text_dedup=4), 2)
    params = layers.unbox(jax.jit(plain.init)(jax.random.key(0), batch))

    def loss(model, p):
        logits = model.apply(p, batch)["logits"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])), logits

    z = dedup.apply(params, batch)["logits"]  # eager: the predicate is concrete
    assert taken == [distinct <= 4]
    grad = lambda m: jax.jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True))(params)  # noqa: E731
    ((_, z0), g0), ((_, z1), g1) = grad(plain), grad(dedup)
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z, z0, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    t = jax.tree.map(lambda x: jnp.full_like(x, 1e-2), params)
    jvp = jax.jit(jax.jvp, static_argnums=0)
    d0, d1 = (jvp(lambda p, m=m: loss(m, p)[0], (params,), (t,))[1] for m in (plain, dedup))
    np.testing.assert_allclose(d1, d0, rtol=1e-4, atol=1e-6)


def test_text_dedup_keeps_one_dropout_mask_per_question():
    """With dropout in the text tower, a training step draws a mask per question: text_dedup must not share one
    between repeated questions, so with the same dropout key the logits equal the plain model's."""
    batch = _repeated_text_batch(3)
    cfg = dict(CFG, fusion=dict(name="cross", num_layers=1, num_heads=4, mlp_dim=64))
    cfg["text_encoder"] = dict(cfg["text_encoder"], dropout_rate=0.5)
    plain, dedup = VisionTextModel(cfg, 2), VisionTextModel(dict(cfg, text_dedup=4), 2)
    params = layers.unbox(jax.jit(plain.init)(jax.random.key(0), batch))
    drop = {"dropout": jax.random.key(1)}
    step = lambda m: jax.jit(functools.partial(m.apply, train=True, rngs=drop))(params, batch)["logits"]  # noqa: E731
    z0, z1 = step(plain), step(dedup)
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z0, plain.apply(params, batch)["logits"], atol=1e-4)  # the dropout did act
