"""Dense-layer matmul with a hand-written backward pass (kernel gradient as ``x^T @ dy`` on flattened 2-D operands).

Every Dense layer of the library (``layers.dense`` through ``nn.Dense(dot_general=...)`` and
``attention.HeadsProjection``) contracts the trailing axes of ``x`` with the leading axes of the kernel. jax's
automatic transpose of that ``dot_general`` contracts the [B, L] axes of a 3-D activation for the kernel gradient,
and XLA:CPU then materialises a transposed copy of ``dy`` and runs a dot whose operands are both transposed. Here the
operands are flattened to 2-D first and the backward is written out: ``dx = dy @ w^T``, ``dw = x^T @ dy``. The
values are the same products (tests/test_linear.py compares outputs and gradients with ``jax.lax.dot_general``); the
per-dot cost on CPU is in docs/performance.md ("Where the time goes", benchmarks/profile_step.py). On CPU the
kernel gradient is computed with one operand transposed first (``CPU_TRANSPOSED_WEIGHT_GRAD`` below; the step-time
effect is measured side by side by benchmarks/weight_grad.py).

Anything other than that pattern (batch dimensions, contracting non-trailing axes, a ``preferred_element_type``)
falls through to ``jax.lax.dot_general`` unchanged.
"""

from __future__ import annotations

import math

import jax


@jax.custom_vjp
def _matmul(x2: jax.Array, w2: jax.Array) -> jax.Array:
    """[M, K] @ [K, N] -> [M, N]."""
    return x2 @ w2


def _matmul_fwd(x2, w2):
    return x2 @ w2, (x2, w2)


# XLA:CPU's fast GEMM path (YNNPACK/XNNPACK fusions) takes ``A @ B`` and ``A @ B^T`` but not ``A^T @ B``: a dot that
# contracts the lhs on its leading axis, as the kernel gradient ``x^T @ dy`` does, runs in XLA's Eigen dot at about
# half the speed (docs/performance.md, benchmarks/matmul_shapes.py). On CPU the smaller operand's transpose is
# materialised instead; optimization_barrier keeps XLA's simplifier from folding the transpose back into the dot
# (and, when dy is the one transposed, the product's transpose too). Other platforms keep the plain product (GPU
# and TPU GEMMs read transposed operands natively). Read while tracing: set it to False before building a step to
# trace the plain product (benchmarks/weight_grad.py times both).
CPU_TRANSPOSED_WEIGHT_GRAD = True


def _weight_grad_cpu(x2: jax.Array, dy: jax.Array) -> jax.Array:
    if x2.size <= dy.size:
        return jax.lax.optimization_barrier(x2.T) @ dy
    return jax.lax.optimization_barrier(jax.lax.optimization_barrier(dy.T) @ x2).T


def _weight_grad(x2: jax.Array, dy: jax.Array) -> jax.Array:
    """The kernel gradient ``x2^T @ dy`` ([M, K], [M, N] -> [K, N])."""
    if not CPU_TRANSPOSED_WEIGHT_GRAD:
        return x2.T @ dy
    return jax.lax.platform_dependent(x2, dy, cpu=_weight_grad_cpu, default=lambda a, b: a.T @ b)


def _matmul_bwd(res, dy):
    x2, w2 = res
    return dy @ w2.T, _weight_grad(x2, dy)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
    """Contracts the last ``in_dims`` axes of ``x`` with the first ``in_dims`` axes of ``kernel``.

    x: [..., *in], kernel: [*in, *out] -> [..., *out] (both in the same dtype).
    """
    if x.shape[x.ndim - in_dims :] != kernel.shape[:in_dims]:
        raise ValueError(f"linear: x {x.shape} and kernel {kernel.shape} disagree on the {in_dims} contracted axes")
    lead, out = x.shape[: x.ndim - in_dims], kernel.shape[in_dims:]
    k = math.prod(kernel.shape[:in_dims])
    y = _matmul(x.reshape(math.prod(lead), k), kernel.reshape(k, math.prod(out)))
    return y.reshape(*lead, *out)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Drop-in for ``jax.lax.dot_general`` (the ``dot_general`` of ``nn.Dense``) that routes the Dense pattern
    (trailing axes of lhs against leading axes of rhs, no batch axes) through ``linear``."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    dense_pattern = (
        not lb
        and not rb
        and tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim))
        and tuple(rc) == tuple(range(n))
        and precision is None
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
    )
    if not dense_pattern:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
        )
    return linear(lhs, rhs, n)
