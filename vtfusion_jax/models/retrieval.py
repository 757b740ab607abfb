"""Image-text retrieval: contrastive alignment (ITC) + image-text matching (ITM), after CLIP and ALBEF.

    image ─► image encoder ─► tokens [B, N, Di] ─► [token MLP] ─► masked mean ─► Dense(E) ─► L2 ─► image emb. [B, E]
    text  ─► text encoder  ─► tokens [B, L, Dt] ─► [token MLP] ─► masked mean ─► Dense(E) ─► L2 ─► text emb.  [B, E]
    (image tokens, text tokens) ─► fusion (any FUSIONS variant) ─► pooled ─► Dense(2) ─► ITM logits (match / not)

The optional per-token MLP (``pool_mlp_dim`` > 0, residual, DeepSets' phi) lets the pooled embedding encode which
object sits where. ITC: symmetric InfoNCE over the [B, B] similarities / tau, tau = clip(exp(log_tau), min, max)
learnt (the clip stops the gradient at the bounds); texts of the same ``image_id`` are all positives (uniform target).
ITM (ALBEF sec. 3.2): each image gets a hard negative text and each text a hard negative image, sampled by
softmax(similarity / tau) over the non-matching items of the global batch; the head classifies B positive and 2B
negative pairs. ``itm_similarity`` adds ``w * cos(text_emb, image_emb)`` (w learnt from 0) to the match logit, so
the fusion learns only a correction. Embeddings are gathered across devices (``gather_global``) first, so the loss
equals the single-device loss on the global batch.

``tower_embeddings=True`` (pretrained two-tower models, e.g. an imported CLIP / SigLIP, docs/pretrained.md): the ITC
embeddings are the towers' own pooled outputs (``return_pooled``: CLIP's projections, SigLIP's heads), L2-normalised,
and the head adds no projection; ``model.head.init_from`` imports tau = exp(-logit_scale) (and SigLIP's bias).
``contrastive="sigmoid"``: SigLIP's loss (Zhai et al. 2023), a logistic loss on every pair's logit cos / tau + b.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vtfusion_jax import layers, models
from vtfusion_jax.models.vtfusion import as_dict, shared_settings

CONTRASTIVE = ("softmax", "sigmoid")  # RetrievalHead.contrastive


def _l2(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class TokenMLP(nn.Module):
    """x + Dense(D)(gelu(Dense(hidden)(x))), per token: [B, N, D] -> [B, N, D]."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(layers.dense(self.hidden, "embed", "mlp", dtype=self.dtype, name="in")(x))
        return x + layers.dense(x.shape[-1], "mlp", "embed", dtype=self.dtype, name="out")(h)


class RetrievalHead(nn.Module):
    """ITC projections, the learnt temperature and the ITM classifier.

    Attributes:
      embed_dim: E, width of the contrastive embeddings.
      init_temperature, min_temperature, max_temperature: tau at initialisation and its clip range.
      itm_similarity: add w * cos(text_emb, image_emb) (w learnt, initialised at 0) to the ITM match logit.
      pool_mlp_dim, dtype: hidden width of the per-token residual MLP (0 = none); compute dtype.
      tower_embeddings: the encoders' pooled outputs are the embeddings (module docstring); no projections here.
      contrastive, init_logit_bias: ITC loss, CONTRASTIVE: "softmax" (InfoNCE) | "sigmoid" (SigLIP, with a learnt
        logit bias starting at init_logit_bias).
    """

    embed_dim: int = 64
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    itm_similarity: bool = False
    pool_mlp_dim: int = 0
    tower_embeddings: bool = False
    contrastive: str = "softmax"
    init_logit_bias: float = -10.0
    dtype: Any = jnp.float32

    def setup(self):
        if self.contrastive not in CONTRASTIVE:
            raise ValueError(f"unknown head.contrastive {self.contrastive!r}; valid: {CONTRASTIVE}")
        if self.tower_embeddings and (self.pool_mlp_dim or self.itm_similarity):
            raise ValueError("head.tower_embeddings=True takes the towers' embeddings: no pool_mlp_dim, itm_similarity")
        if not self.tower_embeddings:
            self.image_proj = layers.dense(self.embed_dim, None, "embed", dtype=self.dtype, name="image_proj")
            self.text_proj = layers.dense(self.embed_dim, None, "embed", dtype=self.dtype, name="text_proj")
        self.itm = layers.dense(2, None, None, dtype=self.dtype, name="itm")
        if self.contrastive == "sigmoid":
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_logit_bias), (), jnp.float32)
        if self.pool_mlp_dim:
            self.image_pool_mlp = TokenMLP(self.pool_mlp_dim, self.dtype, name="image_pool_mlp")
            self.text_pool_mlp = TokenMLP(self.pool_mlp_dim, self.dtype, name="text_pool_mlp")
        init = nn.initializers.constant(math.log(self.init_temperature))
        self.log_temperature = self.param("log_temperature", init, (), jnp.float32)
        if self.itm_similarity:
            zeros = nn.initializers.zeros_init()
            self.itm_similarity_scale = self.param("itm_similarity_scale", zeros, (), jnp.float32)

    def temperature(self) -> jax.Array:
        """float32 [] tau, clipped to [min_temperature, max_temperature]."""
        return jnp.clip(jnp.exp(self.log_temperature), self.min_temperature, self.max_temperature)

    def bias(self) -> jax.Array | None:
        """float32 [] logit bias ("sigmoid") or None."""
        return self.logit_bias if self.contrastive == "sigmoid" else None

    def embed_image(self, image, image_mask) -> jax.Array:
        """Image tokens [B, N, Di] -> L2-normalised float32 [B, E]."""
        if self.pool_mlp_dim:
            image = self.image_pool_mlp(image)
        return _l2(self.image_proj(layers.masked_mean(image, image_mask)).astype(jnp.float32))

    def embed_text(self, text, text_mask) -> jax.Array:
        """Text tokens [B, L, Dt] -> L2-normalised float32 [B, E]."""
        if self.pool_mlp_dim:
            text = self.text_pool_mlp(text)
        return _l2(self.text_proj(layers.masked_mean(text, text_mask)).astype(jnp.float32))

    def embed(self, image, image_mask, text, text_mask) -> tuple[jax.Array, jax.Array]:
        """Token outputs of the encoders -> L2-normalised float32 embeddings (image [B, E], text [B, E])."""
        return self.embed_image(image, image_mask), self.embed_text(text, text_mask)

    def match(self, pooled, similarity=None) -> jax.Array:
        """Fusion pooled [B, P] (+ the pairs' ITC cosine [B] with itm_similarity) -> ITM logits float32 [B, 2]
        (index 1 = matched)."""
        logits = self.itm(pooled).astype(jnp.float32)
        if self.itm_similarity:
            logits = logits.at[:, 1].add(self.itm_similarity_scale * similarity)
        return logits

    def __call__(self, image, image_mask, text, text_mask, pooled):
        img, txt = self.embed(image, image_mask, text, text_mask)
        return img, txt, self.match(pooled, jnp.sum(img * txt, -1)), self.temperature()


class RetrievalModel(nn.Module):
    """Encoders + fusion + RetrievalHead; ``model_config`` as VisionTextModel's with head.name = "retrieval"."""

    model_config: Any

    def setup(self):
        cfg = as_dict(self.model_config)
        shared = shared_settings(cfg)
        self.image_encoder = models.get_image_encoder(cfg["image_encoder"], shared)
        self.text_encoder = models.get_text_encoder(cfg["text_encoder"], shared)
        self.fusion = models.get_fusion(cfg["fusion"], shared)
        self.head = models._build("head", {"retrieval": RetrievalHead}, cfg["head"], shared)

    def encode_image(self, image, train: bool = False):
        """image [B, H, W, 3] -> (tokens [B, N, Di], mask [B, N], L2-normalised float32 embeddings [B, E])."""
        if self.head.tower_embeddings:
            tokens, mask, pooled = self.image_encoder(image, deterministic=not train, return_pooled=True)
            return tokens, mask, _l2(pooled.astype(jnp.float32))
        tokens, mask = self.image_encoder(image, deterministic=not train)
        return tokens, mask, self.head.embed_image(tokens, mask)

    def encode_text(self, text_ids, text_mask, train: bool = False):
        """text_ids [B, L] -> (tokens [B, L, Dt], mask [B, L], L2-normalised float32 embeddings [B, E])."""
        if self.head.tower_embeddings:
            tokens, mask, pooled = self.text_encoder(text_ids, text_mask, deterministic=not train, return_pooled=True)
            return tokens, mask, _l2(pooled.astype(jnp.float32))
        tokens, mask = self.text_encoder(text_ids, text_mask, deterministic=not train)
        return tokens, mask, self.head.embed_text(tokens, mask)

    def temperature(self):
        return self.head.temperature()

    def itc(self, image_emb, text_emb, image_id=None, mesh=None) -> tuple[jax.Array, jax.Array]:
        """The head's ITC loss and logits text x image (``itc_loss``) with its temperature (and bias)."""
        h = self.head
        return itc_loss(image_emb, text_emb, h.temperature(), image_id, mesh, h.bias(), h.contrastive)

    def itm_logits(self, image, image_mask, text, text_mask, train: bool = False) -> jax.Array:
        """Encoder tokens of B (image, text) pairs -> ITM logits float32 [B, 2]."""
        _, _, pooled = self.fusion(text, text_mask, image, image_mask, deterministic=not train)
        similarity = None
        if self.head.itm_similarity:
            img, txt = self.head.embed(image, image_mask, text, text_mask)
            similarity = jnp.sum(img * txt, -1)  # cos: both L2-normalised
        return self.head.match(pooled, similarity)

    def __call__(self, batch, train: bool = False) -> dict:
        """Runs every part once (initialisation); returns embeddings, temperature and the ITM logits of the pairs."""
        image, image_mask, img = self.encode_image(batch["image"], train)
        text, text_mask, txt = self.encode_text(batch["text_ids"], batch["text_mask"], train)
        itm_logits = self.itm_logits(image, image_mask, text, text_mask, train)
        return {"image_emb": img, "text_emb": txt, "temperature": self.temperature(), "itm_logits": itm_logits}


def gather_global(x: jax.Array, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Makes ``x`` replicated on every device of ``mesh`` (an all-gather over the data axes); None = as is."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def itc_logits(image_emb, text_emb, temperature, bias=None) -> jax.Array:
    """Similarity logits text x image [B_text, B_image] = text_emb @ image_emb.T / tau (+ bias)."""
    logits = (text_emb @ image_emb.T) / temperature
    return logits if bias is None else logits + bias


def itc_loss(
    image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array, image_id: jax.Array | None = None, mesh=None,
    bias: jax.Array | None = None, kind: str = "softmax") -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Symmetric InfoNCE ("softmax") or SigLIP's pairwise logistic loss ("sigmoid") over the global batch.

    Args:
      image_emb, text_emb, temperature: float32 [B, E] L2-normalised embeddings of pair b's image and text; tau [].
      image_id: int [B]; pairs with equal ids are all positives (None: only the diagonal).
      mesh: a jax.sharding.Mesh to gather the embeddings over first (negatives from every device), or None.
      bias, kind: a logit bias [] (or None) added to every logit; CONTRASTIVE. "sigmoid" is SigLIP's
        -sum(log sigmoid(z * logit)) / B, z = +1 for positives, -1 otherwise.

    Returns:
      (loss float32 [], similarity logits text x image [B, B] = ``itc_logits``).
    """
    image_emb, text_emb = gather_global(image_emb, mesh), gather_global(text_emb, mesh)
    logits = itc_logits(image_emb, text_emb, temperature, bias)  # [B_text, B_image]
    b = logits.shape[0]
    if image_id is None:
        pos = jnp.eye(b, dtype=bool)
    else:
        image_id = gather_global(image_id, mesh)
        pos = image_id[:, None] == image_id[None, :]
    if kind == "sigmoid":
        return -jnp.sum(jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))) / b, logits
    normalise = lambda p: p.astype(jnp.float32) / jnp.sum(p, axis=-1, keepdims=True)  # noqa: E731
    t2i = optax.softmax_cross_entropy(logits, normalise(pos))  # uniform over the positives of each row
    i2t = optax.softmax_cross_entropy(logits.T, normalise(pos.T))
    return (jnp.mean(t2i) + jnp.mean(i2t)) / 2, logits


def sample_hard_negatives(rng: jax.Array, logits: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ALBEF hard negatives (no gradient) from ``logits`` [B_text, B_image] = similarity / tau, never a pair with
    ``pos`` (bool [B_text, B_image]) True. Returns (negative text index for each image [B_image], negative image
    index for each text [B_text])."""
    logits = jax.lax.stop_gradient(logits)
    k1, k2 = jax.random.split(rng)
    neg_text = jax.random.categorical(k1, jnp.where(pos.T, -jnp.inf, logits.T), axis=-1)
    neg_image = jax.random.categorical(k2, jnp.where(pos, -jnp.inf, logits), axis=-1)
    return neg_text, neg_image
