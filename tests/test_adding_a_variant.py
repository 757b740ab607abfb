"""docs/adding_a_variant.md's worked example, FiLM (vtfusion_jax/models/film.py), held to the tests the guide asks
of a new variant: registry entry, shapes and gradients under jit, padding never leaks, its limiting cases, analytic
FLOPs against XLA, a whole model built from a config with it; and the guide shows the code that runs."""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax import flops, layers, train_lib
from vtfusion_jax.config_lib import load_config
from vtfusion_jax.models import film, get_fusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, N, D = 2, 6, 9, 32
TEXT_MASK = jnp.asarray(np.arange(L)[None, :] < np.array([[L], [3]]))  # second example: 3 real text tokens
IMAGE_MASK = jnp.asarray(np.arange(N)[None, :] < np.array([[7], [N]]))  # first example: 2 padded image tokens
RNG = np.random.default_rng(0)
TEXT = jnp.asarray(RNG.normal(size=(B, L, D)), jnp.float32)
IMAGE = jnp.asarray(RNG.normal(size=(B, N, D)), jnp.float32)


def _fusion(**extra):
    fusion = get_fusion(dict(name="film", width=D, num_layers=2, **extra))
    params = jax.jit(fusion.init)(jax.random.key(0), TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)
    return fusion, params, jax.jit(lambda p, t, i: fusion.apply(p, t, TEXT_MASK, i, IMAGE_MASK))


def _randomize(params, seed=7):
    """Perturbs every parameter, so the zero-initialised FiLM generator is switched on."""
    leaves, tree = jax.tree.flatten(layers.unbox(params))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def test_the_guide_shows_the_code_that_runs():
    guide = open(os.path.join(REPO, "docs", "adding_a_variant.md")).read()
    assert inspect.getsource(film.FiLMFusion) in guide  # the class, verbatim
    assert (
        '_FUSIONS["film"] = FiLMFusion' in guide
        and '_FUSIONS["film"] = FiLMFusion' in open(os.path.join(REPO, "vtfusion_jax", "models", "__init__.py")).read()
    )
    assert type(get_fusion({"name": "film"})) is film.FiLMFusion


def test_shapes_grads_and_every_parameter_used():
    fusion, params, apply = _fusion()
    t, i, pooled = apply(params, TEXT, IMAGE)
    assert t.shape == (B, L, D) and i.shape == (B, N, D) and pooled.shape == (B, 2 * D)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(TEXT))  # the text passes through

    def loss(p):
        return jnp.sum(fusion.apply(p, TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)[2] ** 2)

    grads = jax.jit(jax.grad(loss))(_randomize(params))
    dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads) if not np.any(g)]
    assert not dead, dead
    # Inputs of another width are projected to the fusion width.
    wide = get_fusion(dict(name="film", width=D, num_layers=1))
    p = jax.jit(wide.init)(jax.random.key(0), TEXT[..., :16], TEXT_MASK, IMAGE[..., :24], IMAGE_MASK)
    shapes = [x.shape for x in wide.apply(p, TEXT[..., :16], TEXT_MASK, IMAGE[..., :24], IMAGE_MASK)]
    assert shapes == [(B, L, D), (B, N, D), (B, 2 * D)]


def test_padding_never_leaks():
    _, params, apply = _fusion()
    params = _randomize(params)
    t, i, pooled = apply(params, TEXT, IMAGE)
    t2, i2, pooled2 = apply(params, TEXT.at[1, 3:].set(100.0), IMAGE.at[0, 7:].set(-100.0))
    np.testing.assert_allclose(np.asarray(i2[0, :7]), np.asarray(i[0, :7]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(i2[1]), np.asarray(i[1]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled2), np.asarray(pooled), atol=1e-4)


def test_zero_layers_is_concat():
    """No FiLM layer: exactly ``concat`` ([masked_mean(text); masked_mean(image)]) with the same projections."""
    zero = get_fusion(dict(name="film", width=D, num_layers=0))
    concat = get_fusion(dict(name="concat", width=D))
    t, i = TEXT[..., :16], IMAGE[..., :24]  # other widths: the input projections are in play
    params = zero.init(jax.random.key(1), t, TEXT_MASK, i, IMAGE_MASK)
    ours, reference = (f.apply(params, t, TEXT_MASK, i, IMAGE_MASK) for f in (zero, concat))
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_question_blind_at_init_and_known_modulation():
    """Zero-initialised generator: gamma = beta = 0, so the image tokens ignore the question; once it is on they do
    not. And gamma = -1, beta = 0 silences the branch: each layer then adds only its output bias."""
    _, params, apply = _fusion()
    other_question = TEXT[::-1]
    np.testing.assert_allclose(
        np.asarray(apply(params, TEXT, IMAGE)[1]), np.asarray(apply(params, other_question, IMAGE)[1]), atol=1e-6
    )
    on = _randomize(params)
    assert not np.allclose(np.asarray(apply(on, TEXT, IMAGE)[1]), np.asarray(apply(on, other_question, IMAGE)[1]))
    p = layers.unbox(on)
    for k in range(2):
        p["params"][f"film{k}"]["kernel"] = jnp.zeros_like(p["params"][f"film{k}"]["kernel"])
        p["params"][f"film{k}"]["bias"] = jnp.concatenate([-jnp.ones(D), jnp.zeros(D)])
    expected = IMAGE + p["params"]["out0"]["bias"] + p["params"]["out1"]["bias"]
    np.testing.assert_allclose(np.asarray(apply(p, TEXT, IMAGE)[1]), np.asarray(expected), atol=1e-5)


def test_analytic_flops_match_xla_and_a_model_builds_from_a_config():
    fusion = get_fusion(dict(name="film", width=256, num_layers=2))
    t, i = jnp.zeros((1, 16, 256)), jnp.zeros((1, 64, 256))
    mt, mi = jnp.ones((1, 16), bool), jnp.ones((1, 64), bool)
    params = jax.eval_shape(fusion.init, jax.random.key(0), t, mt, i, mi)
    cost = jax.jit(fusion.apply).lower(params, t, mt, i, mi).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert abs(fusion.flops_per_example(16, 64) - cost["flops"]) / cost["flops"] < 0.10
    # The whole model from a config with one changed field (what a table row does): shapes and analytic FLOPs.
    c = load_config(os.path.join(REPO, "configs", "tiny.py"))
    with c.unlocked():
        c.model.fusion.name = "film"
    model = train_lib.build_model(c, 5, 100)
    batch = train_lib.init_batch(c, {"image_shape": (32, 32, 3)})
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), batch), batch))
    assert out["logits"].shape == (1, 5)
    f = flops.model_flops(train_lib.model_spec(c, 100), (32, 32), c.dataset.max_len, 5)
    assert f["fusion"] == get_fusion(dict(c.model.fusion.to_dict(), width=c.model.width)).flops_per_example(16, 64)


@pytest.mark.parametrize("bad", [dict(num_layer=2), dict(image_pool="max")])
def test_unknown_fields_are_refused(bad):
    with pytest.raises(ValueError, match="film"):
        get_fusion(dict(name="film", **bad))
