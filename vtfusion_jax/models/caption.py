"""Image captioning: any image encoder + a Transformer decoder (causal self-attention, cross-attention to the memory).

    image ─► image encoder ─► tokens [B, N, Di] ─► Dense(D) ─────────────────────────────┐ (keys / values)
    caption ids [B, T] ─► embed + learned positions ─► L x [causal self-attn, cross-attn ─┘, MLP] ─► LN ─► Dense(V)

Pre-LN blocks. Training is teacher-forced (``__call__``, causal mask); ``decode_step`` decodes one position with a
key/value cache (self-attention K/V in ``[B, T_max, H, Dh]`` buffers written at index t; the memory's K/V computed
once by ``cross_kv``). Greedy and beam search live in vtfusion_jax/decoding.py.

``model.memory`` picks what cross-attention reads:

  "image"  the image encoder's tokens [B, N, Di] (also a model spec without the key).
  "fused"  the output tokens of a fusion variant run on (P learned prompt tokens, image):
           memory = [text_out ; image_out] [B, P + N, D], mask [True * P ; image_mask].

The caption cannot be the fusion's text (teacher forcing would leak the targets into the memory), hence learned
prompt tokens; both fusion outputs are kept because variants differ in which stream they change. Parameters:
``fusion/prompt`` [P, D] and ``fusion/variant``, one tower (``model.fusion.freeze``, ``optim.lr_multipliers.fusion``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import layers, models
from vtfusion_jax.attention import HeadsProjection, dot_product_attention
from vtfusion_jax.models.vtfusion import as_dict, shared_settings

Cache = list  # per layer: (keys [B, T_max, H, Dh], values [B, T_max, H, Dh])


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the image, MLP (pre-LN residual blocks)."""

    width: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        h, dh = self.num_heads, self.width // self.num_heads
        proj = lambda name: HeadsProjection((h, dh), ("embed", "heads", "kv"), self.dtype, name=name)
        out = lambda name: HeadsProjection((self.width,), ("heads", "kv", "embed"), self.dtype, in_dims=2, name=name)
        self.self_ln, self.cross_ln, self.mlp_ln = (layers.LayerNorm(name=n) for n in ("self_ln", "cross_ln", "mlp_ln"))
        self.q, self.k, self.v, self.o = proj("query"), proj("key"), proj("value"), out("out")
        self.cq, self.ck, self.cv = (proj(f"cross_{n}") for n in ("query", "key", "value"))
        self.co = out("cross_out")
        self.mlp = layers.MLP(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")

    def cross_kv(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image tokens [B, N, D] -> cross-attention keys and values [B, N, H, Dh]."""
        return self.ck(image), self.cv(image)

    def __call__(self, x, self_mask, cross, cross_mask, cache=None, index=None, deterministic: bool = True):
        """x [B, T, D] (T = 1 with a cache) -> (x [B, T, D], updated cache or None).

        self_mask: bool broadcastable to [B, H, T, T] (unused with a cache: positions <= index are attended).
        cross: (keys, values) of the image; cross_mask [B, N]. cache: (keys, values) [B, T_max, H, Dh]."""
        y = self.self_ln(x).astype(self.dtype)
        q, k, v = self.q(y), self.k(y), self.v(y)
        new_cache = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
            new_cache = (k, v)
            self_mask = (jnp.arange(k.shape[1]) <= index)[None, None, None, :]
        # The decoder stays on xla: its one-token decode steps gain nothing from a padded fused kernel.
        x = x + self.o(dot_product_attention(q, k, v, mask=self_mask, implementation="xla"))
        y = self.cross_ln(x).astype(self.dtype)
        attn = dot_product_attention(self.cq(y), *cross, mask=cross_mask[:, None, None, :], implementation="xla")
        x = x + self.co(attn)
        x = x + self.mlp(self.mlp_ln(x).astype(self.dtype), deterministic)
        return x, new_cache


class CaptionDecoder(nn.Module):
    """Token embedding + learned positions + ``num_layers`` DecoderLayers + LN + vocabulary projection.

    Attributes:
      vocab_size, width: V (from the caption vocabulary), D.
      num_layers / num_heads / mlp_dim: decoder size.
      max_len, dropout_rate: T_max (positions), MLP dropout.
    """

    vocab_size: int = 64
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    max_len: int = 64
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.embed = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embed")
        pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        self.pos = self.param("pos_embed", pos_init, (self.max_len, self.width), jnp.float32)
        self.image_proj = layers.dense(self.width, None, "embed", dtype=self.dtype, name="image_proj")
        sizes = (self.width, self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype)
        self.blocks = [DecoderLayer(*sizes, name=f"layer_{i}") for i in range(self.num_layers)]
        self.final_ln = layers.LayerNorm(name="final_ln")
        self.logits = layers.dense(self.vocab_size, "embed", "vocab", dtype=self.dtype, name="logits")

    def prepare(self, image: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Encoder tokens [B, N, Di] -> per layer the cross-attention (keys, values) [B, N, H, Dh]."""
        img = self.image_proj(image.astype(self.dtype))
        return [blk.cross_kv(img) for blk in self.blocks]

    def init_cache(self, batch: int) -> Cache:
        """Zero key/value buffers [B, max_len, H, Dh] for every layer."""
        shape = (batch, self.max_len, self.num_heads, self.width // self.num_heads)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.num_layers)]

    def _out(self, x):
        return self.logits(self.final_ln(x).astype(self.dtype)).astype(jnp.float32)

    def __call__(self, tokens, image, image_mask, deterministic: bool = True) -> jax.Array:
        """Teacher forcing: tokens [B, T] (T <= max_len), image tokens [B, N, Di] -> logits float32 [B, T, V]."""
        return self._teacher_forced(tokens, self.prepare(image), image_mask, deterministic)

    def _teacher_forced(self, tokens, cross, image_mask, deterministic: bool = True) -> jax.Array:
        t = tokens.shape[1]
        x = (self.embed(tokens) + self.pos[:t][None]).astype(self.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        for blk, kv in zip(self.blocks, cross, strict=True):
            x, _ = blk(x, causal, kv, image_mask, deterministic=deterministic)
        return self._out(x)

    def decode_step(self, token, index, cache, cross, image_mask):
        """One position with the cache: token [B] at position ``index`` -> (logits float32 [B, V], new cache)."""
        x = (self.embed(token[:, None]) + jax.lax.dynamic_slice_in_dim(self.pos, index, 1)[None]).astype(self.dtype)
        new = []
        for blk, kv, c in zip(self.blocks, cross, cache, strict=True):
            x, c = blk(x, None, kv, image_mask, cache=c, index=index)
            new.append(c)
        return self._out(x)[:, 0], new

    def decode_full(self, tokens, index, cross, image_mask):
        """Without a cache: the whole buffer tokens [B, T_max] again, logits at position ``index`` -> [B, V]."""
        logits = self._teacher_forced(tokens, cross, image_mask)
        return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)


MEMORIES = ("image", "fused")


class FusedMemory(nn.Module):
    """``prompt_len`` learned prompt tokens and the image tokens through a fusion variant -> decoder memory.

    Attributes:
      fusion_spec, shared: ``model.fusion`` (a FUSIONS variant's spec) and the model-wide settings.
      prompt_len, width: P >= 1 and D, the prompt tokens' width (the fusion projects others).
    """

    fusion_spec: Any
    shared: Any
    prompt_len: int
    width: int

    def setup(self):
        if self.prompt_len < 1:
            raise ValueError(f'model.prompt_len must be >= 1 with model.memory "fused", got {self.prompt_len}')
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        self.prompt = self.param("prompt", init, (self.prompt_len, self.width), jnp.float32)
        self.variant = models.get_fusion(self.fusion_spec, self.shared)

    def __call__(self, image, image_mask, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Image tokens [B, N, Di], mask [B, N] -> (memory [B, P + N, D], mask [B, P + N])."""
        b = image.shape[0]
        prompt = jnp.broadcast_to(self.prompt[None], (b, *self.prompt.shape)).astype(image.dtype)  # [B, P, D]
        prompt_mask = jnp.ones((b, self.prompt_len), bool)
        text, img, _ = self.variant(prompt, prompt_mask, image, image_mask, deterministic=deterministic)
        return jnp.concatenate([text, img.astype(text.dtype)], 1), jnp.concatenate([prompt_mask, image_mask], 1)


def memory_kind(model_config) -> str:
    """``model.memory``, validated; a spec without the key (written before it existed) means "image"."""
    kind = model_config["memory"] if "memory" in model_config else "image"
    if kind not in MEMORIES:
        raise ValueError(f"unknown model.memory {kind!r}; valid: {list(MEMORIES)}")
    return kind


class CaptionModel(nn.Module):
    """Image encoder [+ FusedMemory] + CaptionDecoder (``head`` = {name: "caption_decoder", ...}); ``memory``
    "fused" also needs ``fusion`` and ``prompt_len`` (module docstring)."""

    model_config: Any
    vocab_size: int

    def setup(self):
        cfg = as_dict(self.model_config)
        shared = shared_settings(cfg)
        self.image_encoder = models.get_image_encoder(cfg["image_encoder"], shared)
        self.memory = memory_kind(cfg)
        if self.memory == "fused":
            missing = [k for k in ("fusion", "prompt_len", "width") if k not in cfg]
            if missing:
                raise ValueError(f'model.memory "fused" needs model.{", model.".join(missing)}')
            self.fusion = FusedMemory(cfg["fusion"], shared, int(cfg["prompt_len"]), int(cfg["width"]), name="fusion")
        decoders = {"caption_decoder": CaptionDecoder}
        self.head = models._build("head", decoders, cfg["head"], shared, vocab_size=self.vocab_size)

    def encode_memory(self, image, train: bool = False):
        """image [B, H, W, 3] -> what the decoder cross-attends to: (tokens [B, M, Dm], mask [B, M]); M = N for
        memory "image", P + N for "fused". Decoding then calls the decoder (``head``) directly (decoding.py)."""
        tokens, mask = self.image_encoder(image, deterministic=not train)
        if self.memory == "fused":
            tokens, mask = self.fusion(tokens, mask, deterministic=not train)
        return tokens, mask

    def __call__(self, batch, train: bool = False) -> dict:
        """batch image [B, H, W, 3], caption_in [B, T] -> {"logits": [B, T, V]} (teacher forcing)."""
        memory, memory_mask = self.encode_memory(batch["image"], train)
        return {"logits": self.head(batch["caption_in"], memory, memory_mask, deterministic=not train)}
