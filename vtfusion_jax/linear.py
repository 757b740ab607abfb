"""Dense-layer matmul on flattened 2-D operands, with an opt-in CPU kernel-gradient trick.

Every Dense layer (``layers.dense`` via ``nn.Dense(dot_general=...)``, ``attention.HeadsProjection``) contracts the
trailing axes of ``x`` with the leading axes of the kernel; ``linear`` flattens both to 2-D and makes one product,
``_matmul``. By default that is plain ``x2 @ w2``, so ``jax.grad``, ``jax.jvp``, ``jax.hessian`` etc. all work.

``CPU_TRANSPOSED_WEIGHT_GRAD = True`` (opt-in; set before tracing a step) routes it through a ``jax.custom_vjp``
whose kernel gradient ``x^T @ dy`` transposes the smaller operand first, on CPU only: XLA:CPU's fast GEMM path takes
``A @ B`` and ``A @ B^T`` but not ``A^T @ B`` (docs/performance.md); ``optimization_barrier`` stops XLA folding the
transpose back. Same values to float32 rounding, but custom_vjp has no forward-mode rule (jvp raises). It is a
module-level switch, not a config field, so that every Dense layer need not carry a CPU-only knob.
benchmarks/weight_grad.py times both settings. Anything but the Dense pattern goes to ``jax.lax.dot_general``.
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
    """Contracts the last ``in_dims`` axes of ``x`` [..., *in] with the first ``in_dims`` axes of ``kernel``
    [*in, *out] (in the dtype of ``x``) -> [..., *out]."""
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
