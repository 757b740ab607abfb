"""Pictures for papers: confusion matrices and the question's attention over the image, drawn on the image.

Attention maps come from the ``intermediates`` collection: a model built with ``fusion.sow_weights=True`` and
applied with ``mutable=["intermediates"]`` stores every fusion attention's probabilities ``[B, H, Lq, Lk]``
(``[layers, B, H, Lq, Lk]`` under nn.scan). ``image_attention`` reduces the text-to-image ones to one weight per
image token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

# Attention modules whose queries come from the text (or learned queries) and whose keys are image tokens.
TEXT_TO_IMAGE_MODULES = ("cross_attn", "text_to_image", "image_attn")


def _attention_leaves(intermediates: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if "attention_weights" in names:
            out.append(("/".join(names), np.asarray(leaf, np.float32)))
    return out


def image_attention(
    intermediates: Mapping[str, Any], text_mask: np.ndarray, num_image_tokens: int
) -> np.ndarray | None:
    """Mean attention that the question pays to each image token.

    Averages over fusion layers, heads and the question's real tokens (learned queries count equally) of every
    text-to-image attention; for merged (single-stream) fusion, the text rows of the joint attention restricted to
    the image columns and renormalised.

    Args:
      intermediates: the ``intermediates`` collection of a sow_weights model.
      text_mask: bool [B, L].
      num_image_tokens: N.

    Returns:
      float32 [B, N] summing to 1 per example, or None if the fusion has no text-to-image attention (concat,
      bottleneck).
    """
    text_mask = np.asarray(text_mask, bool)
    b, length = text_mask.shape
    n = int(num_image_tokens)
    maps = []
    for path, w in _attention_leaves(intermediates):
        w = w.reshape(-1, *w.shape[-4:]).mean(axis=0)  # scanned layers -> mean; [B, H, Lq, Lk]
        w = w.mean(axis=1)  # over heads: [B, Lq, Lk]
        lq, lk = w.shape[-2:]
        if lk == n and any(m in path for m in TEXT_TO_IMAGE_MODULES):
            rows = text_mask if lq == length else np.ones((b, lq), bool)
        elif lq == lk == length + n and "fusion" in path:  # merged: [text; image] joint self-attention
            w = w[:, :length, length:]
            w = w / np.maximum(w.sum(-1, keepdims=True), 1e-9)
            rows = text_mask
        else:
            continue
        r = rows.astype(np.float32)[..., None]  # [B, Lq, 1]
        maps.append((w * r).sum(1) / np.maximum(r.sum(1), 1.0))  # [B, N]
    if not maps:
        return None
    att = np.mean(maps, axis=0)
    return att / np.maximum(att.sum(-1, keepdims=True), 1e-9)


def token_grid(num_tokens: int) -> tuple[int, int, int]:
    """(skip, h, w): image tokens form an h x w grid after ``skip`` leading tokens (a ViT CLS token)."""
    for skip in (0, 1):
        side = math.isqrt(num_tokens - skip)
        if side * side == num_tokens - skip and side > 0:
            return skip, side, side
    raise ValueError(f"{num_tokens} image tokens do not form a square grid")


def overlay(image: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Heat map of per-token ``attention`` [N] upsampled onto ``image`` [H, W, 3] in [0, 1]. Returns [H, W, 3]."""
    skip, h, w = token_grid(attention.shape[0])
    grid = attention[skip:].reshape(h, w)
    grid = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-9)
    hh, ww = image.shape[:2]
    up = np.kron(grid, np.ones((math.ceil(hh / h), math.ceil(ww / w))))[:hh, :ww]  # nearest-neighbour upsampling
    heat = plt.get_cmap("jet")(up)[..., :3]
    return np.clip(0.55 * image + 0.45 * heat, 0.0, 1.0)


def save_attention_map(path: str, image: np.ndarray, attention: np.ndarray, title: str = "") -> None:
    """Writes a PNG: the image beside the attention heat map drawn on it.

    Args:
      path: output PNG path.
      image: [H, W, 3] float in [0, 1] (or uint8).
      attention: [N] weights over the image tokens.
      title: caption (question, answer).
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(overlay(image, np.asarray(attention, np.float32)))
    axes[1].set_title("question -> image attention", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_confusion_matrix(path: str, matrix: np.ndarray, names: Sequence[str], title: str = "") -> None:
    """Writes a PNG of ``matrix[true, predicted]`` (colour = row-normalised share, text = counts)."""
    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
