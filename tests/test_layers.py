"""scan vs unrolled stacks and every remat policy compute the same function (outputs and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax import layers
from vtfusion_jax.models import get_fusion, get_text_encoder

IDS = jnp.asarray(np.random.default_rng(0).integers(5, 100, size=(2, 7)), jnp.int32)
MASK = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4]]))
TEXT = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 32)), jnp.float32)
IMAGE = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 32)), jnp.float32)
IMAGE_MASK = jnp.ones((2, 5), bool)


def _bert(**kw):
    return get_text_encoder(dict(name="bert", vocab_size=100, width=32, depth=2, num_heads=4, mlp_dim=64, **kw))


def _coattn(**kw):
    return get_fusion(dict(name="co_attention", width=32, num_layers=2, num_heads=4, mlp_dim=64, **kw))


CASES = {
    "bert": (_bert, lambda m, p: m.apply(p, IDS, MASK)[0]),
    "co_attention": (_coattn, lambda m, p: m.apply(p, TEXT, MASK, IMAGE, IMAGE_MASK)[2]),
}


def _init(make, **kw):
    """(module, its parameters). The init runs as one jitted program: op by op it compiles every primitive
    separately (~3x the CPU time of these tests)."""
    m = make(**kw)
    if make is _bert:
        return m, jax.jit(m.init)(jax.random.key(0), IDS, MASK)
    return m, jax.jit(m.init)(jax.random.key(0), TEXT, MASK, IMAGE, IMAGE_MASK)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_equals_unrolled(case):
    make, run = CASES[case]
    scanned, p_scan = _init(make, scan_layers=True)
    unrolled = make(scan_layers=False)  # runs on p_scan's layers, unstacked: its own init is not needed
    p_unrolled = layers.scanned_to_unrolled(layers.unbox(p_scan), 2)
    stack = layers.unbox(p_scan)["params"]["encoder" if case == "bert" else "blocks"]["stacked"]
    assert all(x.shape[0] == 2 for x in jax.tree.leaves(stack))  # stacked "layers" axis

    def loss(m, p):
        return jnp.sum(jnp.tanh(run(m, p)))

    l_s, g_s = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(layers.unbox(p_scan))
    l_u, g_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(p_unrolled)
    np.testing.assert_allclose(float(l_s), float(l_u), rtol=1e-5)
    g_s_unrolled = layers.scanned_to_unrolled(g_s, 2)
    for a, b in zip(jax.tree.leaves(g_s_unrolled), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy,scan", [("minimal", False), ("full", True)])
def test_remat_policies_do_not_change_results(policy, scan):
    make, run = CASES["co_attention"]
    base, params = _init(make, scan_layers=scan)
    remat = make(scan_layers=scan, remat_policy=policy)  # same parameter tree as base: runs on base's params

    def loss(m, p):
        return jnp.sum(jnp.tanh(run(m, p)))

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_remat_policy_is_applied():
    """'full' rematerialisation saves fewer residuals for the backward pass than none."""
    make, run = CASES["co_attention"]
    base, params = _init(make)
    full = make(remat_policy="full")

    def saved(m):  # residual elements, counted while tracing (as inside a jitted train step): nothing is compiled
        f = lambda p: jnp.sum(run(m, p))  # noqa: E731
        residuals = jax.eval_shape(lambda p: jax.linearize(f, p)[1], params)
        return sum(np.prod(r.shape) for r in jax.tree.leaves(residuals) if hasattr(r, "shape"))

    assert saved(full) < saved(base)


def test_unknown_remat_policy_raises():
    with pytest.raises(ValueError, match="valid: .*minimal"):
        _init(CASES["co_attention"][0], remat_policy="some")


@pytest.mark.parametrize("hw", [(4, 5), (10, 10)])
def test_sincos2d_xy_adds_a_linear_map_of_centred_coordinates(hw):
    """sincos2d_xy = sincos2d + [x, y] @ K with (x, y) the cell centres in [-1, 1] (row-major): the sin-cos part is
    exact, the rest is linear in the coordinates, mirror cells cancel, and K starts at unit scale."""
    h, w = hw
    tokens = jnp.zeros((1, h * w, 16))
    module = layers.PositionEmbedding2D("sincos2d_xy")
    params = module.init(jax.random.key(0), tokens, hw)
    kernel = np.asarray(layers.unbox(params)["params"]["xy_kernel"])
    assert kernel.shape == (2, 16) and 0.5 < kernel.std() < 2.0
    extra = np.asarray(module.apply(params, tokens, hw))[0] - layers.sincos_2d(h, w, 16)
    cols, rows = np.arange(h * w) % w, np.arange(h * w) // w
    xy = np.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)
    np.testing.assert_allclose(extra, xy @ kernel, atol=1e-5)
    np.testing.assert_allclose(extra.sum(0), 0.0, atol=1e-4)  # centred: each cell has a mirror image
    assert xy[0, 0] < 0 < xy[w - 1, 0] and xy[0, 1] < 0 < xy[-1, 1]  # x grows to the right, y downwards
    with pytest.raises(ValueError, match="sincos2d_xy"):
        layers.PositionEmbedding2D("xy").init(jax.random.key(0), tokens, hw)


def test_sincos_2d_is_distinct_per_position():
    pe = layers.sincos_2d(4, 5, 16)
    assert pe.shape == (20, 16)
    d = np.linalg.norm(pe[:, None] - pe[None], axis=-1)
    assert np.all(d[~np.eye(20, dtype=bool)] > 1e-3)
