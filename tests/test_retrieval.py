"""ITC / ITM: InfoNCE over the global batch on 8 devices == one device (and == a numpy reference), the temperature
is learnt and clipped, hard negatives are never positives and follow the similarities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testutil  # noqa: F401  (fast-compiling XLA flags + the session compilation cache)

from vtfusion_jax import sharding
from vtfusion_jax.models import retrieval


def _np_infonce(img, txt, tau, ids):
    logits = txt @ img.T / tau
    pos = ids[:, None] == ids[None, :]

    def ce(lg, p):
        lsm = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) - lg.max(1, keepdims=True)
        return -np.mean(np.sum(p / p.sum(1, keepdims=True) * lsm, 1))

    return (ce(logits, pos) + ce(logits.T, pos.T)) / 2


def _emb(key, b=16, e=8):
    x = np.asarray(jax.random.normal(key, (b, e)), np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_infonce_sharded_equals_single_device():
    img, txt = _emb(jax.random.PRNGKey(0)), _emb(jax.random.PRNGKey(1))
    ids = np.array([0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12, 13])  # two images with two captions each
    tau = 0.1
    ref = _np_infonce(img, txt, tau, ids)
    mesh = sharding.make_mesh((8, 1, 1))
    row = sharding.batch_sharding(mesh)
    args = [
        jax.device_put(jnp.asarray(a, jnp.float32 if a.dtype.kind == "f" else jnp.int32), row) for a in (img, txt, ids)
    ]
    assert len(args[0].sharding.device_set) == 8 and not args[0].sharding.is_fully_replicated
    sharded = jax.jit(lambda i, t, d: retrieval.itc_loss(i, t, jnp.float32(tau), d, mesh=mesh)[0])(*args)
    one = [jax.device_put(np.asarray(a), jax.devices()[0]) for a in args]
    single = jax.jit(lambda i, t, d: retrieval.itc_loss(i, t, jnp.float32(tau), d)[0])(*one)
    np.testing.assert_allclose(float(sharded), ref, rtol=1e-5)
    np.testing.assert_allclose(float(single), ref, rtol=1e-5)
    # the loss is not a mean of per-shard losses: with only 2 rows per device the negatives would differ
    per_shard = np.mean([_np_infonce(img[i : i + 2], txt[i : i + 2], tau, ids[i : i + 2]) for i in range(0, 16, 2)])
    assert abs(per_shard - ref) > 1e-3


def test_temperature_learnt_and_clipped():
    head = retrieval.RetrievalHead(embed_dim=4, init_temperature=0.07, min_temperature=0.01, max_temperature=0.5)
    x = jnp.ones((2, 3, 4))
    m = jnp.ones((2, 3), bool)
    params = sharding.unbox(head.init(jax.random.PRNGKey(0), x, m, x, m, jnp.ones((2, 4)))["params"])
    assert float(head.apply({"params": params}, method=head.temperature)) == pytest.approx(0.07, rel=1e-6)
    img, txt = jnp.asarray(_emb(jax.random.PRNGKey(2), 4, 4)), jnp.asarray(_emb(jax.random.PRNGKey(3), 4, 4))

    def loss(p):
        tau = head.apply({"params": p}, method=head.temperature)
        return retrieval.itc_loss(img, txt, tau)[0]

    grad = jax.jit(jax.grad(loss))
    g = grad(params)["log_temperature"]
    assert float(g) != 0.0  # learnt
    for value, expect in ((np.log(10.0), 0.5), (np.log(1e-4), 0.01)):
        p = dict(params, log_temperature=jnp.float32(value))
        assert float(head.apply({"params": p}, method=head.temperature)) == pytest.approx(expect)
        assert float(grad(p)["log_temperature"]) == 0.0  # clipped: no gradient beyond the bounds


def test_hard_negatives():
    b = 6
    ids = jnp.array([0, 0, 1, 2, 3, 4])
    pos = ids[:, None] == ids[None, :]
    logits = jax.random.normal(jax.random.PRNGKey(0), (b, b))
    for seed in range(20):
        nt, ni = retrieval.sample_hard_negatives(jax.random.PRNGKey(seed), logits, pos)
        assert not np.any(np.asarray(pos)[np.asarray(nt), np.arange(b)])  # text nt[i] is not image i's caption
        assert not np.any(np.asarray(pos)[np.arange(b), np.asarray(ni)])
    # a very similar non-matching text is sampled almost surely
    peaked = jnp.where(jnp.eye(b, k=1, dtype=bool) & ~pos, 50.0, 0.0)
    nt, ni = retrieval.sample_hard_negatives(jax.random.PRNGKey(1), peaked, pos)
    assert int(ni[2]) == 3  # text 2 is most similar to image 3


def test_itm_similarity_skip_feature():
    """itm_similarity: logit(match) = Dense(pooled)[1] + w * cos(text_emb, image_emb), w learnt from 0; off = plain."""
    kw = dict(embed_dim=4, init_temperature=0.07)
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    img_tok, txt_tok = jax.random.normal(k[0], (3, 5, 6)), jax.random.normal(k[1], (3, 7, 6))
    im, tm = jnp.ones((3, 5), bool), jnp.ones((3, 7), bool)
    pooled = jax.random.normal(k[2], (3, 6))
    plain, skip = retrieval.RetrievalHead(**kw), retrieval.RetrievalHead(itm_similarity=True, **kw)
    p0 = sharding.unbox(plain.init(jax.random.PRNGKey(0), img_tok, im, txt_tok, tm, pooled)["params"])
    p1 = sharding.unbox(skip.init(jax.random.PRNGKey(0), img_tok, im, txt_tok, tm, pooled)["params"])
    assert "itm_similarity_scale" not in p0 and float(p1["itm_similarity_scale"]) == 0.0
    p1 = dict(p1, itm_similarity_scale=jnp.float32(2.5))
    img, txt, logits, _ = skip.apply({"params": p1}, img_tok, im, txt_tok, tm, pooled)
    _, _, base, _ = plain.apply({"params": p0}, img_tok, im, txt_tok, tm, pooled)  # same Dense weights (same seed)
    cos = np.sum(np.asarray(img) * np.asarray(txt), -1)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(base[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits[:, 1]), np.asarray(base[:, 1]) + 2.5 * cos, rtol=1e-5, atol=1e-6)

    # the scale is learnt: the ITM loss of a matched pair with positive cosine has a non-zero gradient on w
    def match_loss(p):
        lg = skip.apply({"params": p}, img_tok, im, txt_tok, tm, pooled)[2]
        return -jnp.sum(jax.nn.log_softmax(lg)[:, 1] * jnp.sign(cos))

    assert abs(float(jax.grad(match_loss)(p1)["itm_similarity_scale"])) > 1e-3


def test_pool_mlp_separates_bindings_a_linear_pool_cannot():
    """Tokens {red+top, blue+bottom} vs {red+bottom, blue+top} have the same mean: the linear pool gives one
    embedding for both scenes, the per-token MLP (pool_mlp_dim > 0) two different ones."""
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    red, blue, top, bottom = (jax.random.normal(kk, (8,)) for kk in k)
    scene_a = jnp.stack([red + top, blue + bottom])[None]  # [1, 2, 8]
    scene_b = jnp.stack([red + bottom, blue + top])[None]
    mask = jnp.ones((1, 2), bool)
    for pool_mlp_dim, differ in ((0, False), (16, True)):
        head = retrieval.RetrievalHead(embed_dim=4, pool_mlp_dim=pool_mlp_dim)
        params = sharding.unbox(head.init(jax.random.PRNGKey(0), scene_a, mask, scene_a, mask, jnp.ones((1, 8))))
        emb_a, emb_b = (head.apply(params, x, mask, method=head.embed_image) for x in (scene_a, scene_b))
        gap = float(jnp.max(jnp.abs(emb_a - emb_b)))
        assert (gap > 1e-3) == differ, (pool_mlp_dim, gap)
        assert "image_pool_mlp" in params["params"] if pool_mlp_dim else "image_pool_mlp" not in params["params"]


def test_rerank_rule():
    """Candidates rank above the rest by ITM score (+ itc_scale * ITC); the rest keep their ITC scores."""
    from vtfusion_jax.tasks.retrieval import rerank

    itc = np.array([[0.9, 0.8, 0.1, 0.0]])  # one text, four images; candidates = images 0 and 1
    rows, cols = np.array([0, 0]), np.array([0, 1])
    itm = np.array([0.0, 0.5])  # ITM prefers image 1
    only = rerank(itc, rows, cols, itm, 0.0)
    assert np.argmax(only[0]) == 1 and list(np.argsort(-only[0])) == [1, 0, 2, 3]
    np.testing.assert_array_equal(only[0, 2:], itc[0, 2:])  # non-candidates untouched
    both = rerank(itc, rows, cols, itm, 10.0)  # ITC logits 9 vs 8 outweigh the ITM margin 0.5
    assert list(np.argsort(-both[0])) == [0, 1, 2, 3]
    assert both[0, 0] - both[0, 1] == pytest.approx(10.0 * 0.1 - 0.5)
    assert itc[0, 0] == 0.9  # the input is not modified


def test_sigmoid_itc_loss_matches_siglip_reference():
    """contrastive="sigmoid": -sum(log sigmoid(z * (cos / tau + b))) / B, z = +1 on positives (equal image ids);
    sharded over 8 devices it is the single-device loss, and the head's bias is learnt from init_logit_bias."""
    img, txt = _emb(jax.random.PRNGKey(0)), _emb(jax.random.PRNGKey(1))
    ids = np.array([0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12, 13])
    tau, bias = 0.1, -3.0
    logits = txt @ img.T / tau + bias
    z = np.where(ids[:, None] == ids[None, :], 1.0, -1.0)
    ref = np.sum(np.log1p(np.exp(-z * logits))) / len(ids)
    mesh = sharding.make_mesh((8, 1, 1))
    args = [jax.device_put(jnp.asarray(a), sharding.batch_sharding(mesh)) for a in (img, txt, ids)]
    fn = lambda i, t, d: retrieval.itc_loss(i, t, jnp.float32(tau), d, mesh, jnp.float32(bias), "sigmoid")[0]  # noqa: E731
    np.testing.assert_allclose(float(jax.jit(fn)(*args)), ref, rtol=1e-5)
    head = retrieval.RetrievalHead(embed_dim=4, contrastive="sigmoid", init_logit_bias=-10.0)
    x, m = jnp.ones((2, 3, 4)), jnp.ones((2, 3), bool)
    params = sharding.unbox(head.init(jax.random.PRNGKey(0), x, m, x, m, jnp.ones((2, 4)))["params"])
    assert float(params["logit_bias"]) == -10.0 and float(head.apply({"params": params}, method=head.bias)) == -10.0
    with pytest.raises(ValueError, match="valid: \\('softmax', 'sigmoid'\\)"):
        retrieval.RetrievalHead(contrastive="hinge").init(jax.random.PRNGKey(0), x, m, x, m, jnp.ones((2, 4)))
