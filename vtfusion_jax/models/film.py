"""FiLM fusion (Perez et al. 2018), the worked example of docs/adding_a_variant.md: one module, one decorator.

The question scales and shifts every channel of every image token; nothing attends to anything.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vtfusion_jax import layers
from vtfusion_jax.models.fusion import FusionBase, FusionOutput
from vtfusion_jax.models.registry import register_fusion


@register_fusion(
    "film",
    summary="question -> image, channel-wise: the question scales and shifts every image token; nothing attends",
    paper="FiLM (Perez et al. 2018)",
    pooled=2,
)
class FiLMFusion(FusionBase):
    """FiLM (Perez et al. 2018): question -> image, channel-wise; no attention, text unchanged.

    q = masked_mean(text) [B, D]; per layer k: (gamma_k, beta_k) = Dense_k(q) [B, D] (zero-init: identity at start),
    image += W_k relu((1 + gamma_k) * LN(image) + beta_k). pooled = [masked_mean(text); masked_mean(image_out)],
    P = 2D. ``num_layers=0`` is exactly ``concat``; ``num_heads`` and ``mlp_dim`` are unused.
    """

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic: bool = True) -> FusionOutput:
        t, i = self.project(text, "text_proj"), self.project(image, "image_proj")  # [B, L, D], [B, N, D]
        q = layers.masked_mean(t, text_mask)  # [B, D]: padded question tokens never count
        # Zero-initialised generators: gamma = beta = 0, the identity modulation, at the start.
        zeros = lambda axes: nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)  # noqa: E731
        kw = dict(
            dtype=self.dtype, param_dtype=jnp.float32, kernel_init=zeros(("embed", "mlp")), bias_init=zeros(("mlp",))
        )
        for k in range(self.num_layers):
            film = nn.Dense(2 * self.width, **kw, name=f"film{k}")
            gamma, beta = jnp.split(film(q)[:, None, :], 2, axis=-1)  # [B, 1, D] each
            h = (1.0 + gamma) * self.ln(f"ln{k}")(i) + beta  # [B, N, D]
            i = i + layers.dense(self.width, "mlp", "embed", dtype=self.dtype, name=f"out{k}")(nn.relu(h))
        pooled = jnp.concatenate([layers.masked_mean(t, text_mask), layers.masked_mean(i, image_mask)], -1)
        return t, i, pooled  # [B, L, D], [B, N, D], [B, 2D]

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        """Forward matmul FLOPs: the FiLM generator (D -> 2D) and the output projection (D -> D per token)."""
        d = self.width
        return self.num_layers * (2 * d * 2 * d + 2 * image_len * d * d)
