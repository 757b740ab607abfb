"""vtfusion_jax: vision-text fusion with scaled dot-product self- and cross-attention (JAX/Flax linen)."""

__version__ = "0.1.0"
