"""Dense-layer matmul on flattened 2-D operands, with an opt-in CPU kernel-gradient trick.

Every Dense layer of the library (``layers.dense`` through ``nn.Dense(dot_general=...)`` and
``attention.HeadsProjection``) contracts the trailing axes of ``x`` with the leading axes of the kernel. ``linear``
flattens both operands to 2-D first and makes one product, ``_matmul`` (the single name through which every Dense
product passes). By default that product is plain ``x2 @ w2``, so jax
differentiates it in every mode: ``jax.grad``, ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` and Hessian-vector
products work through every model (tests/test_linear.py checks them for every fusion variant).

``CPU_TRANSPOSED_WEIGHT_GRAD = True`` (opt-in) routes the product through a ``jax.custom_vjp`` whose kernel
gradient ``x^T @ dy`` is computed, on CPU only, with the smaller operand transposed first: XLA:CPU's fast GEMM path
(YNNPACK/XNNPACK fusions) takes ``A @ B`` and ``A @ B^T`` but runs ``A^T @ B`` in its Eigen dot at about half the
speed (docs/performance.md); ``optimization_barrier`` keeps XLA's simplifier from
folding the transpose back into the dot. The values are the same products (gradients equal to float32 rounding),
but a custom_vjp has no forward-mode rule, so with the switch on ``jax.jvp`` / ``jax.hessian`` raise. It is a
module-level switch, read while tracing, rather than a model config field: it is a CPU-only speed knob that every
Dense layer of every tower, the attention projections and the heads would otherwise all have to carry. Set it
before building (tracing) a step; benchmarks/weight_grad.py times both settings side by side.

Anything other than the Dense pattern (batch dimensions, contracting non-trailing axes, a
``preferred_element_type``) falls through to ``jax.lax.dot_general`` unchanged.
"""

from __future__ import annotations

import math

import jax

CPU_TRANSPOSED_WEIGHT_GRAD = False  # opt-in CPU speed trick (module docstring); off: forward-mode autodiff works


def _matmul(x2: jax.Array, w2: jax.Array) -> jax.Array:
    """[M, K] @ [K, N] -> [M, N], the product of every Dense layer."""
    return _matmul_transposed_weight_grad(x2, w2) if CPU_TRANSPOSED_WEIGHT_GRAD else x2 @ w2


@jax.custom_vjp
def _matmul_transposed_weight_grad(x2: jax.Array, w2: jax.Array) -> jax.Array:
    return x2 @ w2


def _weight_grad_cpu(x2: jax.Array, dy: jax.Array) -> jax.Array:
    if x2.size <= dy.size:
        return jax.lax.optimization_barrier(x2.T) @ dy
    return jax.lax.optimization_barrier(jax.lax.optimization_barrier(dy.T) @ x2).T


def _bwd(res, dy):
    x2, w2 = res
    dw = jax.lax.platform_dependent(x2, dy, cpu=_weight_grad_cpu, default=lambda a, b: a.T @ b)
    return dy @ w2.T, dw


_matmul_transposed_weight_grad.defvjp(lambda x2, w2: (x2 @ w2, (x2, w2)), _bwd)


def linear(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
    """Contracts the last ``in_dims`` axes of ``x`` with the first ``in_dims`` axes of ``kernel``.

    Args:
      x: [..., *in].
      kernel: [*in, *out], in the dtype of ``x``.
      in_dims: number of contracted axes.

    Returns:
      [..., *out].
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
