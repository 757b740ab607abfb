"""Scaled dot-product attention, Softmax(QK^T / sqrt(d_k)) V, for self- and cross-attention.

Layout is jax's: q ``[B, Lq, H, Dh]``, k/v ``[B, Lk, Hkv, Dh]``, ``H`` a multiple of ``Hkv`` (grouped-query). A
boolean ``mask`` (True = may attend) and an additive ``bias`` broadcast to ``[B, H, Lq, Lk]``; ``kv_lengths`` [B]
marks keys ``j >= kv_lengths[b]`` as padding (right padding, e.g. text), which fused kernels take as sequence lengths
instead of a dense mask. Softmax runs in float32. A query row with nothing to attend to returns zeros, never NaN.

Implementations (each computes the same function, to float rounding; docs/accelerators.md "Attention kernels"):
"auto" (default; ``resolve_implementation``, at trace time): "cudnn" on a GPU for bf16/fp16 and a head_dim cuDNN
takes, "pallas" on a TPU for key-only masks / lengths and no bias, else "xla", logging once why a kernel was passed
over. "reference": our einsum code, also whenever the probabilities (attention maps) or attention dropout are wanted
(no kernel has them; logged once). "xla" / "cudnn": ``jax.nn.dot_product_attention``; cudnn needs a CUDA GPU and
bf16/fp16 (else a ValueError says why) and runs on sequences padded to a multiple of 64 (``padded_attention``).
"pallas": jax's TPU splash kernel, key padding as kv segment ids, sequences padded to a multiple of 128, per shard
under a device mesh; off TPU in Pallas' interpret mode (slow: tests). Splash from jax rather than tokamax (which
wraps the same kernel): it ships with every jax we support, takes grouped-query heads and per-example segment ids and
pads head_dim; tokamax pins typeguard 2.13.3 and from 0.0.13 on needs Python >= 3.12; jax's older
``pallas.ops.tpu.flash_attention`` has no grouped-query heads. All support grad and vmap; the cuDNN and splash
kernels are ``custom_vjp``, without forward mode (``jax.jvp``, ``jax.hessian``): "auto" is "xla" on CPU, and "xla"
is the switch for forward-mode work on an accelerator.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vtfusion_jax import linear

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "pallas")

log = logging.getLogger(__name__)
_NOTED: set[str] = set()  # reasons already logged (_note_once)


def _as_4d(x: jax.Array | None, name: str) -> jax.Array | None:
    """Left-pads a mask/bias with singleton dims so that it has rank 4 ([B, H, Lq, Lk])."""
    if x is None:
        return None
    if x.ndim > 4:
        raise ValueError(f"{name} must broadcast to [B, H, Lq, Lk]; got rank {x.ndim} shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, L, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def attention_weights(
    q: jax.Array, k: jax.Array, *, mask: jax.Array | None = None, bias: jax.Array | None = None
) -> jax.Array:
    """Attention probabilities of the reference implementation: q, k, mask, bias as for ``dot_product_attention``
    -> float32 ``[B, H, Lq, Lk]``; rows with no valid key are all zero."""
    b, lq, h, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, lq, hkv, g, dh)
    # Products accumulate in float32 even for bf16 inputs; the scale is applied in float32 too.
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, h, lq, lk) * jnp.float32(dh**-0.5)
    if bias is not None:
        logits = logits + _as_4d(bias, "bias").astype(jnp.float32)
    mask = _as_4d(mask, "mask")
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # A fully masked row would otherwise be uniform over the (invalid) keys.
        probs = jnp.where(jnp.any(jnp.broadcast_to(mask, probs.shape), -1, keepdims=True), probs, 0.0)
    return probs


def _reference(q, k, v, mask, bias, dropout_fn):
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    probs = attention_weights(q, k, mask=mask, bias=bias)
    if dropout_fn is not None:
        probs = dropout_fn(probs)
    pg = probs.astype(v.dtype).reshape(b, hkv, h // hkv, lq, -1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", pg, v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, dh).astype(q.dtype), probs


def _and_lengths(mask: jax.Array | None, kv_lengths: jax.Array | None, lk: int) -> jax.Array | None:
    """The dense mask equal to ``mask`` and ``kv_lengths`` [B] together."""
    if kv_lengths is None:
        return mask
    m = (jnp.arange(lk) < kv_lengths[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
    return m if mask is None else _as_4d(mask, "mask") & m


def _note_once(reason: str) -> None:
    """Logs why attention left a kernel, once per reason and process (tracing repeats it per jit, scan, remat)."""
    if reason not in _NOTED:
        _NOTED.add(reason)
        log.info("attention: %s", reason)


def _cudnn_problem(dtype: Any, head_dim: int | None = None) -> str | None:
    """Why cuDNN's fused attention cannot run here (None when it can)."""
    if jax.default_backend() != "gpu":
        return f"cuDNN attention needs a CUDA GPU, but jax's default backend is {jax.default_backend()!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype)}"
    try:  # jax's own limit (jax/_src/cudnn/fused_attention_stablehlo.py): 256 from Hopper (sm_90) on, else 128
        max_dim = 256 if float(jax.devices()[0].compute_capability) >= 9.0 else 128
    except (AttributeError, ValueError):
        max_dim = 128
    if head_dim is not None and (head_dim % 8 or head_dim > max_dim):
        return f"cuDNN attention needs head_dim a multiple of 8 and <= {max_dim}, got {head_dim}"
    return None


def check_cudnn_available(dtype: Any) -> None:
    """Raises ValueError explaining why cuDNN attention cannot run here (no-op when it can)."""
    if problem := _cudnn_problem(dtype):
        raise ValueError(f"attention implementation 'cudnn': {problem}; use implementation='xla' (or 'auto').")


def _pallas_problem(mask: jax.Array | None, bias: jax.Array | None) -> str | None:
    """Why the splash kernel cannot take these inputs (None when it can)."""
    if bias is not None:
        return "an additive bias (the splash kernel takes none)"
    if mask is not None and _as_4d(mask, "mask").shape[1:3] != (1, 1):
        return "a mask that varies over heads or query positions (the splash kernel takes key padding only)"
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError as e:
        return f"the splash kernel is not importable ({e})"
    return None


def resolve_implementation(
    implementation: str, q: jax.Array, *, mask: jax.Array | None = None, bias: jax.Array | None = None
) -> str:
    """The implementation that runs: ``implementation`` itself unless it is "auto", which picks the backend's kernel
    when it takes these inputs (module docstring) and otherwise "xla", logging once why."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu":
        kernel, problem = "cudnn", _cudnn_problem(q.dtype, q.shape[-1])
    elif backend == "tpu":
        kernel, problem = "pallas", _pallas_problem(mask, bias)
    else:
        return "xla"
    if problem:
        _note_once(f"'auto' runs xla instead of {kernel}: {problem}")
        return "xla"
    return kernel


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    implementation: str = "auto",
    dropout_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Softmax(Q K^T / sqrt(d_k)) V.

    Args:
      q, k, v: ``[B, Lq, H, Dh]`` queries; ``[B, Lk, Hkv, Dh]`` keys and values, ``H % Hkv == 0``.
      mask, bias: optional, broadcastable to ``[B, H, Lq, Lk]``: boolean (True = may attend), additive logit bias.
      kv_lengths: optional int ``[B]``: keys ``j >= kv_lengths[b]`` are padding (combined with ``mask``).
      implementation: one of IMPLEMENTATIONS (module docstring).
      dropout_fn: optional function applied to the probabilities (attention dropout); forces the reference path.

    Returns:
      ``[B, Lq, H, Dh]`` in q's dtype; query rows with no valid key are exactly zero.
    """
    _check_shapes(q, k, v)
    impl = resolve_implementation(implementation, q, mask=mask, bias=bias)
    if dropout_fn is not None and impl != "reference":
        _note_once("attention dropout runs the reference path (no kernel has it)")
        impl = "reference"
    # Kernels never see an empty row (cuDNN would divide 0 by 0): length 0 runs as 1, and its output is zeroed below.
    lengths = None if kv_lengths is None else jnp.maximum(kv_lengths, 1).astype(jnp.int32)
    if impl == "reference":
        out = _reference(q, k, v, _and_lengths(mask, lengths, k.shape[1]), bias, dropout_fn)[0]
    elif impl == "cudnn":
        check_cudnn_available(q.dtype)
        out = padded_attention(q, k, v, mask=mask, bias=bias, kv_lengths=lengths, implementation="cudnn")
    elif impl == "pallas":
        if problem := _pallas_problem(mask, bias):
            raise ValueError(f"attention implementation 'pallas' cannot take {problem}; use 'auto' or 'xla'.")
        out = _pallas(q, k, v, _and_lengths(mask, lengths, k.shape[1]))
    else:
        out = _fused(q, k, v, mask, bias, impl, kv_lengths=lengths)
    if kv_lengths is not None:
        out = jnp.where((kv_lengths > 0)[:, None, None, None], out, jnp.zeros((), out.dtype))
    return out


def _fused(q, k, v, mask, bias, impl, q_lengths=None, kv_lengths=None):
    """jax.nn.dot_product_attention with our mask conventions (fully masked query rows give zeros)."""
    b, lq, h, _ = q.shape
    full = (b, h, lq, k.shape[1])
    # jax.nn.dot_product_attention wants masks/biases with full batch/head dims on some backends.
    mask4 = None if mask is None else jnp.broadcast_to(_as_4d(mask, "mask"), full)
    bias4 = None if bias is None else jnp.broadcast_to(_as_4d(bias, "bias"), full).astype(q.dtype)
    kw = dict(query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths, implementation=impl)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias4, mask=mask4, **kw)
    if mask4 is not None:  # a query row with no key to attend to: zeros
        out = out * jnp.any(mask4, axis=-1).transpose(0, 2, 1)[..., None].astype(out.dtype)  # [B, Lq, H, 1]
    return out


# cuDNN's fused attention kernels want sequence lengths that are multiples of 64 (197 ViT tokens run as 256).
CUDNN_SEQ_MULTIPLE = 64
# The splash kernel's blocks (and so the padded sequence lengths) are multiples of the TPU's 128 lanes.
PALLAS_BLOCK = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: jax.Array, axis: int, new_size: int, value: Any = 0) -> jax.Array:
    """Pads ``x`` at the end of ``axis`` to ``new_size``; a size-1 (broadcast) axis stays as it is."""
    if x.shape[axis] in (1, new_size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new_size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def padded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    implementation: str = "xla",
    multiple: int = CUDNN_SEQ_MULTIPLE,
) -> jax.Array:
    """``dot_product_attention`` run on sequences padded to a multiple of ``multiple``, with the padding masked.

    Padded keys are never attended and padded query rows are sliced off, so the result and its gradient equal the
    unpadded computation. Without mask or bias the kernel gets sequence lengths (``kv_lengths`` or the real length:
    no [B, H, Lq, Lk] bias in memory); otherwise the mask (lengths folded in) is padded False on keys, True on
    queries (no row becomes empty). Args as for ``dot_product_attention`` (``kv_lengths`` >= 1), ``implementation``
    "xla" (runs anywhere; tests) or "cudnn". Returns ``[B, Lq, H, Dh]``.
    """
    _check_shapes(q, k, v)
    b, lq, _, _ = q.shape
    lk = k.shape[1]
    if mask is not None or bias is not None:
        mask, kv_lengths = _and_lengths(mask, kv_lengths, lk), None
    lq_p, lk_p = _round_up(lq, multiple), _round_up(lk, multiple)
    if (lq_p, lk_p) == (lq, lk):
        return _fused(q, k, v, mask, bias, implementation, kv_lengths=kv_lengths)
    qp = _pad_axis(q, 1, lq_p)
    kp, vp = _pad_axis(k, 1, lk_p), _pad_axis(v, 1, lk_p)
    if mask is None and bias is None:
        q_len = jnp.full((b,), lq, jnp.int32)
        kv_len = jnp.full((b,), lk, jnp.int32) if kv_lengths is None else kv_lengths
        out = _fused(qp, kp, vp, None, None, implementation, q_lengths=q_len, kv_lengths=kv_len)
        return out[:, :lq]
    m = jnp.ones((1, 1, 1, lk), bool) if mask is None else _as_4d(mask, "mask")
    if m.shape[-1] == 1:  # a key axis broadcast from size 1 must become explicit to mask the padded keys
        m = jnp.broadcast_to(m, (*m.shape[:-1], lk))
    m = _pad_axis(_pad_axis(m, 2, lq_p, True), 3, lk_p, False)
    bp = None
    if bias is not None:
        bp = _pad_axis(_pad_axis(_as_4d(bias, "bias"), 2, lq_p), 3, lk_p)
    return _fused(qp, kp, vp, m, bp, implementation)[:, :lq]


def _pallas(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The splash kernel; ``mask`` key-only ([B or 1, 1, 1, Lk]) or None. Returns [B, Lq, H, Dh]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, lq, h, dh = q.shape
    lk = k.shape[1]
    key_ok = jnp.ones((b, lk), bool) if mask is None else jnp.broadcast_to(_as_4d(mask, "mask")[:, 0, 0], (b, lk))
    has_key = jnp.any(key_ok, -1)
    key_ok = key_ok.at[:, 0].set(key_ok[:, 0] | ~has_key)  # no empty row reaches the kernel (zeroed below)
    lq_p, lk_p = _round_up(lq, PALLAS_BLOCK), _round_up(lk, PALLAS_BLOCK)
    # [B, L, H, Dh] -> padded [B, H, L_p, Dh]; the kernel does not scale the logits, so q is scaled first.
    to_bhld = lambda x, n: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))), 1, 2)  # noqa: E731
    qt, kt, vt = to_bhld(q * jnp.asarray(dh**-0.5, q.dtype), lq_p), to_bhld(k, lk_p), to_bhld(v, lk_p)
    q_ids = jnp.ones((b, lq_p), jnp.int32)
    kv_ids = jnp.pad(key_ok, ((0, 0), (0, lk_p - lk))).astype(jnp.int32)  # 1 = real key; a query (id 1) sees those

    def run(qt, kt, vt, q_ids, kv_ids):  # one shard: [b, h, L_p, Dh]
        heads = splash.MultiHeadMask([splash.FullMask((lq_p, lk_p))] * qt.shape[1])
        kernel = splash.make_splash_mha(heads, head_shards=1, q_seq_shards=1, interpret=jax.default_backend() != "tpu")
        return jax.vmap(kernel)(qt, kt, vt, splash.SegmentIds(q_ids, kv_ids))

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:  # a Mosaic kernel is not partitioned by XLA: run it per shard
        from vtfusion_jax import sharding

        batch = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names) or None
        heads = "tensor" if "tensor" in mesh.axis_names else None
        spec = sharding.fit_spec(jax.sharding.PartitionSpec(batch, heads), kt.shape, mesh)  # H % Hkv == 0: fits q
        ids = jax.sharding.PartitionSpec(spec[0])
        run = jax.shard_map(run, in_specs=(spec, spec, spec, ids, ids), out_specs=spec, check_vma=False)
    out = jnp.swapaxes(run(qt, kt, vt, q_ids, kv_ids), 1, 2)[:, :lq]
    return jnp.where(has_key[:, None, None, None], out, jnp.zeros((), out.dtype))


class HeadsProjection(nn.Module):
    """A Dense layer whose kernel is stored at full rank ([D, H, Dh] for q/k/v, [H, Dh, D] for the output).

    Same parameter names and shapes as ``nn.DenseGeneral``, but the kernel is created at its full rank, so its
    logical axis names always match its rank (DenseGeneral initialises a flat 2-D kernel, which breaks sharding
    rules during flax's shape check). x: [..., *in] -> [..., *features] with ``in_dims`` contracted trailing axes.
    """

    features: tuple[int, ...]
    names: tuple[str, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    in_dims: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.in_dims :]
        # xavier_uniform over the flattened [fan_in, fan_out] matrix, as DenseGeneral would draw it.
        limit = np.sqrt(6.0 / (np.prod(in_shape) + np.prod(self.features)))
        xavier = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit)
        part, zeros = nn.with_logical_partitioning, nn.initializers.zeros_init()
        kernel = self.param("kernel", part(xavier, self.names), (*in_shape, *self.features), self.param_dtype)
        bias = self.param("bias", part(zeros, self.names[self.in_dims :]), self.features, self.param_dtype)
        y = linear.linear(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)
        return y + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query) attention with separate query and key/value inputs.

    ``inputs_kv=None`` gives self-attention, the other modality's tokens cross-attention. Axes: embed, heads, kv.

    Attributes:
      num_heads, num_kv_heads: query heads H; key/value heads (None = H; H must be a multiple).
      head_dim: per-head width (None = query feature dim // num_heads).
      qk_layernorm: LayerNorm on q and k per head (stabilises training; ViT-22B).
      dropout_rate: dropout on the attention probabilities.
      implementation: see the module docstring ("auto": the backend's kernel where it applies).
      sow_weights: sow the probabilities ``[B, H, Lq, Lk]`` as ``intermediates/attention_weights`` (attention maps).
      dtype: compute dtype; parameters are ``param_dtype``.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_layernorm: bool = False
    dropout_rate: float = 0.0
    implementation: str = "auto"
    sow_weights: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        kv_lengths: jax.Array | None = None,
        kv_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Attends from ``inputs_q`` [B, Lq, Dq] to ``inputs_kv`` [B, Lk, Dkv] (None: self-attention); ``mask``
        broadcasts to ``[B, H, Lq, Lk]``, True = may attend; ``kv_lengths`` [B]: keys from there on are padding;
        ``kv_index`` int [B]: ``inputs_kv`` holds K shared rows [K, Lk, Dkv] and query row b attends to row
        ``kv_index[b]`` (keys / values projected once per shared row, then gathered: the same result as
        ``inputs_kv[kv_index]``); ``deterministic`` disables dropout. Returns [B, Lq, Dq]."""
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        dq, h = inputs_q.shape[-1], self.num_heads
        hkv, dh = self.num_kv_heads or h, self.head_dim or dq // h
        proj = functools.partial(HeadsProjection, names=("embed", "heads", "kv"), dtype=self.dtype)
        proj = functools.partial(proj, param_dtype=self.param_dtype)
        q = proj((h, dh), name="query")(inputs_q)  # [B, Lq, H, Dh]
        k, v = (proj((hkv, dh), name=n)(inputs_kv) for n in ("key", "value"))  # [B or K, Lk, Hkv, Dh]
        if self.qk_layernorm:  # float32 LayerNorm over head_dim, as everywhere in this codebase
            init = lambda f: nn.with_logical_partitioning(f, ("kv",))  # noqa: E731
            norm = functools.partial(nn.LayerNorm, dtype=jnp.float32, param_dtype=jnp.float32)
            ones, zeros = nn.initializers.ones_init(), nn.initializers.zeros_init()
            norm = functools.partial(norm, scale_init=init(ones), bias_init=init(zeros))
            q = norm(name="query_norm")(q.astype(jnp.float32)).astype(self.dtype)
            k = norm(name="key_norm")(k.astype(jnp.float32)).astype(self.dtype)
        if kv_index is not None:  # shared rows: project once per row, then one copy per query row
            k, v = jnp.take(k, kv_index, axis=0), jnp.take(v, kv_index, axis=0)
        axes = ("batch", "length", "heads", "kv")
        q, k, v = (checkpoint_name(nn.with_logical_constraint(x, axes), "qkv_proj") for x in (q, k, v))
        dropout_fn = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout_fn = nn.Dropout(self.dropout_rate, deterministic=False)
        want_weights = self.sow_weights and self.is_mutable_collection("intermediates")
        if want_weights:  # the kernels never form the probabilities
            if self.implementation != "reference":
                _note_once("attention maps (sow_weights) run the reference path (kernels return no probabilities)")
            out, probs = _reference(q, k, v, _and_lengths(mask, kv_lengths, k.shape[1]), None, dropout_fn)
            self.sow("intermediates", "attention_weights", probs)
        else:
            kw = dict(mask=mask, kv_lengths=kv_lengths, implementation=self.implementation, dropout_fn=dropout_fn)
            out = dot_product_attention(q, k, v, **kw)
        out = HeadsProjection((dq,), ("heads", "kv", "embed"), self.dtype, self.param_dtype, in_dims=2, name="out")(out)
        return checkpoint_name(nn.with_logical_constraint(out, ("batch", "length", "embed")), "attn_out")


def attention_flops(lq: int, lk: int, d_q: int, d_kv: int, num_heads: int, head_dim: int, num_kv_heads: int) -> int:
    """Forward matmul FLOPs of one MultiHeadAttention call for one example (2 FLOPs per multiply-add).

    Counts the q/k/v/out projections and the score (QK^T) and value (PV) products.
    """
    hd = num_heads * head_dim
    kvd = num_kv_heads * head_dim
    proj = 2 * lq * d_q * hd + 2 * 2 * lk * d_kv * kvd + 2 * lq * hd * d_q
    scores_values = 2 * 2 * lq * lk * hd
    return proj + scores_values
