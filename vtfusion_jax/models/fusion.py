"""The fusion zoo: how text tokens and image tokens see each other.

One interface for every variant::

    text_out, image_out, pooled = fusion(text [B, L, Dt], text_mask [B, L], image [B, N, Di], image_mask [B, N],
                                         deterministic=True)
    # text_out [B, L, D], image_out [B, N, D], pooled [B, P]  (P = D or 2D, see each variant)

Inputs whose width differs from ``width`` are first projected by a Dense layer (``text_proj`` / ``image_proj``).
Masks are True on real tokens and right-padded (real tokens first: text; image masks are all True), so attention
gets them as lengths (``layers.key_lengths``: fused kernels skip the padding). Image-grouped batches (several
questions per image): a variant registered with ``per_image=True`` also takes ``image_index`` int [B]; ``image`` /
``image_mask`` then hold K distinct images [K, N, ...] and question b looks at image ``image_index[b]``; the variant
does its question-independent work once per image (the same result as ``image[image_index]``: tests/test_fusion.py)
and returns per-question tokens. Other variants get the rows gathered first (models/vtfusion.py). "LN" is a float32
LayerNorm; blocks are pre-LN residual (x + f(LN(x))). Each variant is registered once (``@register_fusion``,
models/registry.py: summary, paper, pooled width, attention maps); its class docstring gives the details and
``flops_per_example(text_len, image_len)`` its forward matmul FLOPs (input projections excluded). The variant tables
are generated from the registry by scripts/fusion_table.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import layers
from vtfusion_jax.attention import MultiHeadAttention, attention_flops
from vtfusion_jax.models.registry import FUSIONS, register_fusion  # noqa: F401  (FUSIONS: the registry)

FusionOutput = tuple[jax.Array, jax.Array, jax.Array]
_TOKEN_INIT = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))  # learned tokens [n, D]


def rows(x: jax.Array, index: jax.Array | None) -> jax.Array:
    """``x[index]`` along the batch axis: one row per question from one per image (None: ``x`` unchanged)."""
    return x if index is None else jnp.take(x, index, axis=0)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Sizes a fusion hands to its per-layer blocks (a plain value: flax would adopt a Module attribute)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_impl: str
    sow_weights: bool
    dtype: Any

    def block_kwargs(self, **extra) -> dict:
        """Keyword arguments for a layers.TransformerBlock of this size."""
        return dict(dataclasses.asdict(self), **extra)

    def mha(self, name: str) -> MultiHeadAttention:
        """A MultiHeadAttention of this size (built inside the calling module's compact method)."""
        kw = dict(num_heads=self.num_heads, implementation=self.attention_impl, sow_weights=self.sow_weights)
        return MultiHeadAttention(**kw, dtype=self.dtype, name=name)

    def ln(self, name: str) -> Callable[[jax.Array], jax.Array]:
        """A float32 LayerNorm whose output is cast back to the compute dtype."""
        norm = layers.LayerNorm(name=name)
        return lambda x: norm(x).astype(self.dtype)


class FusionBase(nn.Module):
    """Fields shared by every variant (the only base class: it holds configuration, not behaviour)."""

    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"
    sow_weights: bool = False
    dtype: Any = jnp.float32

    def block_config(self) -> BlockConfig:
        return BlockConfig(*(getattr(self, f.name) for f in dataclasses.fields(BlockConfig)))

    def block_kwargs(self, **extra) -> dict:
        """Keyword arguments for a TransformerBlock of this fusion's size."""
        return self.block_config().block_kwargs(**extra)

    def stack(self, block_cls: Any, name: str, **block_kwargs) -> layers.Repeated:
        """``num_layers`` blocks, scanned / remat'ed as configured."""
        return layers.Repeated(block_cls, block_kwargs, self.num_layers, self.scan_layers, self.remat_policy, name=name)

    def project(self, x: jax.Array, name: str) -> jax.Array:
        """[B, L, Din] -> [B, L, width]; identity when Din == width."""
        x = x.astype(self.dtype)
        if x.shape[-1] == self.width:
            return x
        # The input dim is another tower's width: left unsharded (None), so one mesh axis never shards two dims.
        return layers.dense(self.width, None, "embed", dtype=self.dtype, name=name)(x)

    def learned_tokens(self, name: str, n: int, batch: int) -> jax.Array:
        """``n`` learned tokens (a [n, D] float32 parameter) broadcast to the batch: [B, n, D] in the compute dtype."""
        tokens = self.param(name, _TOKEN_INIT, (n, self.width), jnp.float32)
        return jnp.broadcast_to(tokens.astype(self.dtype)[None], (batch, n, self.width))

    def ln(self, name: str) -> Callable[[jax.Array], jax.Array]:
        return self.block_config().ln(name)

    def grouped(self, image_index: jax.Array | None, deterministic: bool) -> bool:
        """Whether a stream-updating variant runs its first layer per image: an image-grouped batch, unrolled layers
        (a scan's carry keeps one shape) and no dropout drawn (per question, dropout masks differ per question)."""
        return image_index is not None and not self.scan_layers and (deterministic or self.dropout_rate == 0)

    def mha(self, name: str) -> MultiHeadAttention:
        return self.block_config().mha(name)

    # --- analytic FLOPs helpers (one example, forward) ---
    def _attn(self, lq: int, lk: int) -> int:
        d, h = self.width, self.num_heads
        return attention_flops(lq, lk, d, d, h, d // h, h)

    def _mlp(self, length: int) -> int:
        return layers.mlp_flops(length, self.width, self.mlp_dim)


@register_fusion(
    "concat",
    summary="nothing crosses: mean-pool each modality, concatenate (the baseline; CNN+MLP)",
    paper="Santoro et al. 2017 (CNN+MLP baseline)",
    pooled=2,
)
class ConcatFusion(FusionBase):
    """No cross-modal interaction: pool each modality and concatenate (the method's baseline; Santoro et al.'s
    CNN+MLP when followed by an MLP head). pooled = [masked_mean(text); masked_mean(image)], P = 2D."""

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic: bool = True) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")  # [B, L, D], [B, N, D]
        pooled = jnp.concatenate([layers.masked_mean(t, text_mask), layers.masked_mean(i, image_mask)], -1)
        return t, i, pooled

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        return 0


@register_fusion(
    "merged",
    summary="one stream: [text + e_t ; image + e_i] joint self-attention, every token sees every token",
    paper="ViLT (Kim et al. 2021), VisualBERT (Li et al. 2019)",
    pooled=2,
    attention_maps={"joint": "self_attn"},
)
class MergedFusion(FusionBase):
    """Merged attention, single stream (ViLT, Kim et al. 2021; VisualBERT, Li et al. 2019).

    [text; image] tokens (plus modality embeddings) in joint self-attention: every token sees every real token.
    ``block_diagonal=True`` forbids cross-modal attention (ablation: equals ``run_separately``). pooled =
    [masked_mean(text_out); masked_mean(image_out)], P = 2D.
    """

    block_diagonal: bool = False

    def setup(self):
        self.text_proj_fn = layers.dense(self.width, None, "embed", dtype=self.dtype, name="text_proj")
        self.image_proj_fn = layers.dense(self.width, None, "embed", dtype=self.dtype, name="image_proj")
        self.modality_embedding = self.param("modality_embedding", _TOKEN_INIT, (2, self.width), jnp.float32)
        self.blocks = self.stack(layers.TransformerBlock, "blocks", **self.block_kwargs())
        self.final_ln = layers.LayerNorm(name="final_ln")

    def _inputs(self, text, image):
        t = text.astype(self.dtype) if text.shape[-1] == self.width else self.text_proj_fn(text.astype(self.dtype))
        i = image.astype(self.dtype) if image.shape[-1] == self.width else self.image_proj_fn(image.astype(self.dtype))
        e = self.modality_embedding.astype(self.dtype)
        return t + e[0], i + e[1]

    def __call__(self, text, text_mask, image, image_mask, deterministic: bool = True) -> FusionOutput:
        t, i = self._inputs(text, image)
        lt = t.shape[1]
        x = jnp.concatenate([t, i], axis=1)  # [B, L+N, D]
        mask = jnp.concatenate([text_mask, image_mask], axis=1)  # [B, L+N]
        if self.block_diagonal:
            modality = jnp.arange(x.shape[1]) >= lt  # False = text, True = image
            same = modality[:, None] == modality[None, :]  # [L+N, L+N]
            mask = mask[:, None, :] & same[None]  # [B, L+N, L+N]
        x = self.final_ln(self.blocks(x, (mask, None, None), deterministic)).astype(self.dtype)
        t_out, i_out = x[:, :lt], x[:, lt:]
        pooled = jnp.concatenate([layers.masked_mean(t_out, text_mask), layers.masked_mean(i_out, image_mask)], -1)
        return t_out, i_out, pooled

    def run_separately(self, text, text_mask, image, image_mask, deterministic: bool = True) -> FusionOutput:
        """The same layers applied to each modality on its own (reference for the block-diagonal ablation)."""
        t, i = self._inputs(text, image)
        t_out = self.final_ln(self.blocks(t, (text_mask, None, None), deterministic)).astype(self.dtype)
        i_out = self.final_ln(self.blocks(i, (image_mask, None, None), deterministic)).astype(self.dtype)
        pooled = jnp.concatenate([layers.masked_mean(t_out, text_mask), layers.masked_mean(i_out, image_mask)], -1)
        return t_out, i_out, pooled

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        n = text_len + image_len
        return self.num_layers * (self._attn(n, n) + self._mlp(n))


@register_fusion(
    "cross",
    summary="text -> image cross-attention, then text self-attention and MLP; image unchanged (image_pool, "
    "pool_product: an image summary beside the text mean)",
    paper="one-way half of ViLBERT / LXMERT; pool_product: Antol et al. 2015",
    pooled=lambda f: (1 if f.image_pool == "none" else 3 if f.pool_product else 2) * f.width,
    attention_maps={"text_to_image": "cross_attn"},
    per_image=True,
)
class CrossFusion(FusionBase):
    """One-way cross-attention (the text-to-image half of ViLBERT/LXMERT; the "cross" model of the method).

    Per layer: text queries attend to LN(image), then text self-attention, then MLP; image tokens returned as
    projected. pooled = masked_mean(text_out), P = D; ``image_pool`` "mean"/"max" appends pool(LN(image)), P = 2D
    (as LXMERT/ViLBERT pool both streams); ``pool_product`` also appends t * v, P = 3D (Antol et al. 2015).
    """

    image_pool: str = "none"
    pool_product: bool = False

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic=True, image_index=None) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")
        kv = self.ln("image_kv_ln")(i)
        kw = self.block_kwargs(cross_attention=True, cross_first=True)
        blocks = self.stack(layers.TransformerBlock, "blocks", **kw)
        kv_len = layers.key_lengths(rows(image_mask, image_index))
        t = blocks(t, (layers.key_lengths(text_mask), kv, kv_len, image_index), deterministic)
        t = self.ln("final_ln")(t)
        pooled = layers.masked_mean(t, text_mask)
        if self.pool_product and self.image_pool == "none":
            raise ValueError("cross fusion pool_product=True needs an image summary (image_pool mean | max)")
        if self.image_pool == "mean":
            summary = layers.masked_mean(kv, image_mask).astype(pooled.dtype)
        elif self.image_pool == "max":
            masked = jnp.where(image_mask[..., None], kv, jnp.finfo(kv.dtype).min)
            summary = masked.max(axis=1).astype(pooled.dtype)
        elif self.image_pool != "none":
            raise ValueError(f"cross fusion image_pool must be none | mean | max, got {self.image_pool!r}")
        if self.image_pool != "none":
            summary = rows(summary, image_index)
            parts = [pooled, summary, pooled * summary] if self.pool_product else [pooled, summary]
            pooled = jnp.concatenate(parts, -1)
        return t, rows(i, image_index), pooled

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        per_layer = self._attn(text_len, image_len) + self._attn(text_len, text_len) + self._mlp(text_len)
        return self.num_layers * per_layer


class CoAttentionBlock(nn.Module):
    """One co-attention layer (METER's order): self-attention per stream, then each stream cross-attends to the
    other stream's post-self-attention tokens, then an MLP per stream. carry = (text, image, grouped): grouped =
    (image_index [B], image lengths [K]) while image holds one row per image (the first layer of an image-grouped
    batch: the image self-attention, its LNs and the text -> image keys / values run once per image), else None."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, carry, aux, deterministic: bool):
        t, i, grouped = carry
        text_len, image_len = aux  # [B] lengths
        index, own_len = grouped or (None, image_len)
        c = self.cfg
        norm, mha = c.ln, c.mha
        drop = lambda x: nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)  # noqa: E731
        y = norm("text_self_ln")(t)
        t = t + drop(mha("text_self_attn")(y, kv_lengths=text_len, deterministic=deterministic))
        y = norm("image_self_ln")(i)
        i = i + drop(mha("image_self_attn")(y, kv_lengths=own_len, deterministic=deterministic))
        tq, iq = norm("text_cross_ln")(t), norm("image_cross_ln")(i)
        kw = dict(kv_lengths=image_len, kv_index=index, deterministic=deterministic)
        t_new = t + drop(mha("text_to_image")(tq, iq, **kw))
        i, iq = rows(i, index), rows(iq, index)  # from here on one row per question
        i_new = i + drop(mha("image_to_text")(iq, tq, kv_lengths=text_len, deterministic=deterministic))
        mlp = lambda x, s: layers.MLP(c.mlp_dim, c.dropout_rate, c.dtype, name=f"{s}_mlp")(  # noqa: E731
            norm(f"{s}_mlp_ln")(x), deterministic
        )
        return (t_new + drop(mlp(t_new, "text")), i_new + drop(mlp(i_new, "image")), None), None


@register_fusion(
    "co_attention",
    summary="per layer: text -> text, image -> image, then text -> image and image -> text",
    paper="ViLBERT (Lu et al. 2019), LXMERT (Tan & Bansal 2019), METER (Dou et al. 2022)",
    pooled=2,
    attention_maps={"text_to_image": "text_to_image", "image_to_text": "image_to_text"},
    per_image=True,
)
class CoAttentionFusion(FusionBase):
    """Co-attention, two streams exchanging cross-attention both ways every layer (ViLBERT, LXMERT, METER).

    text -> text, image -> image, then text -> image and image -> text. pooled = [mean(text); mean(image)], P = 2D.
    """

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic=True, image_index=None) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")
        grouped = None
        if self.grouped(image_index, deterministic):
            grouped = (image_index, layers.key_lengths(image_mask))
        else:
            i = rows(i, image_index)
        image_mask = rows(image_mask, image_index)
        blocks = self.stack(CoAttentionBlock, "blocks", cfg=self.block_config())
        aux = (layers.key_lengths(text_mask), layers.key_lengths(image_mask))
        t, i, _ = blocks((t, i, grouped), aux, deterministic)
        t, i = self.ln("text_final_ln")(t), self.ln("image_final_ln")(i)
        pooled = jnp.concatenate([layers.masked_mean(t, text_mask), layers.masked_mean(i, image_mask)], -1)
        return t, i, pooled

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        lt, li = text_len, image_len
        attn = self._attn(lt, lt) + self._attn(li, li) + self._attn(lt, li) + self._attn(li, lt)
        return self.num_layers * (attn + self._mlp(lt) + self._mlp(li))


class GatedCrossBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: t += tanh(a_attn) * xattn(LN(t), image); t += tanh(a_mlp) * MLP(LN(t))."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, t, aux, deterministic: bool):
        kv, kv_len, kv_index = aux  # [B or K, N, D], [B] lengths, None or int [B] (MultiHeadAttention kv_index)
        c = self.cfg
        init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ())
        gate = lambda name: jnp.tanh(self.param(name, init, (), jnp.float32)).astype(c.dtype)  # noqa: E731
        kw = dict(kv_lengths=kv_len, kv_index=kv_index, deterministic=deterministic)
        attn = c.mha("cross_attn")(c.ln("cross_ln")(t), kv, **kw)
        t = t + gate("attn_gate") * nn.Dropout(c.dropout_rate)(attn, deterministic=deterministic)
        y = layers.MLP(c.mlp_dim, c.dropout_rate, c.dtype, name="mlp")(c.ln("mlp_ln")(t), deterministic)
        t = t + gate("mlp_gate") * nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)
        return t, None


@register_fusion(
    "gated_cross",
    summary="text -> image through tanh(alpha)-gated cross-attention and gated MLP, alpha = 0 at init",
    paper="Flamingo (Alayrac et al. 2022)",
    pooled=1,
    attention_maps={"text_to_image": "cross_attn"},
    has_gates=True,
    per_image=True,
)
class GatedCrossFusion(FusionBase):
    """Tanh-gated cross-attention (Flamingo, Alayrac et al. 2022): text -> image, gates initialised to 0 so that at
    initialisation the text tokens leave the fusion exactly as the text encoder produced them (no final LayerNorm,
    for the same reason). Image unchanged. pooled = masked_mean(text_out), P = D."""

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic=True, image_index=None) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")
        kv = self.ln("image_kv_ln")(i)
        aux = (kv, layers.key_lengths(rows(image_mask, image_index)), image_index)
        t = self.stack(GatedCrossBlock, "blocks", cfg=self.block_config())(t, aux, deterministic)
        return t, rows(i, image_index), layers.masked_mean(t, text_mask)

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        return self.num_layers * (self._attn(text_len, image_len) + self._mlp(text_len))


class BottleneckBlock(nn.Module):
    """One MBT layer: [text; z] and [image; z] each through their own Transformer block; z_new = mean of the two.
    carry = (text, image, z, grouped): grouped = (image_index [B], image mask [K, N], z [K, n, D]) while image holds
    one row per image (the first layer of an image-grouped batch: z is still the learned tokens, so the image stream
    [image; z] depends on the image alone and runs once per image), else None."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, carry, aux, deterministic: bool):
        t, i, z, grouped = carry
        text_mask, image_mask = aux
        index, own_mask, zi = grouped or (None, image_mask, z)
        c = self.cfg
        lt, li = t.shape[1], i.shape[1]

        def stream(name, x, mask, z):  # [x; z] through the stream's own block
            block = layers.TransformerBlock(**c.block_kwargs(), name=name)
            mask = jnp.concatenate([mask, jnp.ones(z.shape[:2], bool)], 1)
            return block(jnp.concatenate([x, z], 1), (mask, None, None), deterministic)[0]

        xt, xi = stream("text_block", t, text_mask, z), rows(stream("image_block", i, own_mask, zi), index)
        z = (xt[:, lt:] + xi[:, li:]) / 2
        return (xt[:, :lt], xi[:, :li], z, None), None


@register_fusion(
    "bottleneck",
    summary="[text ; z] and [image ; z] self-attend separately; only the n shared tokens z carry information across",
    paper="MBT (Nagrani et al. 2021)",
    pooled=2,
    attention_maps={"text_stream": "text_block/self_attn", "image_stream": "image_block/self_attn"},
    per_image=True,
)
class BottleneckFusion(FusionBase):
    """Attention bottlenecks (MBT, Nagrani et al. 2021): the modalities exchange information only through
    ``num_bottleneck`` shared tokens z. Each stream self-attends over itself plus z; z is then averaged over the two
    streams. With 0 bottleneck tokens the streams never interact. pooled = [mean(text); mean(image)], P = 2D."""

    num_bottleneck: int = 4

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic=True, image_index=None) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")
        z = self.learned_tokens("bottleneck", self.num_bottleneck, t.shape[0])  # [B, n, D]
        grouped = None
        if self.grouped(image_index, deterministic):
            grouped = (image_index, image_mask, jnp.broadcast_to(z[:1], (i.shape[0], *z.shape[1:])))  # rows equal
        else:
            i = rows(i, image_index)
        image_mask = rows(image_mask, image_index)
        blocks = self.stack(BottleneckBlock, "blocks", cfg=self.block_config())
        t, i, _, _ = blocks((t, i, z, grouped), (text_mask, image_mask), deterministic)
        t, i = self.ln("text_final_ln")(t), self.ln("image_final_ln")(i)
        pooled = jnp.concatenate([layers.masked_mean(t, text_mask), layers.masked_mean(i, image_mask)], -1)
        return t, i, pooled

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        lt, li = text_len + self.num_bottleneck, image_len + self.num_bottleneck
        return self.num_layers * (self._attn(lt, lt) + self._mlp(lt) + self._attn(li, li) + self._mlp(li))


class QueryBlock(nn.Module):
    """One query layer: q -> q (self), q -> image (cross), q -> text (cross), MLP."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, q, aux, deterministic: bool):
        image, image_len, text, text_len, image_index = aux  # lengths [B]; image_index: MultiHeadAttention kv_index
        c = self.cfg
        drop = lambda x: nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)  # noqa: E731
        mha, norm = c.mha, lambda name, x: c.ln(name)(x)  # noqa: E731
        q = q + drop(mha("self_attn")(norm("self_ln", q), deterministic=deterministic))
        kw = dict(kv_lengths=image_len, kv_index=image_index, deterministic=deterministic)
        q = q + drop(mha("image_attn")(norm("image_ln", q), image, **kw))
        q = q + drop(mha("text_attn")(norm("text_ln", q), text, kv_lengths=text_len, deterministic=deterministic))
        q = q + drop(layers.MLP(c.mlp_dim, c.dropout_rate, c.dtype, name="mlp")(norm("mlp_ln", q), deterministic))
        return q, None


@register_fusion(
    "query",
    summary="n learned queries: q -> q, q -> image, q -> text, MLP; finally text -> q",
    paper="Q-Former (BLIP-2, Li et al. 2023), Perceiver resampler (Jaegle et al. 2021)",
    pooled=1,
    attention_maps={"query_to_image": "image_attn", "text_to_query": "text_readout"},
    per_image=True,
)
class QueryFusion(FusionBase):
    """Learned queries (Q-Former, BLIP-2, Li et al. 2023; Perceiver resampler, Jaegle et al. 2021 / Flamingo).

    Per layer, ``num_queries`` learned tokens self-attend, then cross-attend to image, then to text; finally the text
    reads them with one cross-attention (text -> q), keeping [B, L, D]. Image unchanged. pooled = mean(queries), P = D.
    """

    num_queries: int = 8

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic=True, image_index=None) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")
        q = self.learned_tokens("queries", self.num_queries, t.shape[0])  # [B, Q, D]
        t_kv, i_kv = self.ln("text_kv_ln")(t), self.ln("image_kv_ln")(i)
        blocks = self.stack(QueryBlock, "blocks", cfg=self.block_config())
        image_len, text_len = layers.key_lengths(rows(image_mask, image_index)), layers.key_lengths(text_mask)
        q = blocks(q, (i_kv, image_len, t_kv, text_len, image_index), deterministic)
        q = self.ln("query_final_ln")(q)
        t = t + self.mha("text_readout")(t_kv, q, deterministic=deterministic)
        t = self.ln("text_final_ln")(t)
        return t, rows(i, image_index), jnp.mean(q, axis=1)

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        nq = self.num_queries
        per_layer = self._attn(nq, nq) + self._attn(nq, image_len) + self._attn(nq, text_len) + self._mlp(nq)
        return self.num_layers * per_layer + self._attn(text_len, nq)


@register_fusion(
    "rn",
    summary="no attention: an MLP g over every pair of image tokens + the question vector, summed, then f",
    paper="Relation Networks (Santoro et al. 2017)",
    pooled=lambda f: f.mlp_dim,
)
class RelationNetworkFusion(FusionBase):
    """Relation Network (Santoro et al. 2017): pooled = f(sum_{i,j} g([o_i; o_j; q])), o: real image tokens,
    q = masked_mean(text). g: ``g_layers`` ReLU layers of width ``mlp_dim``, the first applied per token and broadcast
    over pairs (W[o_i; o_j; q] = W_a o_i + W_b o_j + W_q q: N instead of N^2 first-layer matmuls); f: ``f_layers``
    ReLU layers of width ``mlp_dim``. Tokens pass through unchanged; P = mlp_dim; ``num_layers``/``num_heads`` unused.
    ``token_pool`` = k > 1 average-pools the row-major s x s token grid over k x k cells before pairing ((N / k^2)^2
    pairs; Santoro et al. pair a 5 x 5 map, so a shared 10 x 10 tower uses k = 2); a cell is real if any token is.
    """

    g_layers: int = 4
    f_layers: int = 1
    token_pool: int = 1

    def pool_tokens(self, image: jax.Array, image_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, N, D], [B, N] -> the k x k average-pooled grid [B, N / k^2, D] and its mask (identity for k = 1)."""
        k = self.token_pool
        if k == 1:
            return image, image_mask
        b, n, d = image.shape
        s = math.isqrt(n)
        if k < 1 or s * s != n or s % k:
            need = f"a square grid of image tokens with a side divisible by {k}; got {n} tokens"
            raise ValueError(f"rn fusion token_pool={k} needs {need}")
        grid = image.reshape(b, s // k, k, s // k, k, d)
        m = image_mask.reshape(b, s // k, k, s // k, k).astype(image.dtype)
        count = m.sum((2, 4))
        pooled = jnp.einsum("bikjld,bikjl->bijd", grid, m) / jnp.maximum(count, 1.0)[..., None]
        return pooled.reshape(b, -1, d), (count > 0).reshape(b, -1)

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic: bool = True) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")  # [B, L, D], [B, N, D]
        objects, object_mask = self.pool_tokens(i, image_mask)  # [B, N', D], N' = N / token_pool^2
        q = layers.masked_mean(t, text_mask)  # [B, D]
        h = self.mlp_dim
        dense = lambda name, in_axis="embed": layers.dense(h, in_axis, "mlp", dtype=self.dtype, name=name)  # noqa: E731
        left = dense("g0_left")(objects)[:, :, None, :]  # [B, N', 1, H]
        right = dense("g0_right")(objects)[:, None, :, :]  # [B, 1, N', H]
        cond = dense("g0_question")(q)[:, None, None, :]  # [B, 1, 1, H]
        x = nn.relu(left + right + cond)  # [B, N, N, H]
        for k in range(1, self.g_layers):
            x = nn.relu(layers.dense(h, None, "mlp", dtype=self.dtype, name=f"g{k}")(x))
        pair_mask = (object_mask[:, :, None] & object_mask[:, None, :]).astype(x.dtype)  # [B, N', N']
        x = jnp.einsum("bijh,bij->bh", x, pair_mask)  # sum over real pairs, [B, H]
        for k in range(self.f_layers):
            x = nn.relu(layers.dense(h, None, "mlp", dtype=self.dtype, name=f"f{k}")(x))
            x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return t, i, x

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        d, h, n = self.width, self.mlp_dim, image_len // self.token_pool**2  # pooling itself: N * D adds, not counted
        first = 2 * 2 * n * d * h + 2 * d * h
        return first + (self.g_layers - 1) * 2 * n * n * h * h + 2 * n * n * h + self.f_layers * 2 * h * h


def param_count(
    fusion: FusionBase, text_len: int, image_len: int, text_dim: int | None = None, image_dim: int | None = None
) -> int:
    """Number of parameters of ``fusion`` for inputs [1, text_len, text_dim] and [1, image_len, image_dim]."""
    t = jnp.zeros((1, text_len, text_dim or fusion.width))
    i = jnp.zeros((1, image_len, image_dim or fusion.width))
    m_t, m_i = jnp.ones((1, text_len), bool), jnp.ones((1, image_len), bool)
    shapes = jax.eval_shape(lambda: fusion.init(jax.random.key(0), t, m_t, i, m_i))
    return sum(x.size for x in jax.tree.leaves(layers.unbox(shapes.get("params", {}))))  # concat has none
