"""Whole-model analytic FLOPs per example: image encoder + text encoder + fusion + head.

Convention (PaLM / MaxText "model FLOPs"): 2 FLOPs per multiply-add of every matmul and convolution, attention
scores and values included, element-wise work and gathers left out; a training step counts 3x the forward. The
per-piece formulas are tabled in docs/performance.md ("How the numbers are computed"); a fusion contributes its
registered ``flops_per_example`` + input projections. ``model_flops`` returns each part and the total
(tests/test_flops.py checks it against XLA's ``cost_analysis``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

from vtfusion_jax import layers, models
from vtfusion_jax.models import vision
from vtfusion_jax.models.vtfusion import shared_settings

TRAIN_MULTIPLIER = 3  # forward + backward (activation gradients + weight gradients)


def conv_flops(hw_out: tuple[int, int], kernel: int, c_in: int, c_out: int) -> int:
    """Forward FLOPs of one k x k convolution producing an [hw_out, c_out] map from c_in channels."""
    return 2 * hw_out[0] * hw_out[1] * kernel * kernel * c_in * c_out


def _cnn_flops(enc: vision.CNN, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(forward FLOPs, tokens) of the small CNN."""
    flops, c_in, hw = 0, 3, tuple(image_hw)
    maps = []
    for c, s in zip(enc.channels, enc.strides, strict=True):
        out_hw = vision._down(hw, s)
        # "max": a stride-1 conv at the input resolution, then a max-pool (not counted)
        flops += conv_flops(hw if enc.downsample == "max" else out_hw, 3, c_in, c)
        hw, c_in = out_hw, c
        maps.append((hw, c))
    proj, tokens = _token_projection(maps, enc.scales, enc.width, True)
    return flops + proj, tokens


def _token_projection(maps, scales, width: int, project: bool) -> tuple[int, int]:
    """(FLOPs of projecting the selected feature maps to ``width``, number of tokens)."""
    n = len(maps)
    flops = tokens = 0
    for s in scales or (-1,):
        (h, w), c = maps[s % n]
        tokens += h * w
        if project:
            flops += 2 * h * w * c * width
    return flops, tokens


def _resnet_flops(enc: vision.ResNet, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(forward FLOPs, tokens) of a ResNet (basic or bottleneck blocks, v1.5 strides)."""
    hw, c = vision._down(tuple(image_hw), 2), enc.base_filters
    flops = conv_flops(hw, 7 if enc.stem == "imagenet" else 3, 3, c)
    if enc.stem == "imagenet":
        hw = vision._down(hw, 2)  # max-pool: no multiplies
    maps = []
    for i, n_blocks in enumerate(enc.stage_sizes):
        filters = enc.base_filters * 2**i
        out_ch = filters * (4 if enc.bottleneck else 1)
        for j in range(n_blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            hw_out = vision._down(hw, stride)
            if enc.bottleneck:
                flops += conv_flops(hw, 1, c, filters)
                flops += conv_flops(hw_out, 3, filters, filters)
                flops += conv_flops(hw_out, 1, filters, out_ch)
            else:
                flops += conv_flops(hw_out, 3, c, filters)
                flops += conv_flops(hw_out, 3, filters, out_ch)
            if c != out_ch or hw_out != hw or (enc.torch_layout and stride != 1):
                flops += conv_flops(hw_out, 1, c, out_ch)  # projection shortcut
            c, hw = out_ch, hw_out
        maps.append((hw, c))
    proj, tokens = _token_projection(maps, enc.scales, enc.width, enc.project)
    return flops + proj, tokens


def _vit_flops(enc: vision.ViT, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(forward FLOPs, tokens) of a ViT."""
    p = enc.patch_size
    n = (image_hw[0] // p) * (image_hw[1] // p)
    tokens = n + (1 if enc.use_cls else 0)
    flops = 2 * n * p * p * 3 * enc.width
    flops += enc.depth * layers.transformer_block_flops(tokens, enc.width, enc.mlp_dim, enc.num_heads)
    return flops, tokens


def image_encoder_flops(encoder: Any, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(forward FLOPs per example, number of image tokens) of a built image encoder."""
    for cls, formula in ((vision.ViT, _vit_flops), (vision.ResNet, _resnet_flops), (vision.CNN, _cnn_flops)):
        if isinstance(encoder, cls):
            return formula(encoder, image_hw)
    raise ValueError(f"no FLOPs formula for image encoder {type(encoder).__name__}")


def text_encoder_flops(encoder: Any, text_len: int) -> tuple[int, int]:
    """(forward FLOPs per example, output width) of a built text encoder."""
    name = type(encoder).__name__
    if name == "BertEncoder":
        # The optional pooler's output is unused by VisionTextModel (XLA removes it), so it is not counted.
        per_block = layers.transformer_block_flops(text_len, encoder.width, encoder.mlp_dim, encoder.num_heads)
        return encoder.depth * per_block, encoder.width
    if name == "GRUEncoder":
        dirs, h = 2 if encoder.bidirectional else 1, encoder.hidden
        cell = 2 * 3 * (h * h + h * h)  # input (embedding width = hidden) and recurrent kernels, 3 gates
        return dirs * text_len * cell + 2 * text_len * dirs * h * encoder.width, encoder.width
    raise ValueError(f"no FLOPs formula for text encoder {name}")


def pooled_width(fusion: Any, text_len: int, image_len: int, text_dim: int, image_dim: int) -> int:
    """Width P of a built fusion's pooled vector for L = ``text_len`` and N = ``image_len`` tokens of widths
    ``text_dim`` / ``image_dim``: its registry entry's ``pooled``, else an abstract evaluation."""
    p = models.fusion_info(fusion).pooled_width(fusion)
    return traced_pooled_width(fusion, text_len, image_len, text_dim, image_dim) if p is None else p


def traced_pooled_width(fusion: Any, text_len: int, image_len: int, text_dim: int, image_dim: int) -> int:
    """Width P of the fusion's pooled vector, read off an abstract evaluation (no compute)."""
    t, i = jnp.zeros((1, text_len, text_dim)), jnp.zeros((1, image_len, image_dim))
    mt, mi = jnp.ones((1, text_len), bool), jnp.ones((1, image_len), bool)

    def run():
        params = fusion.init(jax.random.key(0), t, mt, i, mi)
        return fusion.apply(params, t, mt, i, mi)[2]

    return int(jax.eval_shape(run).shape[-1])


def model_flops(
    model_config: Mapping[str, Any], image_hw: tuple[int, int], text_len: int, num_classes: int
) -> dict[str, int]:
    """Analytic forward FLOPs per example of VisionTextModel(model_config), by part.

    Args:
      model_config: the ``config.model`` mapping (dict or ConfigDict) of vtfusion.VisionTextModel.
      image_hw, text_len, num_classes: input image (H, W), text tokens L, head outputs C.

    Returns:
      {"image_encoder", "text_encoder", "fusion", "head", "forward", "train"} in FLOPs per example, plus
      "image_tokens"; "train" = 3 * "forward".
    """
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    shared = shared_settings(cfg)
    image_enc = models.get_image_encoder(cfg["image_encoder"], shared)
    text_enc = models.get_text_encoder(cfg["text_encoder"], shared)
    fusion = models.get_fusion(cfg["fusion"], shared)
    head = models.get_head(cfg["head"], shared, num_classes=num_classes)

    f_image, n_image = image_encoder_flops(image_enc, image_hw)
    f_text, text_dim = text_encoder_flops(text_enc, text_len)
    image_dim = _image_token_width(image_enc)
    f_fusion = fusion.flops_per_example(text_len, n_image)
    # Fusions project inputs whose width differs from theirs (FusionBase.project; merged builds both always but
    # applies them only on a mismatch, like the others). A variant without a width (the probe) projects nothing.
    width = getattr(fusion, "width", None)
    for length, dim in ((text_len, text_dim), (n_image, image_dim)):
        f_fusion += 2 * length * dim * width if width and dim != width else 0
    p = pooled_width(fusion, text_len, n_image, text_dim, image_dim)
    f_head = head.flops_per_example(p)
    forward = f_image + f_text + f_fusion + f_head
    return {
        "image_encoder": f_image,
        "text_encoder": f_text,
        "fusion": f_fusion,
        "head": f_head,
        "forward": forward,
        "train": TRAIN_MULTIPLIER * forward,
        "image_tokens": n_image,
    }


def _image_token_width(encoder: Any) -> int:
    if isinstance(encoder, vision.ResNet) and not encoder.project:
        stages = len(encoder.stage_sizes)
        idx = (encoder.scales or (-1,))[0] % stages
        return encoder.base_filters * 2**idx * (4 if encoder.bottleneck else 1)
    return encoder.width


def param_count(params: Any) -> int:
    """Number of scalars in a (possibly boxed) parameter tree."""
    return int(sum(x.size for x in jax.tree.leaves(layers.unbox(params))))


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def jaxpr_flops(jaxpr: Any) -> int:
    """Matmul + convolution FLOPs of a traced program (2 per multiply-add), the convention of this module.

    ``dot_general``: 2 * |out| * |contracted|; ``conv_general_dilated``: 2 * |out| * kernel size * input channels
    per group; a ``scan`` body counts ``length`` times, a ``cond`` its dearest branch, other sub-programs once; a
    ``while`` raises (no static trip count). An independent count that checks ``model_flops`` exactly.
    ``jaxpr``: a ``jax.make_jaxpr(...)`` result (ClosedJaxpr) or a Jaxpr; returns the FLOPs of one execution.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = math.prod(lhs[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        elif name == "while":
            if any(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)):
                raise ValueError("jaxpr_flops cannot count matmuls inside a while loop (no static trip count)")
        else:
            total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    return total
