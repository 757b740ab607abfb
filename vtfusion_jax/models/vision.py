"""Image encoders: small CNN, ResNet-18/50 layouts and ViT.

Every encoder maps ``image`` float ``[B, H, W, 3]`` to ``(tokens [B, N, D], mask [B, N])``: the spatial grid of
the last feature map (CNN/ResNet) or the patch tokens (ViT, plus an optional CLS token first), projected to ``width``
and given a 2-D position embedding, so that attention downstream knows where each token sits. Image masks are all
True (every token is real); they exist so that fusion code treats both modalities alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import layers
from vtfusion_jax.attention import MultiHeadAttention

NORMS = ("group", "layer", "frozen_bn", "none")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str, use_bias=False, torch_pad=False) -> nn.Conv:
    # torch_pad: k//2 zeros on every side (PyTorch / HF), which differs from SAME for strided even-sized inputs.
    pad = ((kernel // 2,) * 2,) * 2 if torch_pad else "SAME"
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    kw = dict(kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")), name=name)
    kw.update(param_dtype=jnp.float32)
    kw.update(bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), padding=pad)
    return nn.Conv(features, (kernel, kernel), (stride, stride), use_bias=use_bias, dtype=dtype, **kw)


def _affine_inits(zero_init: bool) -> tuple[Any, Any]:
    """(scale, bias) initialisers of a conv-feature norm; ``zero_init`` (a residual branch's last norm) zeros scale."""
    scale = nn.initializers.zeros_init() if zero_init else nn.initializers.ones_init()
    return tuple(nn.with_logical_partitioning(i, ("conv_out",)) for i in (scale, nn.initializers.zeros_init()))


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm with its running statistics folded in: ``y = x * scale + bias`` per channel.

    ``scale`` and ``bias`` are folded once at checkpoint import (pretrained.py): ordinary params, no ``batch_stats``
    collection (weight decay skips them by name). Computed in float32. x: [..., C] -> [..., C].
    """

    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale_init, bias_init = _affine_inits(self.zero_init)
        scale = self.param("scale", scale_init, x.shape[-1:], jnp.float32)
        bias = self.param("bias", bias_init, x.shape[-1:], jnp.float32)
        return (x.astype(jnp.float32) * scale + bias).astype(x.dtype)


def _norm(kind: str, name: str, zero_init: bool = False):
    """Normalisation for conv features, computed in float32. None keeps batch statistics: GroupNorm is
    batch-independent and "frozen_bn" is a fixed per-channel affine (an imported BatchNorm, see FrozenBatchNorm)."""
    scale_init, bias_init = _affine_inits(zero_init)
    if kind in ("group", "layer"):

        def norm(x):
            kw = dict(dtype=jnp.float32, scale_init=scale_init, bias_init=bias_init, name=name)
            group = dict(num_groups=None, group_size=min(16, x.shape[-1]))
            layer = nn.GroupNorm(**group, **kw) if kind == "group" else nn.LayerNorm(**kw)
            return layer(x.astype(jnp.float32)).astype(x.dtype)

        return norm
    if kind == "frozen_bn":
        return FrozenBatchNorm(zero_init=zero_init, name=name)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"unknown norm {kind!r}; valid: {NORMS}")


def _grid_to_tokens(x: jax.Array, width: int, pos_emb: str, dtype: Any, project=True, suffix="") -> tuple:
    """[B, h, w, C] feature map -> (tokens [B, h*w, width] with 2-D positions, mask [B, h*w]).
    ``project=False`` keeps the C raw channels; ``suffix`` names the parameters of each scale."""
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if project:
        x = layers.dense(width, "conv_out", "embed", dtype=dtype, name=f"proj{suffix}")(x)  # [B, N, D]
    x = layers.PositionEmbedding2D(pos_emb, name=f"pos_emb{suffix}")(x, (h, w))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, jnp.ones((b, h * w), dtype=bool)


def _multiscale_tokens(module, features, scales, width, pos_emb, dtype, project=True) -> tuple[jax.Array, jax.Array]:
    """Tokens from several feature maps (the method's multi-scale step 1), concatenated into one sequence:
    ``features`` [B, h_k, w_k, C_k] shallow to deep, ``scales`` indices into them (negative from the end; () = (-1,))
    -> (tokens [B, sum_k h_k*w_k, D], mask). Each selected map gets its own projection, 2-D position embedding and a
    learned per-scale embedding (a param of ``module``); a single scale uses the single-scale names, no embedding."""
    n = len(features)
    idx = [s % n if -n <= s < n else None for s in (scales or (-1,))]
    if None in idx or len(set(idx)) != len(idx):
        raise ValueError(f"image_encoder.scales {tuple(scales)} must be distinct indices into {n} feature maps")
    if len(idx) == 1:
        return _grid_to_tokens(features[idx[0]], width, pos_emb, dtype, project=project)
    if not project:
        raise ValueError("multi-scale image tokens need project=True (the scales have different channel counts)")
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
    scale_emb = module.param("scale_embedding", init, (len(idx), width), jnp.float32)
    tokens, masks = [], []
    for k, i in enumerate(idx):
        t, m = _grid_to_tokens(features[i], width, pos_emb, dtype, suffix=f"_scale{k}")
        tokens.append(t + scale_emb[k].astype(t.dtype))
        masks.append(m)
    return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1)


def token_grids(encoder: nn.Module, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(h, w) of each scale's token grid of an image encoder (bound or not) on (H, W) images, in token order (ViT:
    one, after its CLS token if any), e.g. for drawing attention maps per scale."""
    if isinstance(encoder, ViT):
        return [(image_hw[0] // encoder.patch_size, image_hw[1] // encoder.patch_size)]
    maps = encoder.feature_map_shapes(image_hw)
    n = len(maps)
    return [maps[s % n] for s in (encoder.scales or (-1,))]


def _down(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    # SAME padding (and torch's k//2 padding for odd k) gives ceil(size / stride).
    return (-(-hw[0] // stride), -(-hw[1] // stride))


class CNN(nn.Module):
    """A small stride-2 conv stack for 64–75 px synthetic images (64x64, three stride-2 layers: 8x8 = 64 tokens).

    Attributes:
      width: token width D.
      channels, strides: output channels and stride of each 3x3 conv.
      norm, pos_emb: "group" | "layer" | "none"; "learn" | "sincos2d" | "sincos2d_xy" | "none".
      scales: conv layers whose outputs become tokens (multi-scale; negative = from the end); () = the last only.
      downsample: "conv" (strided conv) | "max" (stride-1 conv, ReLU, stride x stride max-pool, as the easy-VQA
        Keras reference: small shapes keep their edges).
    """

    width: int = 128
    channels: Sequence[int] = (32, 64, 128)
    strides: Sequence[int] = (2, 2, 2)
    norm: str = "group"
    downsample: str = "conv"
    pos_emb: str = "learn"
    scales: Sequence[int] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """image [B, H, W, 3] -> (tokens [B, N, D], mask [B, N])."""
        return _multiscale_tokens(self, self.feature_maps(image), self.scales, self.width, self.pos_emb, self.dtype)

    def feature_maps(self, image: jax.Array) -> list[jax.Array]:
        """image [B, H, W, 3] -> the output of every conv layer, [B, h_i, w_i, C_i], shallow to deep.

        Called from ``__call__`` (its layers live in that compact scope)."""
        if len(self.channels) != len(self.strides):
            raise ValueError(f"CNN channels {self.channels} and strides {self.strides} differ in length")
        if self.downsample not in ("conv", "max"):
            raise ValueError(f"CNN downsample must be 'conv' or 'max', got {self.downsample!r}")
        x = image.astype(self.dtype)
        maps = []
        for i, (c, s) in enumerate(zip(self.channels, self.strides, strict=True)):
            conv_stride = s if self.downsample == "conv" else 1
            x = _conv(c, 3, conv_stride, self.dtype, f"conv{i}", use_bias=self.norm == "none")(x)
            x = nn.relu(_norm(self.norm, f"norm{i}")(x))
            if conv_stride != s:
                x = _max_pool(x, s)
            maps.append(x)
        return maps

    def feature_map_shapes(self, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(h, w) of each conv layer's output for (H, W) images."""
        return list(itertools.accumulate(self.strides, _down, initial=tuple(image_hw)))[1:]


def _max_pool(x: jax.Array, s: int) -> jax.Array:
    """s x s max-pool with stride s, "SAME" padding. A reshape + max when s divides the grid: the same values as
    ``nn.max_pool`` and, after a ReLU, the same gradients, with a cheaper backward on XLA:CPU than the
    select-and-scatter of ``reduce_window`` (docs/performance.md)."""
    b, h, w, c = x.shape
    if h % s or w % s:
        return nn.max_pool(x, (s, s), strides=(s, s), padding="SAME")
    return jnp.max(x.reshape(b, h // s, s, w // s, s, c), axis=(2, 4))


class ResidualBlock(nn.Module):
    """ResNet basic (two 3x3) or bottleneck (1x1, 3x3, 1x1, 4x expansion) block, stride on the 3x3 (v1.5);
    ``torch_layout``: see ResNet."""

    filters: int
    strides: int = 1
    bottleneck: bool = False
    norm: str = "group"
    torch_layout: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.filters * (4 if self.bottleneck else 1)
        residual = x
        conv = lambda f, k, s, name: _conv(f, k, s, self.dtype, name, torch_pad=self.torch_layout)  # noqa: E731
        if self.bottleneck:
            y = nn.relu(_norm(self.norm, "norm1")(conv(self.filters, 1, 1, "conv1")(x)))
            y = nn.relu(_norm(self.norm, "norm2")(conv(self.filters, 3, self.strides, "conv2")(y)))
            y = _norm(self.norm, "norm3", zero_init=True)(conv(out_ch, 1, 1, "conv3")(y))
        else:
            y = nn.relu(_norm(self.norm, "norm1")(conv(self.filters, 3, self.strides, "conv1")(x)))
            y = _norm(self.norm, "norm2", zero_init=True)(conv(out_ch, 3, 1, "conv2")(y))
        # torch_layout: a strided block always projects, even where a 1x1 map keeps its shape (as HF does).
        if residual.shape != y.shape or (self.torch_layout and self.strides != 1):
            residual = _norm(self.norm, "proj_norm")(conv(out_ch, 1, self.strides, "proj")(residual))
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet (He et al. 2016), v1.5 strides. ``resnet18``: basic blocks (2,2,2,2); ``resnet50``: bottleneck (3,4,6,3).

    Attributes:
      width: token width D.
      stage_sizes, bottleneck, base_filters: blocks per stage; bottleneck (ResNet-50) or basic blocks; first-stage
        filters (doubling per stage).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool, for 224 px) or "small" (one 3x3/2 conv, for 64–75 px).
      norm: "group" | "layer" | "frozen_bn" (imported BatchNorm, see FrozenBatchNorm) | "none"; no batch statistics.
      pos_emb: as for CNN.
      torch_layout: PyTorch / HF conventions for imported checkpoints: k//2 padding (not SAME) for convolutions and
        the stem max-pool, a projection shortcut on every strided block.
      project: project the last map to ``width``; False keeps the raw features (HF's ``last_hidden_state``).
      scales: stages whose outputs become tokens (e.g. (1, 2, 3); negative = from the end); () = the last only.
    """

    width: int = 256
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    base_filters: int = 64
    stem: str = "imagenet"
    norm: str = "group"
    pos_emb: str = "learn"
    torch_layout: bool = False
    project: bool = True
    scales: Sequence[int] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """image [B, H, W, 3] -> (tokens [B, N, D], mask [B, N])."""
        x = image.astype(self.dtype)
        conv = lambda f, k, s, name: _conv(f, k, s, self.dtype, name, torch_pad=self.torch_layout)  # noqa: E731
        if self.stem not in ("imagenet", "small"):
            raise ValueError(f"unknown ResNet stem {self.stem!r}; valid: ('imagenet', 'small')")
        k = 7 if self.stem == "imagenet" else 3
        x = nn.relu(_norm(self.norm, "stem_norm")(conv(self.base_filters, k, 2, "stem_conv")(x)))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)) if self.torch_layout else "SAME")
        maps = []
        kw = dict(bottleneck=self.bottleneck, norm=self.norm, torch_layout=self.torch_layout, dtype=self.dtype)
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = ResidualBlock(
                    self.base_filters * 2**i, 2 if (i > 0 and j == 0) else 1, **kw, name=f"stage{i}_block{j}"
                )(x)
            maps.append(x)
        return _multiscale_tokens(self, maps, self.scales, self.width, self.pos_emb, self.dtype, self.project)

    def feature_map_shapes(self, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(h, w) of each stage's output for (H, W) images."""
        hw = _down(_down(tuple(image_hw), 2), 2 if self.stem == "imagenet" else 1)  # stem conv, max-pool
        return list(itertools.accumulate([2] * (len(self.stage_sizes) - 1), _down, initial=hw))


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021): patch embedding, positions, pre-LN Transformer blocks.

    Attributes:
      width, depth, num_heads, mlp_dim: Transformer size.
      patch_size, pos_emb: square patch side in pixels; "learn" | "sincos2d".
      use_cls: prepend a learned CLS token (its position embedding is a learned vector).
      activation: MLP activation (layers.ACTIVATIONS; ViT "gelu", CLIP "quick_gelu").
      patch_bias: bias on the patch-embedding convolution (CLIP has none).
      pre_ln: LayerNorm on the token sequence before the first block (CLIP's ``pre_layrnorm``).
      final_ln: LayerNorm after the last block (ViT's ``layernorm``; CLIP's ``post_layernorm`` on every token, so
        CLS is HF's ``pooler_output``; False: HF CLIP's ``last_hidden_state``).
      pool: the pooled output (``return_pooled=True``): "none", "cls" (the CLS token, CLIP), "map" (SigLIP's
        multihead attention pooling, MAPHead).
      proj_dim, proj_bias: Dense(proj_dim) on the pooled output (0: none; CLIP's ``visual_projection``: no bias).
    """

    width: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_dim: int = 768
    patch_size: int = 8
    pos_emb: str = "learn"
    use_cls: bool = False
    dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    activation: str = "gelu"
    patch_bias: bool = True
    pre_ln: bool = False
    final_ln: bool = True
    pool: str = "none"
    proj_dim: int = 0
    proj_bias: bool = True
    attention_impl: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, deterministic: bool = True, return_pooled: bool = False) -> tuple:
        """image [B, H, W, 3] -> (tokens [B, N(+1), D], mask [B, N(+1)]) (+ pooled [B, D or proj_dim] if
        return_pooled)."""
        if self.pool not in ("none", "cls", "map") or (self.pool == "cls" and not self.use_cls):
            raise ValueError(f"ViT.pool must be 'none', 'cls' (needs use_cls=True) or 'map', got {self.pool!r}")
        if return_pooled and self.pool == "none":
            raise ValueError("return_pooled=True needs ViT.pool 'cls' or 'map'")
        p = self.patch_size
        kw = dict(use_bias=self.patch_bias, dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")
        kw.update(kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")))
        kw.update(bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
        x = nn.Conv(self.width, (p, p), (p, p), "VALID", **kw)(image.astype(self.dtype))  # [B, h, w, D]
        b, h, w, d = x.shape
        x = layers.PositionEmbedding2D(self.pos_emb, name="pos_emb")(x.reshape(b, h * w, d), (h, w))
        if self.use_cls:
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, "embed"))
            cls = self.param("cls", init, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        if self.pre_ln:
            x = layers.LayerNorm(self.ln_epsilon, name="pre_ln")(x).astype(self.dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        mask = jnp.ones(x.shape[:2], dtype=bool)
        x = layers.transformer_encoder(self, x, None, deterministic)
        if self.final_ln:
            x = layers.LayerNorm(self.ln_epsilon, name="final_ln")(x).astype(self.dtype)
        if self.pool == "none":
            return x, mask
        if self.pool == "cls":
            pooled = x[:, 0]  # [B, D]
        else:
            kw = dict(ln_epsilon=self.ln_epsilon, activation=self.activation, attention_impl=self.attention_impl)
            pooled = MAPHead(self.num_heads, self.mlp_dim, **kw, dtype=self.dtype, name="map")(x)
        if self.proj_dim:
            proj = layers.dense(self.proj_dim, "embed", None, dtype=self.dtype, name="proj", use_bias=self.proj_bias)
            pooled = proj(pooled)
        return (x, mask, pooled) if return_pooled else (x, mask)


class MAPHead(nn.Module):
    """Multihead attention pooling (Lee et al. 2019; SigLIP's vision ``head``): a learned probe attends to the
    tokens, then ``y + MLP(LN(y))``. x [B, N, D] -> [B, D]."""

    num_heads: int
    mlp_dim: int
    ln_epsilon: float = 1e-6
    activation: str = "gelu_tanh"
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed"))
        probe = self.param("probe", init, (1, 1, x.shape[-1]), jnp.float32)
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1])).astype(self.dtype)
        kw = dict(implementation=self.attention_impl, dtype=self.dtype, name="attention")
        y = MultiHeadAttention(self.num_heads, **kw)(probe, x)  # [B, 1, D]
        h = layers.LayerNorm(self.ln_epsilon, name="layernorm")(y).astype(self.dtype)
        return (y + layers.MLP(self.mlp_dim, 0.0, self.dtype, self.activation, name="mlp")(h))[:, 0]


# name -> (class, default overrides). Sizes beyond these come from the config's kwargs.
IMAGE_ENCODERS: dict[str, tuple[type[nn.Module], dict]] = {
    "cnn": (CNN, {}),
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), bottleneck=False)),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), bottleneck=True)),
    "vit": (ViT, {}),
}
