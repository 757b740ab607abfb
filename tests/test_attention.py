"""dot_product_attention and MultiHeadAttention against an independent NumPy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax.attention import MultiHeadAttention, attention_weights
from vtfusion_jax.attention import dot_product_attention as _dpa

# Jitted: eager dispatch of every small op is slower than one compile on this CPU.
dot_product_attention = jax.jit(_dpa, static_argnames=("implementation",))


def numpy_attention(q, k, v, mask=None, bias=None):
    """Plain NumPy float64 Softmax(QK^T/sqrt(d))V with explicit loops over heads (GQA by head // group)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    out = np.zeros((b, lq, h, d))
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d)  # [lq, lk]
            if bias is not None:
                logits = logits + np.broadcast_to(np.asarray(bias, np.float64), (b, h, lq, lk))[bi, hi]
            allowed = np.ones((lq, lk), bool)
            if mask is not None:
                allowed = np.broadcast_to(np.asarray(mask), (b, h, lq, lk))[bi, hi]
            for qi in range(lq):
                if not allowed[qi].any():
                    continue  # nothing to attend to: zeros
                row = np.where(allowed[qi], logits[qi], -np.inf)
                p = np.exp(row - row.max())
                p /= p.sum()
                out[bi, qi, hi] = p @ v[bi, :, hi // g]
    return out


def _inputs(seed, b=2, lq=5, lk=7, h=4, hkv=2, d=8, dtype=jnp.float32):
    """Random q/k/v (NumPy RNG: no per-op compiles) and a random key-padding mask with one fully masked row."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, lq, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, lk, hkv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, lk, hkv, d)), dtype)
    lengths = rng.integers(1, lk + 1, size=b)  # each batch row keeps a random prefix of keys
    key_ok = np.arange(lk)[None, :] < lengths[:, None]  # [B, Lk]
    mask = np.broadcast_to(key_ok[:, None, None, :], (b, 1, lq, lk)).copy()
    mask[0, :, 1, :] = False
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize(
    "shape",
    [
        dict(lq=5, lk=7, h=4, hkv=2),  # cross-attention Lq != Lk, grouped-query
        dict(lq=6, lk=6, h=4, hkv=4),  # self-attention, full heads
        dict(lq=3, lk=9, h=6, hkv=1),  # multi-query
    ],
)
def test_forward_matches_numpy_float32(impl, shape):
    q, k, v, mask = _inputs(0, **shape)
    bias = jnp.asarray(
        0.3 * np.random.default_rng(9).normal(size=(1, shape["h"], shape["lq"], shape["lk"])), jnp.float32
    )
    out = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=impl)
    expected = numpy_attention(q, k, v, mask, bias)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_forward_bfloat16_close_to_float64(impl):
    q, k, v, mask = _inputs(1, dtype=jnp.bfloat16)
    out = dot_product_attention(q, k, v, mask=mask, implementation=impl)
    assert out.dtype == jnp.bfloat16
    expected = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=5e-2, rtol=5e-2)


def test_softmax_runs_in_float32_for_bfloat16_inputs():
    # Logits that differ by less than bf16 resolution at this magnitude: a bf16 softmax would tie them.
    d = 4
    q = jnp.full((1, 1, 1, d), 8.0, jnp.bfloat16)
    k = jnp.stack([jnp.full((d,), 8.0), jnp.full((d,), 8.0 + 1 / 16)])[None, :, None, :].astype(jnp.bfloat16)
    probs = attention_weights(q, k)
    assert probs.dtype == jnp.float32
    assert probs[0, 0, 0, 1] > probs[0, 0, 0, 0]


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 6e-2)])
def test_gradients_match_reference(impl, dtype, tol):
    q, k, v, mask = _inputs(2)

    def loss(fn_impl, q, k, v):
        out = dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, implementation=fn_impl
        )
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    grads = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)

    ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
    if dtype == jnp.float32:
        # Anchor the reference gradient to the NumPy forward with a central finite difference.
        eps = 1e-3
        direction = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)
        f = lambda qq: np.sum(np.sin(numpy_attention(qq, k, v, mask)))  # noqa: E731
        fd = (f(np.asarray(q) + eps * np.asarray(direction)) - f(np.asarray(q) - eps * np.asarray(direction))) / (
            2 * eps
        )
        np.testing.assert_allclose(float(jnp.vdot(ref[0], direction)), fd, rtol=1e-3, atol=1e-3)
    for g, r in zip(grads, ref, strict=True):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fully_masked_rows_are_zero_without_nan(impl):
    q, k, v, _ = _inputs(4)
    mask = jnp.zeros((2, 1, 5, 7), bool).at[1, :, 2:, :3].set(True)  # batch 0 all masked, batch 1 partly
    out = dot_product_attention(q, k, v, mask=mask, implementation=impl)
    assert np.all(np.asarray(out[0]) == 0.0)
    assert np.all(np.asarray(out[1, :2]) == 0.0)
    assert np.all(np.abs(np.asarray(out[1, 2:])) > 0)
    g = jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, mask=mask, implementation=impl)))(q)
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g[0]) == 0.0)


def test_cudnn_on_cpu_raises_clear_error():
    q, k, v, _ = _inputs(5, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dot_product_attention(q, k, v, implementation="cudnn")


def test_bad_shapes_and_names_raise():
    q, k, v, _ = _inputs(6)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        _dpa(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        _dpa(q, k, v, implementation="flash")


def test_multi_head_attention_cross_and_sown_weights():
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, sow_weights=True, qk_layernorm=True)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    y = jax.random.normal(jax.random.key(1), (2, 7, 12))
    kv_mask = jnp.arange(7)[None, :] < jnp.array([[7], [3]])  # [B, Lk]
    mask = kv_mask[:, None, None, :]
    params = jax.jit(mha.init)(jax.random.key(2), x, y, mask=mask)
    apply = jax.jit(mha.apply, static_argnames=("mutable",))
    out, state = apply(params, x, y, mask=mask, mutable=("intermediates",))
    assert out.shape == (2, 5, 16)
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (2, 4, 5, 7)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, atol=1e-5)
    assert np.all(np.asarray(w[1, :, :, 3:]) == 0.0)  # padded keys get no weight
    # The sowing path (reference) and the plain path (xla) agree.
    np.testing.assert_allclose(np.asarray(apply(params, x, y, mask=mask)), np.asarray(out), atol=1e-5)
    # Changing a padded key/value leaves the output unchanged; changing a real one does not.
    y2 = y.at[1, 5].add(10.0)
    np.testing.assert_allclose(np.asarray(apply(params, x, y2, mask=mask)[1]), np.asarray(out[1]), atol=1e-5)
    y3 = y.at[1, 0].add(10.0)
    assert not np.allclose(np.asarray(apply(params, x, y3, mask=mask)[1]), np.asarray(out[1]), atol=1e-3)


def test_attention_dropout_is_deterministic_off_and_random_on():
    mha = MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (1, 4, 8))
    params = mha.init(jax.random.key(1), x)
    a = mha.apply(params, x, deterministic=True)
    b = mha.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    c = mha.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(b), np.asarray(c))
