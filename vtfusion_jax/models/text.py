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


def _embed(num: int, width: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return nn.Embed(num, width, embedding_init=init, param_dtype=jnp.float32, name=name)


class BertEncoder(nn.Module):
    """BERT (Devlin et al. 2019): token + position + type embeddings, embedding LayerNorm, Transformer blocks.

    ``post_ln=True``: BERT's layout (importable from HF); False: pre-LN + final LayerNorm (stabler from scratch).

    Attributes:
      vocab_size: WordPiece vocabulary size (30522 for BERT / MiniLM uncased).
      width, depth, num_heads, mlp_dim: Transformer size.
      max_len, type_vocab_size: number of learned positions and of segment (token type) embeddings.
      activation: MLP activation (layers.ACTIVATIONS; BERT: exact "gelu").
      pooler: add BERT's pooler, tanh(Dense([CLS] output)), returned with ``return_pooled=True``.
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
    pooler: bool = False
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
        """text_ids [B, L], text_mask [B, L] -> (tokens [B, L, D], mask [B, L]) (+ pooled [B, D] if return_pooled)."""
        if return_pooled and not self.pooler:
            raise ValueError("return_pooled=True needs BertEncoder(pooler=True)")
        b, seq = text_ids.shape
        if seq > self.max_len:
            raise ValueError(f"text length {seq} exceeds BertEncoder.max_len={self.max_len}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(text_ids)
        x = _embed(self.vocab_size, self.width, ("vocab", "embed"), "word_embeddings")(text_ids)
        x = x + _embed(self.max_len, self.width, (None, "embed"), "position_embeddings")(jnp.arange(seq))[None]
        x = x + _embed(self.type_vocab_size, self.width, (None, "embed"), "token_type_embeddings")(token_type_ids)
        if self.post_ln:
            x = layers.LayerNorm(self.ln_epsilon, name="embeddings_ln")(x)
        x = nn.Dropout(self.dropout_rate)(x.astype(self.dtype), deterministic=deterministic)  # [B, L, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        lengths = layers.key_lengths(text_mask)  # right-padded (module docstring): fused kernels take lengths
        x = layers.transformer_encoder(self, x, lengths, deterministic, post_ln=self.post_ln)
        if not self.post_ln:
            x = layers.LayerNorm(self.ln_epsilon, name="final_ln")(x).astype(self.dtype)
        x = x * text_mask[..., None].astype(x.dtype)
        if not self.pooler:
            return x, text_mask
        # BERT's pooler reads the first ([CLS]) position.
        pooled = jnp.tanh(layers.dense(self.width, "embed", "mlp", dtype=self.dtype, name="pooler")(x[:, 0]))  # [B, D]
        return (x, text_mask, pooled) if return_pooled else (x, text_mask)


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
