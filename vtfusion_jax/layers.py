"""Shared building blocks: float32 LayerNorm, MLP, Transformer blocks and the scan/remat layer stack.

Logical axis names (mapped to mesh axes in sharding.py): batch, length, embed, heads, kv, mlp, vocab (+ "layers",
the stacked axis of scanned parameters). Blocks share one convention so that ``Repeated`` can scan, remat or unroll
any of them: ``block(carry, aux, deterministic) -> (carry, None)``; ``carry``: the activations flowing from layer to
layer (array or tuple), ``aux``: what every layer sees unchanged (masks, the other modality).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vtfusion_jax import linear
from vtfusion_jax.attention import MultiHeadAttention, attention_flops

REMAT_POLICIES = ("none", "minimal", "full")

# Activation names tagged with jax.ad_checkpoint.checkpoint_name; "minimal" remat keeps only these.
MINIMAL_SAVE_NAMES = ("qkv_proj", "attn_out", "mlp_out")

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2: torch's and HF BERT / ViT's formula.

    ``jax.nn.gelu(x, approximate=False)`` up to float32 rounding, with the derivative Phi(x) + x phi(x) written out:
    one element-wise pass each way instead of the erfc form's several (erfc evaluates two branches).
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return x * cdf, t * (cdf + x * pdf)


# MLP activations: "gelu" exact (BERT, ViT), "gelu_tanh" (HF "gelu_new"), "quick_gelu" (CLIP, x * sigmoid(1.702 x)).
ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation_fn(name: str):
    """The activation function called ``name`` (see ACTIVATIONS); an unknown name lists the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(
    features: int, in_axis: str | None, out_axis: str, *, dtype: Any, name: str, use_bias: bool = True
) -> nn.Dense:
    """A Dense layer whose kernel [in, out] and bias [out] carry logical axis names (None: never sharded)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=linear.dot_general,  # 2-D products (vtfusion_jax/linear.py)
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (in_axis, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the input dtype (returns float32; callers cast back)."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises the last axis. x: [..., D] -> float32 [..., D]."""
        part = lambda init: nn.with_logical_partitioning(init, ("embed",))
        inits = dict(scale_init=part(nn.initializers.ones_init()), bias_init=part(nn.initializers.zeros_init()))
        norm = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name="ln", **inits)
        return norm(x.astype(jnp.float32))


class MLP(nn.Module):
    """Dense(mlp_dim) -> activation (default exact GELU) -> dropout -> Dense(D). x: [B, L, D] -> [B, L, D]."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        d = x.shape[-1]
        h = dense(self.mlp_dim, "embed", "mlp", dtype=self.dtype, name="fc1")(x)  # [B, L, M]
        # Default: exact (erf) GELU, as BERT and ViT use it: imported checkpoints compute what they were trained with.
        h = nn.with_logical_constraint(activation_fn(self.activation)(h), ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        out = dense(d, "mlp", "embed", dtype=self.dtype, name="fc2")(h)  # [B, L, D]
        return checkpoint_name(out, "mlp_out")


def mlp_flops(length: int, d: int, mlp_dim: int) -> int:
    """Forward matmul FLOPs of one MLP on one example."""
    return 2 * 2 * length * d * mlp_dim


def key_lengths(mask: jax.Array) -> jax.Array:
    """Right-padded mask [B, L] (True entries a prefix of each row: text, image and fusion masks) -> lengths [B]
    int32, what attention takes as ``kv_lengths`` (fused kernels read lengths, not a dense mask). Only for masks that
    are right-padded by contract: the lengths of any other mask describe a different one."""
    return jnp.sum(mask, axis=-1, dtype=jnp.int32)


def attend_to(keys: jax.Array | None) -> dict:
    """MultiHeadAttention keyword arguments for a block's key constraint: int [B] lengths (``key_lengths``) ->
    ``kv_lengths``; a bool mask -> ``mask`` (``key_mask``); None -> none."""
    if keys is not None and jnp.issubdtype(keys.dtype, jnp.integer):
        return dict(kv_lengths=keys)
    return dict(mask=key_mask(keys))


def key_mask(kv_mask: jax.Array | None) -> jax.Array | None:
    """Attention mask for MultiHeadAttention from a fusion-level mask.

    [B, Lk] (key padding, any pattern) -> [B, 1, 1, Lk]; [B, Lq, Lk] (full pattern, e.g. block-diagonal) ->
    [B, 1, Lq, Lk]. A right-padded [B, Lk] mask is better passed as ``key_lengths`` (``attend_to``).
    """
    if kv_mask is None:
        return None
    if kv_mask.ndim == 2:
        return kv_mask[:, None, None, :]
    if kv_mask.ndim == 3:
        return kv_mask[:, None, :, :]
    raise ValueError(f"mask must be [B, Lk] or [B, Lq, Lk], got shape {kv_mask.shape}")


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over valid tokens. x: [B, L, D], mask: [B, L] bool -> [B, D] (zeros if no token is valid)."""
    if mask is None:
        return jnp.mean(x, axis=1)
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * m, axis=1)
    return (total / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(x.dtype)


class TransformerBlock(nn.Module):
    """Self-attention (+ optional cross-attention) + MLP, pre-LN (default) or post-LN (BERT).

    carry: x [B, L, D]. aux: (mask, kv [B, Lk, Dkv] or None, kv_mask[, kv_index]); mask / kv_mask: lengths [B]
    (``key_lengths``), bool [B, L] / [B, L, L] (mask) or [B, Lk] (kv_mask), or None (``attend_to``); kv_index int [B]:
    kv holds shared rows [K, Lk, Dkv] (MultiHeadAttention's ``kv_index``).
    ``cross_attention=True``: self-attention, cross-attention to ``kv``, MLP (``cross_first``: cross before self).
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    cross_first: bool = False
    post_ln: bool = False
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    ln_epsilon: float = 1e-6
    sow_weights: bool = False
    dtype: Any = jnp.float32
    activation: str = "gelu"

    def _residual(self, x, sublayer, name, deterministic):
        """x + Dropout(sublayer(LN(x))) (pre-LN) or LN(x + Dropout(sublayer(x))) (post-LN)."""
        if self.post_ln:
            y = nn.Dropout(self.dropout_rate)(sublayer(x), deterministic=deterministic)
            return LayerNorm(self.ln_epsilon, name=f"{name}_ln")(x + y).astype(self.dtype)
        y = sublayer(LayerNorm(self.ln_epsilon, name=f"{name}_ln")(x).astype(self.dtype))
        return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

    @nn.compact
    def __call__(self, x: jax.Array, aux: tuple, deterministic: bool) -> tuple[jax.Array, None]:
        mask, kv, kv_mask, kv_index = (*aux, None)[:4]
        kw = dict(implementation=self.attention_impl, sow_weights=self.sow_weights, dtype=self.dtype)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
        self_attn = MultiHeadAttention(self.num_heads, **kw, name="self_attn")

        def do_self(x):
            attend = lambda y: self_attn(y, **attend_to(mask), deterministic=deterministic)  # noqa: E731
            return self._residual(x, attend, "self_attn", deterministic)

        def do_cross(x):
            cross_attn = MultiHeadAttention(self.num_heads, **kw, name="cross_attn")
            attend = lambda y: cross_attn(  # noqa: E731
                y, kv, **attend_to(kv_mask), kv_index=kv_index, deterministic=deterministic
            )
            return self._residual(x, attend, "cross_attn", deterministic)

        if self.cross_attention:
            x = do_self(do_cross(x)) if self.cross_first else do_cross(do_self(x))
        else:
            x = do_self(x)
        mlp = MLP(self.mlp_dim, self.dropout_rate, self.dtype, self.activation, name="mlp")
        x = self._residual(x, lambda y: mlp(y, deterministic), "mlp", deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def transformer_block_flops(
    length: int, d: int, mlp_dim: int, num_heads: int, kv_length: int = 0, d_kv: int = 0, cross: bool = False
) -> int:
    """Forward FLOPs of one TransformerBlock on one example (head_dim = d // num_heads, full kv heads)."""
    hd = d // num_heads
    f = attention_flops(length, length, d, d, num_heads, hd, num_heads) + mlp_flops(length, d, mlp_dim)
    if cross:
        f += attention_flops(length, kv_length, d, d_kv, num_heads, hd, num_heads)
    return f


def remat_policy(name: str):
    """Maps a config name to a jax checkpoint policy (None = rematerialise everything)."""
    if name == "minimal":
        return jax.checkpoint_policies.save_only_these_names(*MINIMAL_SAVE_NAMES)
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"unknown remat_policy {name!r}; valid: {REMAT_POLICIES}")


class Repeated(nn.Module):
    """``num_layers`` copies of ``block_cls(**block_kwargs)``, scanned (nn.scan) or unrolled, optionally remat'ed.

    Scanned parameters are stacked on a leading "layers" axis under ``stacked``, unrolled ones under ``layers_{i}``.
    """

    block_cls: Any
    block_kwargs: Any
    num_layers: int
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, carry: Any, aux: Any, deterministic: bool) -> Any:
        """Runs the stack. carry: activations flowing through layers; aux: per-layer constants."""
        cls = self.block_cls
        if self.remat_policy != "none":  # remat_policy() rejects an unknown name
            # static_argnums counts `self` as 0: deterministic is argument 3.
            policy = remat_policy(self.remat_policy)
            cls = nn.remat(cls, policy=policy, prevent_cse=not self.scan_layers, static_argnums=(3,))
        kwargs = dict(self.block_kwargs)
        if self.num_layers == 0:
            return carry
        if self.scan_layers:
            scanned = nn.scan(
                cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            carry, _ = scanned(**kwargs, name="stacked")(carry, aux, deterministic)
            return carry
        for i in range(self.num_layers):
            carry, _ = cls(**kwargs, name=f"layers_{i}")(carry, aux, deterministic)
        return carry


def scanned_to_unrolled(tree: Any, num_layers: int) -> Any:
    """Converts params of scanned ``Repeated`` stacks (nested dicts; every ``stacked`` subtree, stacked on axis 0) to
    the unrolled layout ``layers_0..layers_{n-1}``."""
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "stacked":
            for i in range(num_layers):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], unbox(value))
        else:
            out[key] = scanned_to_unrolled(value, num_layers)
    return out


def unrolled_to_scanned(tree: Any, num_layers: int) -> Any:
    """Inverse of ``scanned_to_unrolled``: every dict holding ``layers_0..layers_{n-1}`` gets them stacked on a new
    leading axis under ``stacked`` (the layout of ``Repeated(scan_layers=True)``). Leaves must be unboxed arrays."""
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    names = [f"layers_{i}" for i in range(num_layers)]
    out = {}
    if num_layers and all(n in tree for n in names):
        out["stacked"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[n] for n in names])
    for key, value in tree.items():
        if key not in out and not (key in names and "stacked" in out):
            out[key] = unrolled_to_scanned(value, num_layers)
    return out


def unbox(tree: Any) -> Any:
    """Strips flax Partitioned boxes (logical-axis metadata) from a param tree."""
    return nn.meta.unbox(tree)


def sincos_2d(h: int, w: int, d: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MoCo v3 / big_vision). Returns [h*w, d] float32."""
    if d % 4:
        raise ValueError(f"sincos_2d needs width divisible by 4, got {d}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(d // 4) / (d // 4 - 1 if d > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


POS_EMBS = ("learn", "sincos2d", "sincos2d_xy", "none")


class PositionEmbedding2D(nn.Module):
    """Adds a 2-D position embedding to a [B, h*w, D] token grid: learned ("learn"), fixed ("sincos2d"), or fixed
    plus a learned linear map of the cell centre's (x, y) in [-1, 1] ("sincos2d_xy": Santoro et al.'s coordinate
    channels, starting at unit scale so positions are readable from step 0)."""

    kind: str = "learn"

    @nn.compact
    def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
        h, w = hw
        d = x.shape[-1]
        if self.kind == "learn":
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed"))
            pe = self.param("pos_embedding", init, (h * w, d), jnp.float32)
        elif self.kind in ("sincos2d", "sincos2d_xy"):
            pe = jnp.asarray(sincos_2d(h, w, d))
            if self.kind == "sincos2d_xy":
                rows, cols = np.mgrid[:h, :w]
                xy = np.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1).reshape(h * w, 2)
                kernel = self.param(
                    "xy_kernel", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")), (2, d)
                )
                pe = pe + jnp.asarray(xy, jnp.float32) @ kernel
        elif self.kind == "none":
            return x
        else:
            raise ValueError(f"unknown position embedding {self.kind!r}; valid: {POS_EMBS}")
        return x + pe[None].astype(x.dtype)


def transformer_encoder(
    module: Any, x: jax.Array, mask: jax.Array | None, deterministic: bool, *, post_ln: bool = False
) -> jax.Array:
    """The Transformer stack of a text/image encoder: ``module.depth`` TransformerBlocks named ``encoder``.

    ``module`` supplies the sizes (num_heads, mlp_dim, dropout_rate, attention_impl, ln_epsilon, activation, dtype,
    depth, scan_layers, remat_policy). x: [B, L, D], mask: lengths [B], bool [B, L] or None -> [B, L, D].
    """
    fields = ("num_heads", "mlp_dim", "dropout_rate", "attention_impl", "ln_epsilon", "activation", "dtype")
    kwargs = dict({f: getattr(module, f) for f in fields}, post_ln=post_ln)
    stack = dict(num_layers=module.depth, scan_layers=module.scan_layers, remat_policy=module.remat_policy)
    return Repeated(TransformerBlock, kwargs, **stack, name="encoder")(x, (mask, None, None), deterministic)
