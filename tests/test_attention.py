"""dot_product_attention and MultiHeadAttention against an independent NumPy implementation."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax import attention, sharding
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


def numpy_attention_grads(q, k, v, mask, dout):
    """Float64 NumPy backward of ``numpy_attention`` (no bias): the gradients of sum(out * dout) w.r.t. q, k, v.

    Per batch row and head, with P = softmax(masked S), S = Q K^T / sqrt(d), O = P V: dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO V^T * P)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d); query rows with no valid key
    (output zero) get none. Key/value heads sum over the query heads of their group."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    allowed = np.broadcast_to(np.asarray(mask), (b, h, lq, lk))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            kk, vv, ok = k[bi, :, hi // g], v[bi, :, hi // g], allowed[bi, hi]
            s = np.where(ok, q[bi, :, hi] @ kk.T / np.sqrt(d), -np.inf)
            p = np.exp(s - np.nan_to_num(s.max(-1, keepdims=True), neginf=0.0))  # masked keys: exp(-inf) = 0
            p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)  # an empty row stays zero
            do = dout[bi, :, hi]
            dp = do @ vv.T
            ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
            dq[bi, :, hi] = ds @ kk / np.sqrt(d)
            dk[bi, :, hi // g] += ds.T @ q[bi, :, hi] / np.sqrt(d)
            dv[bi, :, hi // g] += p.T @ do
    return dq, dk, dv


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


def test_numpy_attention_grads_match_float64_finite_differences():
    """The NumPy backward used below agrees with central differences of the NumPy forward, in float64, along a random
    direction for each of q, k and v (a masked key padding and an empty query row included)."""
    *qkv, mask = _inputs(2)
    q, k, v = (np.asarray(x, np.float64) for x in qkv)
    rng = np.random.default_rng(7)
    dout = rng.normal(size=q.shape)
    f = lambda *a: np.sum(numpy_attention(*a, mask) * dout)  # noqa: E731
    grads = numpy_attention_grads(q, k, v, mask, dout)
    eps = 1e-5
    for i, (x, g) in enumerate(zip((q, k, v), grads, strict=True)):
        u = rng.normal(size=x.shape)
        plus, minus = [list((q, k, v)) for _ in range(2)]
        plus[i], minus[i] = x + eps * u, x - eps * u
        np.testing.assert_allclose(np.vdot(g, u), (f(*plus) - f(*minus)) / (2 * eps), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gradients_match_numpy_float64(impl, dtype, tol):
    """d/dq, d/dk, d/dv of every implementation against the float64 NumPy backward, with keys masked (padding) and a
    query row with none left; bf16 against the reference at the bf16-rounded inputs."""
    q, k, v, mask = _inputs(2)
    assert not np.asarray(mask)[:, :, 0].all() and not np.asarray(mask)[0, :, 1].any()

    def loss(q, k, v):
        out = dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, implementation=impl)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    rounded = [np.asarray(x.astype(dtype), np.float64) for x in (q, k, v)]
    expected = numpy_attention_grads(*rounded, mask, np.cos(numpy_attention(*rounded, mask)))
    for name, g, r in zip("qkv", grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=tol, rtol=tol, err_msg=f"d/d{name}, {impl}")


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


# ---------------------------------------------------------------------------------------------- kernels per backend


def _padded_inputs(seed=10, lq=5, lk=7, b=4, h=4, hkv=2, d=8):
    """q/k/v, kv_lengths [B] (4, all, 0: an example with nothing to attend to, 2) and a key-only mask [B, 1, 1, Lk]
    that is not a prefix (key 1 of example 0 masked)."""
    q, k, v, _ = _inputs(seed, b, lq, lk, h, hkv, d)
    lengths = jnp.asarray([4, lk, 0, 2], jnp.int32)
    key_ok = jnp.ones((b, 1, 1, lk), bool).at[0, ..., 1].set(False)
    return q, k, v, lengths, key_ok


def _dense(lengths, lk, mask=True):
    """The [B, 1, 1, Lk] boolean mask equal to ``lengths`` and ``mask`` together."""
    return mask & (np.arange(lk) < np.asarray(lengths)[:, None])[:, None, None, :]


def _value_and_grads(fn, q, k, v):
    """fn(q, k, v) and the gradients of sum(sin(fn)) w.r.t. q, k, v."""
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))  # noqa: E731
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _grads_vs_numpy(q, k, v, dense, got):
    """Checks (out, (dq, dk, dv)) from _value_and_grads against the float64 NumPy forward and backward."""
    out, grads = got
    expected = numpy_attention(q, k, v, dense)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    ref_grads = numpy_attention_grads(q, k, v, dense, np.cos(expected))
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), r, atol=2e-5, rtol=2e-5, err_msg=f"d/d{name}")


def test_auto_picks_the_backend_kernel_and_logs_once_why_not(monkeypatch, caplog):
    """ "auto" -> cudnn on GPU (bf16/fp16, head_dim % 8 == 0, <= 128 without a compute capability), pallas on TPU (key
    padding only, no bias), xla elsewhere; each reason it passes a kernel over is logged once. Explicit names stay."""
    monkeypatch.setattr(attention, "_NOTED", set())
    caplog.set_level(logging.INFO, "vtfusion_jax.attention")
    bf16 = jnp.zeros((2, 3, 2, 8), jnp.bfloat16)
    key_only, per_query = np.ones((2, 1, 1, 5), bool), np.ones((2, 1, 3, 5), bool)
    cases = {
        "cpu": [(bf16, {}, "xla")],
        "gpu": [
            (bf16, {}, "cudnn"),
            (jnp.zeros((2, 3, 2, 128), jnp.float16), {}, "cudnn"),
            (bf16.astype(jnp.float32), {}, "xla"),  # reason: dtype
            (jnp.zeros((2, 3, 2, 12), jnp.bfloat16), {}, "xla"),  # reason: head_dim
        ],
        "tpu": [
            (bf16, dict(mask=key_only), "pallas"),
            (bf16, dict(mask=per_query), "xla"),  # reason: mask over queries
            (bf16, dict(bias=per_query), "xla"),  # reason: bias
        ],
    }
    for backend, calls in cases.items():
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        for q, kw, want in calls * 2:  # twice: the second time logs nothing new
            assert attention.resolve_implementation("auto", q, **kw) == want, (backend, q.dtype, q.shape, kw)
            for name in ("xla", "reference", "cudnn", "pallas"):
                assert attention.resolve_implementation(name, q, **kw) == name
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 4 == len(set(reasons)), reasons
    for needle in (
        "bfloat16 or float16 inputs, got float32",
        "head_dim a multiple of 8 and <= 128, got 12",
        "query",
        "bias",
    ):
        assert sum(needle in r for r in reasons) == 1, (needle, reasons)


def test_attention_maps_and_dropout_log_once_that_they_leave_the_kernel(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_NOTED", set())
    caplog.set_level(logging.INFO, "vtfusion_jax.attention")
    x = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    mha = MultiHeadAttention(num_heads=2, sow_weights=True, dropout_rate=0.1)
    params = jax.eval_shape(mha.init, jax.random.key(0), x)
    for _ in range(2):  # traced twice, logged once per reason
        jax.eval_shape(lambda p, x: mha.apply(p, x, mutable=["intermediates"]), params, x)
        jax.eval_shape(
            lambda p, x: mha.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(1)}), params, x
        )
        jax.eval_shape(lambda p, x: mha.apply(p, x), params, x)  # the kernel path: nothing to say
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 2 and "attention maps (sow_weights)" in reasons[0] and "dropout" in reasons[1], reasons


def test_kv_lengths_equal_the_dense_mask_in_every_implementation_and_the_cudnn_padding(monkeypatch):
    """Key padding as lengths gives the dense mask's outputs and gradients (float64 NumPy) in reference and xla, and
    through the cuDNN path's padding logic (padded to 64, xla standing in for the kernel), which hands the kernel
    the lengths and no [B, H, Lq, Lk] mask. An example with length 0 gives zeros, without NaN."""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        seen.append((q.shape[1], k.shape[1], implementation, mask is None, kw["key_value_seq_lengths"] is not None))
        return real(q, k, v, bias, mask, **kw, implementation="xla")

    monkeypatch.setattr(attention, "check_cudnn_available", lambda dtype: None)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v, lengths, _ = _padded_inputs(lk=70)

    def program(q, k, v):
        impls = ("reference", "xla", "cudnn")
        return {
            i: _value_and_grads(lambda *a, i=i: _dpa(*a, kv_lengths=lengths, implementation=i), q, k, v) for i in impls
        }

    for impl, got in jax.jit(program)(q, k, v).items():
        assert np.all(np.asarray(got[0][2]) == 0.0), impl
        _grads_vs_numpy(q, k, v, _dense(lengths, 70), got)
    assert set(seen) == {(5, 70, "xla", True, True), (64, 128, "cudnn", True, True)}, seen


def test_pallas_kernel_in_interpret_mode_matches_numpy_forward_and_gradient():
    """The splash kernel (implementation="pallas": interpret mode on CPU) with grouped-query heads, key padding as
    lengths and as a non-prefix key mask, and an example with no key: outputs and gradients against float64 NumPy,
    under a (data 2, fsdp 2, tensor 2) mesh, where it runs per shard (shard_map over batch and heads)."""
    q, k, v, lengths, key_ok = _padded_inputs()
    fn = lambda *a: _dpa(*a, mask=key_ok, kv_lengths=lengths, implementation="pallas")  # noqa: E731
    with jax.set_mesh(sharding.make_mesh((2, 2, 2))):
        got = jax.jit(lambda q, k, v: _value_and_grads(fn, q, k, v))(q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    assert np.all(np.asarray(got[0][2]) == 0.0)
    _grads_vs_numpy(q, k, v, _dense(lengths, 7, np.asarray(key_ok)), got)


def test_text_and_image_padding_reach_attention_as_lengths(monkeypatch):
    """The BERT text encoder and the fusions whose attention sees one modality's padding pass it as kv_lengths, never
    a dense mask (so the kernels get sequence lengths); merged / bottleneck mix modalities and keep a mask."""
    from vtfusion_jax.models import get_fusion
    from vtfusion_jax.models.text import BertEncoder

    calls = []
    real = attention.dot_product_attention
    spy = lambda *a, **kw: calls.append((kw["mask"], kw["kv_lengths"])) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(attention, "dot_product_attention", spy)
    f32, mask = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32), lambda n: jax.ShapeDtypeStruct((2, n), bool)  # noqa: E731
    inputs = (f32(2, 5, 16), mask(5), f32(2, 4, 16), mask(4))  # text, text_mask, image, image_mask
    size = dict(width=16, num_layers=1, num_heads=2, mlp_dim=16)
    for name in ("cross", "co_attention", "gated_cross", "query", "merged", "bottleneck"):
        calls.clear()
        jax.eval_shape(get_fusion(dict(name=name), size).init, jax.random.key(0), *inputs)
        dense = name in ("merged", "bottleneck")
        with_keys = [c for c in calls if c != (None, None)]  # query's self-attention and text read-out have none
        assert with_keys and all((m is None) != dense and (n is None) == dense for m, n in with_keys), name
    calls.clear()
    bert = BertEncoder(vocab_size=10, width=16, depth=1, num_heads=2, mlp_dim=16, max_len=8)
    jax.eval_shape(bert.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 5), jnp.int32), mask(5))
    assert len(calls) == 1 and calls[0][0] is None and calls[0][1].shape == (2,)
