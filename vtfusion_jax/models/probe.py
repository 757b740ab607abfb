"""Frozen-feature probe components (the method's linear-probe baseline; configs/easy_vqa_linear_probe.py).

PixelEncoder  image [B, H, W, 3] -> one token [B, 1, g*g*3], the image average-pooled to g x g (no parameters; why
              not a frozen random CNN: docs/pretrained.md).
ProbeFusion   pooled = [text feature ([CLS] or masked mean); mean of the image tokens], P = Dt + Di, no interaction.
              With ``head.hidden_dim=0, ln=False`` this is logistic regression on the frozen features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import layers
from vtfusion_jax.models.registry import register_fusion


class PixelEncoder(nn.Module):
    """Image -> a single token of pooled pixels (no parameters).

    Attributes:
      grid: side of the average-pooling grid (the image side must be divisible by it).
    """

    grid: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """image [B, H, W, 3] -> (tokens [B, 1, grid*grid*3], mask [B, 1])."""
        del deterministic
        b, h, w, c = image.shape
        if h % self.grid or w % self.grid:
            raise ValueError(f"PixelEncoder.grid={self.grid} does not divide the image size {h}x{w}")
        x = image.reshape(b, self.grid, h // self.grid, self.grid, w // self.grid, c).mean(axis=(2, 4))  # [B, g, g, C]
        tokens = x.reshape(b, 1, self.grid * self.grid * c).astype(self.dtype)
        return tokens, jnp.ones((b, 1), bool)


@register_fusion(
    "probe",
    summary="nothing crosses, no parameters: [text feature; mean of the image tokens] (frozen-feature probe)",
    paper="linear probe on frozen features (the method's baseline; docs/pretrained.md)",
)
class ProbeFusion(nn.Module):
    """pooled = [text feature; masked mean of image tokens] with no parameters (see the module docstring).

    Attributes:
      text_pool: "cls" (the first token's output) or "mean" (masked mean over the text tokens).
      sow_weights: accepted for eval's attention maps; there is no attention, so nothing is recorded.
    """

    text_pool: str = "cls"
    sow_weights: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text, text_mask, image, image_mask, deterministic: bool = True):
        """text [B, L, Dt], image [B, N, Di] -> (text, image, pooled [B, Dt + Di]), inputs returned unchanged."""
        del deterministic
        if self.text_pool == "cls":
            t = text[:, 0]  # [B, Dt]
        elif self.text_pool == "mean":
            t = layers.masked_mean(text, text_mask)
        else:
            raise ValueError(f"probe fusion text_pool must be cls | mean, got {self.text_pool!r}")
        pooled = jnp.concatenate([t, layers.masked_mean(image, image_mask)], -1).astype(jnp.float32)
        return text, image, pooled

    def flops_per_example(self, text_len: int, image_len: int) -> int:
        return 0


PROBE_IMAGE_ENCODERS: dict[str, tuple[type[nn.Module], dict]] = {"pixels": (PixelEncoder, {})}
