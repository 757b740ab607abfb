"""Dense layers' 2-D products (vtfusion_jax/linear.py): same values and derivatives as ``jax.lax.dot_general`` in
forward and reverse mode by default, and the opt-in CPU kernel-gradient trick gives the same gradients; the
exact-GELU derivative (layers.gelu_exact) and host-memory reuse (vtfusion_jax/host_memory.py): same values as the
plain jax code, and the reuse really removes the per-call page faults. Whole models: tests/test_models.py."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtfusion_jax import host_memory, layers, linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(x, w, in_dims):
    contracted = tuple(range(x.ndim - in_dims, x.ndim))
    return jax.lax.dot_general(x, w, ((contracted, tuple(range(in_dims))), ((), ())))


@pytest.mark.parametrize(
    "x_shape,w_shape,in_dims", [((3, 5, 4), (4, 6), 1), ((2, 7, 3, 4), (3, 4, 5), 2), ((4,), (4, 2), 1)]
)
def test_linear_matches_dot_general_values_and_gradients(x_shape, w_shape, in_dims):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)
    out_shape = x_shape[: len(x_shape) - in_dims] + w_shape[in_dims:]
    cot = jax.random.normal(kc, out_shape)  # a random cotangent, so every output element weighs differently

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, in_dims) * cot)

    np.testing.assert_allclose(linear.linear(x, w, in_dims), _reference(x, w, in_dims), rtol=1e-5, atol=1e-5)
    got = jax.grad(loss(linear.linear), argnums=(0, 1))(x, w)
    want = jax.grad(loss(_reference), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_linear_rejects_mismatched_contraction():
    with pytest.raises(ValueError, match="disagree"):
        linear.linear(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_dot_general_falls_through_for_other_patterns():
    a, b = jnp.arange(24.0).reshape(2, 3, 4), jnp.arange(40.0).reshape(2, 4, 5)
    batched = (((2,), (1,)), ((0,), (0,)))  # a batch axis: not the Dense pattern
    np.testing.assert_array_equal(linear.dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))
    # preferred_element_type is honoured (lax path)
    out = linear.dot_general(
        a.astype(jnp.bfloat16), b[0].astype(jnp.bfloat16), (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    assert out.dtype == jnp.float32


def test_dense_with_linear_matches_flax_dense_gradients():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 8))
    ours = layers.dense(5, "embed", "mlp", dtype=jnp.float32, name="d")
    plain = nn.Dense(5, dtype=jnp.float32)
    params = nn.unbox(ours.init(jax.random.PRNGKey(2), x))

    def loss(module, p):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    g_ours = jax.grad(lambda p: loss(ours, p))(params)
    g_plain = jax.grad(lambda p: loss(plain, p))(params)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_forward_mode_by_default_and_the_opt_in_switch_refuses_it(monkeypatch):
    """jvp / jacfwd / hessian of a Dense product equal the dot_general reference's; with the CPU trick switched on
    (a custom_vjp) reverse mode still works and forward mode raises, which is why it is opt-in."""
    kx, kw, kt = jax.random.split(jax.random.PRNGKey(4), 3)
    x, w, t = jax.random.normal(kx, (3, 5, 4)), jax.random.normal(kw, (4, 6)), jax.random.normal(kt, (4, 6))

    def f(lin):
        return lambda w: jnp.sum(jnp.tanh(lin(x, w, 1)))

    assert not linear.CPU_TRANSPOSED_WEIGHT_GRAD
    ours, ref = f(linear.linear), f(_reference)
    np.testing.assert_allclose(jax.jvp(ours, (w,), (t,))[1], jax.jvp(ref, (w,), (t,))[1], rtol=1e-5)
    np.testing.assert_allclose(jax.jacfwd(ours)(w), jax.jacrev(ref)(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.hessian(ours)(w), jax.hessian(ref)(w), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(linear, "CPU_TRANSPOSED_WEIGHT_GRAD", True)
    np.testing.assert_allclose(jax.grad(ours)(w), jax.grad(ref)(w), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(ours, (w,), (t,))


@pytest.mark.parametrize("m,k,n", [(64, 16, 48), (64, 48, 16), (32, 24, 24)])  # x smaller, dy smaller, equal
def test_cpu_kernel_gradient_is_not_an_lhs_transposed_dot(m, k, n, monkeypatch):
    """With the opt-in switch on, the CPU kernel gradient x^T @ dy is computed with the smaller operand transposed
    first, so that no dot of the compiled gradient contracts its lhs on the leading axis (XLA:CPU's slow Eigen path);
    the default (plain autodiff of x @ w) has such a dot. Both give the same gradients."""
    import re

    if jax.default_backend() != "cpu":
        pytest.skip("the transposed kernel gradient is a CPU path")
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(3), 3)
    x, w, cot = jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n)), jax.random.normal(kc, (m, n))

    def grads_and_lhs_contracting(transposed):
        monkeypatch.setattr(linear, "CPU_TRANSPOSED_WEIGHT_GRAD", transposed)
        fn = jax.jit(jax.grad(lambda x, w: jnp.sum(linear.linear(x, w) * cot), argnums=(0, 1)))
        hlo = fn.lower(x, w).compile().as_text()
        return fn(x, w), re.findall(r" dot\(.*lhs_contracting_dims=\{(\d+)\}", hlo)

    (dx, dw), contracting = grads_and_lhs_contracting(True)
    (dx_plain, dw_plain), contracting_plain = grads_and_lhs_contracting(False)
    assert len(contracting) == 2 and "0" not in contracting  # dx = dy @ w^T and dw, both with lhs contracted last
    assert "0" in contracting_plain  # the plain kernel gradient: x^T @ dy as one dot
    np.testing.assert_allclose(dw, dw_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.asarray(x).T @ np.asarray(cot), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_plain, rtol=1e-6, atol=1e-6)


def test_gelu_exact_matches_jax_gelu_and_its_derivatives():
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jnp.array([0.0, -0.5, 3.7, -40.0, 40.0])])
    ref = lambda t: jax.nn.gelu(t, approximate=False)  # noqa: E731
    np.testing.assert_allclose(layers.gelu_exact(x), ref(x), rtol=1e-6, atol=1e-6)
    d1 = jax.vmap(jax.grad(layers.gelu_exact))(x)
    np.testing.assert_allclose(d1, jax.vmap(jax.grad(ref))(x), rtol=1e-5, atol=1e-6)
    d2 = jax.vmap(jax.grad(jax.grad(layers.gelu_exact)))(x)
    np.testing.assert_allclose(d2, jax.vmap(jax.grad(jax.grad(ref)))(x), rtol=1e-4, atol=1e-5)
    # limiting cases: GELU(x) -> x for large x, -> 0 for very negative x; GELU'(0) = 1/2
    assert float(layers.gelu_exact(40.0)) == 40.0 and float(layers.gelu_exact(-40.0)) == 0.0
    assert float(jax.grad(layers.gelu_exact)(0.0)) == pytest.approx(0.5)
    assert layers.ACTIVATIONS["gelu"] is layers.gelu_exact


# A jitted program whose temporary buffer (>= 2 x 64 MiB intermediates) is far above glibc's mmap threshold.
_FAULTS = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, {repo!r})
    from vtfusion_jax import host_memory
    info = host_memory.reuse_freed_memory(force=True) if sys.argv[1] == "reuse" else None
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.exp(jnp.sin(x) @ x) * jnp.cos(x)))
    x = jnp.ones((4096, 4096), jnp.float32) * 1e-3
    for _ in range(2):
        f(x).block_until_ready()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3
    print(json.dumps({{"faults_per_call": faults, "info": info}}))
    """
)


def _faults(mode):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS.format(repo=REPO), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two 4096^2 matmul subprocesses (~60 s)
@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt tuning applies to glibc only")
def test_reuse_freed_memory_removes_per_call_page_faults():
    plain, reused = _faults("plain"), _faults("reuse")
    assert reused["info"]["applied"], reused
    # Without it every call faults in its (>= 128 MiB) temporary buffer again: >= 16k pages of 4 KiB.
    assert plain["faults_per_call"] > 16_000, plain
    assert reused["faults_per_call"] < 0.05 * plain["faults_per_call"], (plain, reused)


def test_reuse_freed_memory_env_switch(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv(host_memory.ENV_SWITCH, "0")
    assert host_memory.reuse_freed_memory() == {
        "applied": False,
        "reason": "VTFUSION_REUSE_HOST_MEMORY=0",
        "glibc": None,
    }
    monkeypatch.setattr(host_memory, "_applied", None)  # do not leave the decision cached for this process


def test_cpu_backend_expected_reads_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert host_memory.cpu_backend_expected()[0] is False
    assert host_memory.reuse_freed_memory_on_cpu()["applied"] is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_backend_expected() == (True, "JAX_PLATFORMS=cpu")
