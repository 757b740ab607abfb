"""Every fusion variant: runs under jit with padding, and limiting cases that pin down who attends to whom."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax import layers
from vtfusion_jax.models import FUSIONS, FusionBase, get_fusion
from vtfusion_jax.models.fusion import param_count

B, L, N, D = 2, 6, 9, 32
SIZE = dict(width=D, num_layers=2, num_heads=4, mlp_dim=64)  # shared settings: each variant takes those it has
# Default extra fields per variant in these tests (bottleneck with 2 shared tokens).
EXTRA = {"bottleneck": {"num_bottleneck": 2}}
TEXT_MASK = jnp.asarray(np.arange(L)[None, :] < np.array([[L], [3]]))  # second example: 3 real text tokens
IMAGE_MASK = jnp.asarray(np.arange(N)[None, :] < np.array([[7], [N]]))  # first example: 2 padded image tokens


def _tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


TEXT = _tokens(0, (B, L, D))
IMAGE = _tokens(1, (B, N, D))
IMAGE2 = _tokens(2, (B, N, D))


@functools.cache
def _model(name, **extra):
    """(fusion, params, jitted apply(params, text, image), jitted grad of a loss w.r.t. params and image)."""
    fusion = get_fusion(dict(name=name, **extra), SIZE)
    params = jax.jit(fusion.init)(jax.random.key(0), TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)
    apply = jax.jit(lambda p, t, i: fusion.apply(p, t, TEXT_MASK, i, IMAGE_MASK))

    def loss(p, image):
        t, _, pooled = fusion.apply(p, TEXT, TEXT_MASK, image, IMAGE_MASK)
        return jnp.sum(jnp.where(TEXT_MASK[..., None], t, 0.0) ** 2) + jnp.sum(pooled**2)

    return fusion, params, apply, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _randomize(params, seed=7):
    """Perturbs every parameter (so zero-initialised gates open and limiting cases are not trivially met)."""
    leaves, tree = jax.tree.flatten(layers.unbox(params))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_registry_entry_init_apply_grad_under_jit(name):
    fusion, params, apply, grad_fn = _model(name, **EXTRA.get(name, {}))
    t, i, pooled = apply(params, TEXT, IMAGE)
    assert t.shape == (B, L, D) and i.shape == (B, N, D)
    assert pooled.shape == (B, FUSIONS[name].pooled_width(fusion) or 2 * D)  # the registry's width (probe: Dt + Di)
    loss, (g_params, g_image) = grad_fn(_randomize(params), IMAGE)
    assert np.isfinite(float(loss))
    for g in jax.tree.leaves(g_params) + [g_image]:
        assert np.all(np.isfinite(np.asarray(g)))
    # Every parameter takes part in the computation (a parameter with zero gradient would be dead weight).
    dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(g_params) if not np.any(g)]
    assert not dead, dead


@pytest.mark.parametrize("name", [n for n in sorted(FUSIONS) if issubclass(FUSIONS[n].cls, FusionBase)])
def test_bfloat16_compute_float32_params(name):
    """Shapes and dtypes under bf16 compute, traced abstractly (no compile): bf16 outputs, float32 params/grads.
    (Not the probe: it passes its frozen features through in their own dtype.)"""
    fusion = get_fusion(dict(name=name, **EXTRA.get(name, {})), dict(SIZE, dtype=jnp.bfloat16))
    params = jax.eval_shape(fusion.init, jax.random.key(0), TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)
    t, i, pooled = jax.eval_shape(fusion.apply, params, TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)
    assert (t.dtype, i.dtype, pooled.dtype) == (jnp.bfloat16,) * 3
    assert t.shape == (B, L, D) and i.shape == (B, N, D)

    def loss(p):
        return jnp.sum(fusion.apply(p, TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)[2].astype(jnp.float32))

    grads = jax.eval_shape(jax.grad(loss), params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(layers.unbox(params)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(layers.unbox(grads)))


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_padding_never_leaks(name):
    """Outputs at real positions ignore whatever sits in padded text and image positions."""
    _, params, apply, _ = _model(name, **EXTRA.get(name, {}))
    params = _randomize(params)
    t, i, pooled = apply(params, TEXT, IMAGE)
    text_junk = TEXT.at[1, 3:].set(100.0)
    image_junk = IMAGE.at[0, 7:].set(-100.0)
    t2, i2, pooled2 = apply(params, text_junk, image_junk)
    np.testing.assert_allclose(np.asarray(t2[1, :3]), np.asarray(t[1, :3]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(t2[0]), np.asarray(t[0]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(i2[0, :7]), np.asarray(i[0, :7]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled2), np.asarray(pooled), atol=1e-4)


def test_gated_cross_is_identity_at_init():
    _, params, apply, _ = _model("gated_cross")
    t, _, _ = apply(params, TEXT, IMAGE)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(TEXT))
    # ... and only at init: once the gates open, the image matters.
    opened = _randomize(params)
    assert not np.allclose(np.asarray(apply(opened, TEXT, IMAGE)[0]), np.asarray(TEXT), atol=1e-3)


def test_merged_block_diagonal_equals_separate_streams():
    fusion, params, apply, _ = _model("merged", block_diagonal=True)
    params = _randomize(params)
    joint = apply(params, TEXT, IMAGE)
    separate = jax.jit(lambda p: fusion.apply(p, TEXT, TEXT_MASK, IMAGE, IMAGE_MASK, method=fusion.run_separately))(
        params
    )
    valid = [np.asarray(TEXT_MASK), np.asarray(IMAGE_MASK)]
    for a, b, m in zip(joint[:2], separate[:2], valid, strict=True):
        np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], atol=2e-5)
    np.testing.assert_allclose(np.asarray(joint[2]), np.asarray(separate[2]), atol=2e-5)
    # Without the block-diagonal mask the same parameters do mix the modalities.
    mixed = get_fusion(dict(name="merged", **SIZE))
    t_mixed = mixed.apply(params, TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)[0]
    assert not np.allclose(np.asarray(t_mixed)[valid[0]], np.asarray(separate[0])[valid[0]], atol=1e-3)


@pytest.mark.parametrize("name,extra", [("concat", {}), ("bottleneck", {"num_bottleneck": 0})])
def test_no_interaction_variants_ignore_the_image_on_the_text_side(name, extra):
    _, params, apply, _ = _model(name, **extra)
    params = _randomize(params)
    t1 = apply(params, TEXT, IMAGE)[0]
    t2 = apply(params, TEXT, IMAGE2)[0]
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))


@pytest.mark.parametrize(
    "name,extra",
    [("cross", {}), ("co_attention", {}), ("merged", {}), ("query", {}), ("bottleneck", EXTRA["bottleneck"])],
)
def test_interacting_variants_let_the_image_reach_the_text(name, extra):
    _, params, apply, grad_fn = _model(name, **extra)
    params = _randomize(params)
    t1 = apply(params, TEXT, IMAGE)[0]
    t2 = apply(params, TEXT, IMAGE2)[0]
    assert np.abs(np.asarray(t1) - np.asarray(t2))[np.asarray(TEXT_MASK)].max() > 1e-3
    _, (_, g) = grad_fn(params, IMAGE)
    assert np.abs(np.asarray(g)).max() > 1e-6
    # The gradient w.r.t. padded image tokens is exactly zero.
    assert np.all(np.asarray(g)[0, 7:] == 0.0)


def test_unknown_fusion_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: .*co_attention"):
        get_fusion(dict(name="co-attention"))
    with pytest.raises(ValueError, match="has no field 'num_layer'"):
        get_fusion(dict(name="cross", num_layer=2))


@pytest.mark.parametrize("name", ["co_attention", "merged", "query"])
def test_analytic_flops_match_xla_cost_analysis(name):
    """Matmul FLOPs dominate at this size: the analytic count must be within 10 % of XLA's total."""
    size = dict(width=128, num_layers=2, num_heads=4, mlp_dim=512)
    fusion = get_fusion(dict(name=name, **size))
    lt, li = 16, 64
    t, i = jnp.zeros((1, lt, 128)), jnp.zeros((1, li, 128))
    mt, mi = jnp.ones((1, lt), bool), jnp.ones((1, li), bool)
    params = jax.eval_shape(fusion.init, jax.random.key(0), t, mt, i, mi)
    compiled = jax.jit(fusion.apply).lower(params, t, mt, i, mi).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = fusion.flops_per_example(lt, li)
    assert abs(analytic - cost["flops"]) / cost["flops"] < 0.10, (analytic, cost["flops"])


def test_param_count_counts_every_weight():
    fusion = get_fusion(dict(name="gated_cross", **SIZE))
    # Per layer: cross-attention (4 D*D kernels + 4 D biases), MLP (2 D*M kernels + M + D biases),
    # two LayerNorms (2 D each) and two scalar gates. Plus the image key/value LayerNorm (2 D).
    per_layer = 4 * D * D + 4 * D + 2 * D * 64 + 64 + D + 4 * D + 2
    assert param_count(fusion, L, N) == 2 * per_layer + 2 * D


def test_relation_network_is_a_sum_over_object_pairs():
    """RN pools g over unordered sets of objects: permuting image tokens changes nothing; the image matters."""
    _, params, apply, _ = _model("rn")
    params = _randomize(params)
    _, _, pooled = apply(params, TEXT, IMAGE)
    perm = np.random.default_rng(3).permutation(7)  # permute the 7 real tokens of example 0, keep the padding
    image_perm = IMAGE.at[0, :7].set(IMAGE[0, perm])
    np.testing.assert_allclose(np.asarray(apply(params, TEXT, image_perm)[2]), np.asarray(pooled), rtol=1e-5)
    assert np.abs(np.asarray(apply(params, TEXT, IMAGE2)[2]) - np.asarray(pooled)).max() > 1e-3
    # Conditioned on the question: another question, another relation vector.
    assert np.abs(np.asarray(apply(params, TEXT[::-1], IMAGE)[2]) - np.asarray(pooled)).max() > 1e-3
    # Matches a direct double loop over pairs for example 1 (all 9 tokens real).
    p = layers.unbox(params)["params"]
    q = np.asarray(layers.masked_mean(TEXT, TEXT_MASK))[1]
    o = np.asarray(IMAGE[1])

    def lin(name, x):
        return x @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"])

    total = 0.0
    for a in range(N):
        for b in range(N):
            x = np.maximum(lin("g0_left", o[a]) + lin("g0_right", o[b]) + lin("g0_question", q), 0)
            for k in range(1, 4):
                x = np.maximum(lin(f"g{k}", x), 0)
            total = total + x
    expected = np.maximum(lin("f0", total), 0)
    np.testing.assert_allclose(np.asarray(pooled[1]), expected, rtol=2e-4, atol=2e-4)


def test_relation_network_token_pool_pairs_the_pooled_grid():
    """token_pool=2 on a 4 x 4 token grid == the unpooled RN on the 2 x 2 grid of cell means (same parameters);
    a cell whose tokens are all padding drops out of the pairs; a grid that cannot be pooled is refused."""
    spec = dict(name="rn", **SIZE)
    grid = _tokens(4, (B, 16, D))
    pooled_grid = grid.reshape(B, 2, 2, 2, 2, D).mean((2, 4)).reshape(B, 4, D)  # rows of 2x2 cells, row-major
    mask16, mask4 = jnp.ones((B, 16), bool), jnp.ones((B, 4), bool)
    rn2, rn1 = get_fusion(dict(spec, token_pool=2)), get_fusion(spec)
    params = _randomize(jax.jit(rn1.init)(jax.random.key(0), TEXT, TEXT_MASK, pooled_grid, mask4))
    out2 = rn2.apply(params, TEXT, TEXT_MASK, grid, mask16)[2]
    np.testing.assert_allclose(
        np.asarray(out2), np.asarray(rn1.apply(params, TEXT, TEXT_MASK, pooled_grid, mask4)[2]), rtol=1e-5, atol=1e-5
    )
    # The bottom-right cell (tokens 10, 11, 14, 15) all padding -> the 3 other cells only.
    pad = mask16.at[:, [10, 11, 14, 15]].set(False)
    np.testing.assert_allclose(
        np.asarray(rn2.apply(params, TEXT, TEXT_MASK, grid, pad)[2]),
        np.asarray(rn1.apply(params, TEXT, TEXT_MASK, pooled_grid, mask4.at[:, 3].set(False))[2]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert rn2.flops_per_example(L, 16) == rn1.flops_per_example(L, 4)
    with pytest.raises(ValueError, match="square grid"):
        rn2.apply(params, TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)  # 9 tokens: 3 x 3 is not divisible by 2


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_cross_image_pool_appends_a_masked_image_summary(pool):
    fusion, params, apply, _ = _model("cross", image_pool=pool)
    params = _randomize(params)
    t, _, pooled = apply(params, TEXT, IMAGE)
    assert pooled.shape == (B, 2 * D)
    np.testing.assert_allclose(pooled[:, :D], layers.masked_mean(t, TEXT_MASK), rtol=1e-5, atol=1e-5)
    # The summary is a pool of the LayerNorm'ed image tokens over real tokens only: padded image tokens never count.
    ln_params = layers.unbox(params)["params"]["image_kv_ln"]
    kv = np.asarray(layers.LayerNorm().apply({"params": ln_params}, IMAGE))
    mask = np.asarray(IMAGE_MASK)
    for b in range(B):
        real = kv[b][mask[b]]
        want = real.mean(0) if pool == "mean" else real.max(0)
        np.testing.assert_allclose(np.asarray(pooled)[b, D:], want, rtol=1e-5, atol=1e-5)
    # Changing a padded image token changes nothing.
    poked = IMAGE.at[0, -1].set(100.0)
    np.testing.assert_allclose(apply(params, TEXT, poked)[2], pooled, rtol=1e-6, atol=1e-6)


def test_cross_image_pool_rejects_unknown_mode():
    with pytest.raises(ValueError, match="image_pool"):
        _model("cross", image_pool="sum")


def test_cross_pool_product_appends_text_times_image_summary():
    """pool_product: pooled = [t; v; t * v] (the elementwise-product fusion of Antol et al. 2015) over the same
    text mean t and image summary v as image_pool alone; without an image summary it is an error."""
    _, params, apply, _ = _model("cross", image_pool="max")
    _, params_p, apply_p, _ = _model("cross", image_pool="max", pool_product=True)
    params = _randomize(params)
    pooled = np.asarray(apply(params, TEXT, IMAGE)[2])
    pooled_p = np.asarray(apply_p(params, TEXT, IMAGE)[2])  # same parameters: the product adds none
    assert pooled_p.shape == (B, 3 * D)
    np.testing.assert_allclose(pooled_p[:, : 2 * D], pooled, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled_p[:, 2 * D :], pooled[:, :D] * pooled[:, D:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool_product"):
        _model("cross", pool_product=True)


PER_IMAGE = [n for n in sorted(FUSIONS) if FUSIONS[n].per_image]


def test_the_per_image_variants():
    """The variants whose question-independent image work runs once per image (issue 30); the others gather first."""
    assert PER_IMAGE == ["bottleneck", "co_attention", "cross", "gated_cross", "query"]


@pytest.mark.parametrize(
    "name,scan", [(n, False) for n in PER_IMAGE] + [pytest.param("co_attention", True, marks=pytest.mark.slow)]
)
def test_per_image_work_equals_gathering_the_images_first(name, scan):
    """K = 3 images (one with 2 padded tokens) for 7 questions: outputs, and gradients w.r.t. the parameters and
    the K images, equal those of the images repeated per question; with dropout drawn (and with a scan) the
    stream-updating variants gather first (the same random draws: equal too)."""
    index = jnp.asarray([2, 0, 0, 1, 2, 2, 1], jnp.int32)
    lengths = np.array([[L], [3], [L], [4], [5], [L], [2]])
    text, text_mask = _tokens(3, (7, L, D)), jnp.asarray(np.arange(L)[None, :] < lengths)
    images, image_mask = _tokens(4, (3, N, D)), jnp.asarray(np.arange(N)[None, :] < np.array([[N], [7], [N]]))
    fusion = get_fusion(dict(name=name, dropout_rate=0.1, **EXTRA.get(name, {})), dict(SIZE, scan_layers=scan))
    params = _randomize(jax.jit(fusion.init)(jax.random.key(0), text, text_mask, images[index], image_mask[index]))

    def run(p, imgs, grouped, deterministic=True):
        args = (imgs, image_mask, dict(image_index=index)) if grouped else (imgs[index], image_mask[index], {})
        rngs = {"dropout": jax.random.key(1)}
        return fusion.apply(p, text, text_mask, *args[:2], deterministic=deterministic, rngs=rngs, **args[2])

    def loss(p, imgs, grouped):
        t, i, pooled = run(p, imgs, grouped)
        return jnp.sum(jnp.where(text_mask[..., None], t, 0) ** 2) + jnp.sum(i[:, :7] ** 2) + jnp.sum(pooled**2)

    @jax.jit
    def both(p, imgs):  # (grouped, gathered) x (outputs, outputs with dropout drawn, gradients): one compile
        grad = jax.grad(loss, argnums=(0, 1))
        return [(run(p, imgs, g), run(p, imgs, g, False), grad(p, imgs, g)) for g in (True, False)]

    grouped, gathered = both(params, images)
    close = lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)  # noqa: E731
    jax.tree.map(close, grouped, gathered)
