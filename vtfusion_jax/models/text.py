"""Text encoders: BERT-style Transformer and a (bidirectional) GRU.

Both map ``text_ids`` int32 ``[B, L]``, ``text_mask`` bool ``[B, L]`` (True = real, right-padded) to
``(tokens [B, L, D], mask [B, L])``; real positions do not depend on the padding, padded outputs are zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import layers

POOLS = ("cls", "eos", "last")  # BertEncoder.pool


def _embed(num: int, width: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return nn.Embed(num, width, embedding_init=init, param_dtype=jnp.float32, name=name)


class BertEncoder(nn.Module):
    """BERT (Devlin et al. 2019): token + position + type embeddings, embedding LayerNorm, Transformer blocks.

    ``post_ln=True``: BERT's layout (importable from HF); False: pre-LN + final LayerNorm (stabler from scratch; the
    layout of CLIP's and SigLIP's text towers, with ``type_vocab_size=0`` and, for CLIP, ``causal=True``).

    Attributes:
      vocab_size: WordPiece vocabulary size (30522 for BERT / MiniLM uncased).
      width, depth, num_heads, mlp_dim: Transformer size.
      max_len, type_vocab_size: number of learned positions and of segment (token type) embeddings (0: none).
      activation: MLP activation (layers.ACTIVATIONS; BERT: exact "gelu").
      causal: each token attends to itself and the tokens before it only (CLIP's text tower).
      pooler: add BERT's pooler, tanh(Dense(pooled token)), returned with ``return_pooled=True``.
      pool: the token a pooled output reads: "cls" (position 0, BERT), "eos" (CLIP: the first ``eos_token_id``;
        with eos_token_id None or 2 the largest id, as HF does for legacy CLIP configs), "last" (the last position,
        padding or not: SigLIP).
      proj_dim, proj_bias: Dense(proj_dim) on the pooled output (0: none): CLIP's ``text_projection`` (no bias),
        SigLIP's text ``head`` (bias); returned with ``return_pooled=True``.
    """

    vocab_size: int = 30522
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 512
    type_vocab_size: int = 2
    post_ln: bool = True
    dropout_rate: float = 0.0
    ln_epsilon: float = 1e-12
    activation: str = "gelu"
    causal: bool = False
    pooler: bool = False
    pool: str = "cls"
    eos_token_id: int | None = None
    proj_dim: int = 0
    proj_bias: bool = True
    attention_impl: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        text_ids: jax.Array,
        text_mask: jax.Array,
        deterministic: bool = True,
        token_type_ids: jax.Array | None = None,
        return_pooled: bool = False,
    ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
        """text_ids [B, L], text_mask [B, L] -> (tokens [B, L, D], mask [B, L]) (+ pooled [B, D or proj_dim] if
        return_pooled)."""
        pooled_head = self.pooler or self.proj_dim > 0
        if return_pooled and not pooled_head:
            raise ValueError("return_pooled=True needs BertEncoder(pooler=True) or proj_dim > 0")
        if self.pool not in POOLS:
            raise ValueError(f"unknown BertEncoder.pool {self.pool!r}; valid: {POOLS}")
        b, seq = text_ids.shape
        if seq > self.max_len:
            raise ValueError(f"text length {seq} exceeds BertEncoder.max_len={self.max_len}")
        x = _embed(self.vocab_size, self.width, ("vocab", "embed"), "word_embeddings")(text_ids)
        x = x + _embed(self.max_len, self.width, (None, "embed"), "position_embeddings")(jnp.arange(seq))[None]
        if token_type_ids is not None and not self.type_vocab_size:
            raise ValueError("token_type_ids given to a BertEncoder without token types (type_vocab_size=0)")
        if self.type_vocab_size:
            types = jnp.zeros_like(text_ids) if token_type_ids is None else token_type_ids
            x = x + _embed(self.type_vocab_size, self.width, (None, "embed"), "token_type_embeddings")(types)
        if self.post_ln:
            x = layers.LayerNorm(self.ln_epsilon, name="embeddings_ln")(x)
        x = nn.Dropout(self.dropout_rate)(x.astype(self.dtype), deterministic=deterministic)  # [B, L, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        # Right-padded (module docstring): fused kernels take lengths; causal needs the full [B, L, L] pattern.
        keys = layers.key_lengths(text_mask)
        if self.causal:
            keys = jnp.tril(jnp.ones((seq, seq), bool))[None] & text_mask[:, None, :]  # [B, L, L]
        x = layers.transformer_encoder(self, x, keys, deterministic, post_ln=self.post_ln)
        if not self.post_ln:
            x = layers.LayerNorm(self.ln_epsilon, name="final_ln")(x).astype(self.dtype)
        out = x * text_mask[..., None].astype(x.dtype)
        if not pooled_head:
            return out, text_mask
        if self.pool == "eos":
            legacy = self.eos_token_id in (None, 2)  # HF CLIP: configs from before its eos fix point at the max id
            pos = jnp.argmax(text_ids if legacy else (text_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
            pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        else:  # "cls": position 0; "last": the last position even where it is padding (as HF SigLIP reads it)
            pooled = x[:, 0 if self.pool == "cls" else -1]  # [B, D]
        if self.pooler:
            pooled = jnp.tanh(layers.dense(self.width, "embed", "mlp", dtype=self.dtype, name="pooler")(pooled))
        if self.proj_dim:
            proj = layers.dense(self.proj_dim, "embed", None, dtype=self.dtype, name="proj", use_bias=self.proj_bias)
            pooled = proj(pooled)
        return (out, text_mask, pooled) if return_pooled else (out, text_mask)


class GRUEncoder(nn.Module):
    """Embedding + (bi)directional GRU (Cho et al. 2014), the recurrent route for the text tower.

    Lengths come from the mask (the backward direction starts at the last real token); per-token outputs of both
    directions, concatenated, are projected to ``width``.
    """

    vocab_size: int = 30522
    width: int = 128
    hidden: int = 128
    bidirectional: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, text_ids: jax.Array, text_mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """text_ids [B, L], text_mask [B, L] -> (tokens [B, L, D], mask [B, L])."""
        x = _embed(self.vocab_size, self.hidden, ("vocab", "embed"), "word_embeddings")(text_ids)
        lengths = jnp.sum(text_mask.astype(jnp.int32), axis=-1)  # [B]
        part, init = nn.with_logical_partitioning, nn.initializers
        inits = dict(kernel_init=part(init.lecun_normal(), ("embed", "mlp")))
        inits.update(bias_init=part(init.zeros_init(), ("mlp",)))
        inits["recurrent_kernel_init"] = part(init.orthogonal(), (None, "mlp"))
        cell = lambda name: nn.GRUCell(self.hidden, **inits, dtype=self.dtype, param_dtype=jnp.float32, name=name)  # noqa: E731
        rnn = nn.RNN(cell("forward_cell"), name="forward")
        if self.bidirectional:
            rnn = nn.Bidirectional(rnn, nn.RNN(cell("backward_cell"), name="backward"), name="bigru")
        h = rnn(x.astype(self.dtype), seq_lengths=lengths)  # [B, L, 2*hidden] (bidirectional) or [B, L, hidden]
        out = layers.dense(self.width, "mlp", "embed", dtype=self.dtype, name="proj")(h)  # [B, L, D]
        out = out * text_mask[..., None].astype(out.dtype)
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), text_mask


TEXT_ENCODERS: dict[str, tuple[type[nn.Module], dict]] = {"bert": (BertEncoder, {}), "gru": (GRUEncoder, {})}
