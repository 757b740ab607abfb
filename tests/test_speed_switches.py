"""Speed switches keep results: bf16 compute (float32 master weights) vs float32 on the full model, scan + remat
vs unrolled on the full model, the padded ("cudnn") attention path, and the persistent compilation cache."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vtfusion_jax import attention, layers
from vtfusion_jax.models.vtfusion import VisionTextModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------- full model

B, S, L, C = 4, 16, 8, 5
MODEL = dict(
    width=32,
    image_encoder=dict(name="vit", depth=1, num_heads=2, mlp_dim=64, patch_size=4),
    text_encoder=dict(name="bert", vocab_size=60, depth=1, num_heads=2, mlp_dim=64, max_len=8, post_ln=False),
    fusion=dict(name="co_attention", num_layers=1, num_heads=2, mlp_dim=64),
    head=dict(name="classification", hidden_dim=32),
)
# Layers per stack, by tower: one each keeps compiles short (tests/test_layers.py checks deeper scanned stacks).
DEPTHS = {"image_encoder": 1, "text_encoder": 1, "fusion": 1}


def _convert(params, fn):
    """Applies layers.scanned_to_unrolled / unrolled_to_scanned tower by tower (the stacks differ in depth)."""
    return {k: fn(v, DEPTHS[k]) if k in DEPTHS else v for k, v in params.items()}


def _batch():
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.uniform(size=(B, S, S, 3)), jnp.float32),
        "text_ids": jnp.asarray(rng.integers(1, 60, size=(B, L)), jnp.int32),
        "text_mask": jnp.asarray(np.arange(L)[None] < np.array([[8], [5], [3], [8]])),
        "label": jnp.asarray(rng.integers(0, C, size=B), jnp.int32),
    }


# Equivalence tests need no optimised code: the unoptimised backend compiles these programs twice as fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _params():
    """Random parameters of the unrolled float32 model (numpy: no init program to compile)."""
    shapes = layers.unbox(jax.eval_shape(VisionTextModel(MODEL, C).init, jax.random.key(0), _batch())["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), jnp.float32), shapes)


@functools.cache
def _loss_and_grads(**switches):
    """(loss, grads) of the full model with the given model-wide switches, at the same parameters."""
    batch = _batch()
    model = VisionTextModel(dict(MODEL, **switches), C)
    params = _params()
    if switches.get("scan_layers"):
        params = _convert(params, layers.unrolled_to_scanned)

    def loss(p):
        logits = model.apply({"params": p}, batch, train=True)["logits"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))

    step = jax.jit(jax.value_and_grad(loss)).lower(params).compile(compiler_options=FAST_COMPILE)
    value, grads = step(params)
    if switches.get("scan_layers"):
        grads = _convert(grads, layers.scanned_to_unrolled)
    return float(value), jax.tree.map(np.asarray, grads)


def test_bf16_matches_float32_to_bf16_tolerance():
    l32, g32 = _loss_and_grads()
    l16, g16 = _loss_and_grads(dtype="bfloat16")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(g16))  # float32 master weights and gradients
    assert abs(l16 - l32) < 2e-2 * max(1.0, abs(l32)), (l16, l32)
    a = np.concatenate([x.ravel() for x in jax.tree.leaves(g32)])
    b = np.concatenate([x.ravel() for x in jax.tree.leaves(g16)])
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2 %); through ~20 layers the gradient direction
    # stays within a few percent.
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.995
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.1
    # ... and bf16 did change the computation (a dtype switch that were ignored would pass the checks above).
    assert l16 != l32


def test_scan_and_remat_match_unrolled_on_the_full_model():
    l0, g0 = _loss_and_grads()
    l1, g1 = _loss_and_grads(scan_layers=True, remat_policy="full")
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- padded attention


def _qkv(lq=10, lk=7, h=4, hkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, lq, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, lk, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, lk, hkv, d)), jnp.float32)
    return q, k, v


def _masks(lq=10, lk=7, h=4):
    rng = np.random.default_rng(1)
    key = jnp.asarray(np.arange(lk)[None] < np.array([[lk], [3]]))[:, None, None, :]  # [B, 1, 1, Lk]
    full = jnp.asarray(rng.uniform(size=(2, 1, lq, lk)) > 0.4).at[0, 0, 2].set(False)  # one empty query row
    bias = jnp.asarray(rng.normal(size=(1, h, lq, lk)), jnp.float32)
    return {
        "none": {},
        "key_padding": dict(mask=key),
        "full_with_empty_row": dict(mask=full),
        "bias": dict(bias=bias),
        "mask_and_bias": dict(mask=key, bias=bias),
    }


@pytest.mark.parametrize("case", sorted(_masks()))
def test_padded_attention_equals_unpadded(case):
    """Padding to a multiple of 64 (xla implementation, so it runs on CPU) changes neither outputs nor gradients,
    for lengths below 64 and just above it."""

    def both(fn, q, k, v):
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))
        return fn(q, k, v), grads(q, k, v)

    def program(q1, k1, v1, q2, k2, v2):
        out = {}
        for name, (lq, lk, q, k, v) in {"short": (10, 7, q1, k1, v1), "long": (64, 70, q2, k2, v2)}.items():
            kw = _masks(lq, lk)[case]
            out[name] = (
                both(lambda *a, kw=kw: attention.dot_product_attention(*a, implementation="xla", **kw), q, k, v),
                both(
                    lambda *a, kw=kw: attention.padded_attention(*a, implementation="xla", multiple=64, **kw), q, k, v
                ),
            )
        return out

    out = jax.jit(program)(*_qkv(10, 7), *_qkv(64, 70))
    for name, (ref, pad) in out.items():
        for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(pad), strict=True):
            assert np.all(np.isfinite(np.asarray(y))), name
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=1e-5, err_msg=name)
        if case == "full_with_empty_row":
            assert not np.any(np.asarray(pad[0])[0, 2])  # a query with nothing to attend to still gives zeros


def test_cudnn_path_pads_to_multiples_of_64(monkeypatch):
    """implementation="cudnn" hands the fused kernel 64-multiple lengths (checked on CPU by standing the xla
    kernel in for cuDNN) and still returns the unpadded result."""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *args, implementation=None, **kw):
        seen.append((q.shape[1], k.shape[1], implementation, kw.get("mask") is not None))
        return real(q, k, v, *args, implementation="xla", **kw)

    monkeypatch.setattr(attention, "check_cudnn_available", lambda dtype: None)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = _qkv(10, 70)
    key = _masks(10, 70)["key_padding"]["mask"]
    for kw in ({}, dict(mask=key)):
        out, ref = jax.jit(
            lambda q, k, v, kw=kw: (
                attention.dot_product_attention(q, k, v, implementation="cudnn", **kw),
                attention._fused(q, k, v, kw.get("mask"), None, "xla"),
            )
        )(q, k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    # No mask: lengths go to the kernel as sequence lengths; with a mask: the padded mask.
    assert seen[0] == (64, 128, "cudnn", False) and seen[2] == (64, 128, "cudnn", True)


def test_cudnn_is_refused_off_gpu_with_a_reason():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attention.dot_product_attention(q.astype(jnp.bfloat16), k, v, implementation="cudnn")


# ---------------------------------------------------------------------------------------------- compilation cache


def test_persistent_compilation_cache_writes_entries(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {REPO!r})
        import jax, jax.numpy as jnp
        from vtfusion_jax import speed
        speed.enable_compilation_cache({str(tmp_path)!r})
        jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert any(tmp_path.iterdir()), "no cache entry written"
