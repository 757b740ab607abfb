"""Task heads. Each takes the fusion outputs and returns logits.

ClassificationHead: pooled [B, P] -> [LayerNorm] -> Dense(hidden) -> GELU -> Dense(C). Retrieval and captioning
heads take other inputs: models/retrieval.py, models/caption.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import layers


class ClassificationHead(nn.Module):
    """MLP classifier over the fused pooled vector (hidden_dim=0: a single linear layer, i.e. logistic regression).

    Attributes:
      num_classes, hidden_dim: answer / label vocabulary size C; hidden layer width (0 = none).
      dropout_rate: dropout before each Dense.
      ln: LayerNorm the pooled vector first (False with hidden_dim=0: plain logistic regression).
    """

    num_classes: int
    hidden_dim: int = 256
    dropout_rate: float = 0.0
    ln: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, pooled, deterministic: bool = True) -> jax.Array:
        """pooled [B, P] -> logits float32 [B, C] (the token outputs are unused here)."""
        x = (layers.LayerNorm(name="ln")(pooled) if self.ln else pooled).astype(self.dtype)
        if self.hidden_dim:
            x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            x = layers.gelu_exact(layers.dense(self.hidden_dim, "embed", "mlp", dtype=self.dtype, name="hidden")(x))
            in_axis = "mlp"
        else:
            in_axis = "embed"
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        logits = layers.dense(self.num_classes, in_axis, "vocab", dtype=self.dtype, name="logits")(x)  # [B, C]
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "vocab"))

    def flops_per_example(self, pooled_dim: int) -> int:
        if self.hidden_dim:
            return 2 * pooled_dim * self.hidden_dim + 2 * self.hidden_dim * self.num_classes
        return 2 * pooled_dim * self.num_classes


HEADS: dict[str, type[nn.Module]] = {"classification": ClassificationHead}
