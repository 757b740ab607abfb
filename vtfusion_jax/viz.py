"""Pictures for papers: confusion matrices and where the question attends on the image, per fusion variant.

A model with ``fusion.sow_weights=True`` applied with ``mutable=["intermediates"]`` stores every fusion attention's
probabilities ``[B, H, Lq, Lk]`` (``[layers, ...]`` under nn.scan). ``attention_views`` reduces them, by the roles in
the variant's registry entry (``attention_maps``), to the question's map over the image plus the variant's extras;
``save_attention_figure`` draws them, one panel per scale.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from matplotlib.figure import Figure

from vtfusion_jax import layers, models

Grids = Sequence[tuple[int, int]] | None  # (h, w) of each scale's token grid; None: one square grid
Words = Sequence[str] | None  # the question's real tokens (bar labels)


def _leaves(tree: Any, name: str) -> list[tuple[list[str], int, np.ndarray]]:
    """(path names, layer number (0 if none), float32 value) of every leaf with ``name`` in its path."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if name in names:
            layer = next((int(p[len("layers_") :]) for p in names if re.fullmatch(r"layers_\d+", p)), 0)
            out.append((names, layer, np.asarray(leaf, np.float32)))
    return out


def _by_module(intermediates: Mapping[str, Any]) -> dict[str, list[np.ndarray]]:
    """Sown attention probabilities by module, layer-independent key -> [per layer, in order: [B, H, Lq, Lk]].

    "fusion/blocks/layers_1/cross_attn/attention_weights/0" and the scanned "fusion/blocks/stacked/cross_attn/..."
    ([layers, B, H, Lq, Lk]) both land under "fusion/blocks/cross_attn".
    """
    found: dict[str, list[tuple[int, np.ndarray]]] = {}
    for parts, layer, w in _leaves(intermediates, "attention_weights"):
        module = parts[: parts.index("attention_weights")]
        key = "/".join(p for p in module if not re.fullmatch(r"layers_\d+|stacked", p))
        per_layer = w.reshape(-1, *w.shape[-4:])  # scanned: [layers, B, H, Lq, Lk]; unrolled: [1, ...]
        found.setdefault(key, []).extend((layer * len(per_layer) + k, x) for k, x in enumerate(per_layer))
    return {k: [x for _, x in sorted(v, key=lambda t: t[0])] for k, v in found.items()}


def _module(by_module: dict[str, list[np.ndarray]], name: str | None) -> list[np.ndarray]:
    """The per-layer head-averaged [B, Lq, Lk] maps of the fusion module whose path ends in ``name``."""
    for key, maps in by_module.items():
        if name and key.startswith("fusion/") and key.endswith(f"/{name}"):
            return [m.mean(axis=1) for m in maps]
    return []


def _rows_mean(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean over the real query rows: w [B, Lq, Lk], rows bool [B, Lq] -> [B, Lk]."""
    r = rows.astype(np.float32)[..., None]
    return (w * r).sum(1) / np.maximum(r.sum(1), 1.0)


def _renorm(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(w.sum(-1, keepdims=True), 1e-9)


@dataclasses.dataclass
class AttentionViews:
    """What a fusion variant's attention says about one batch (mean over heads, and over layers unless noted).

    Attributes:
      text_to_image: [B, N] the question's attention over the image tokens (sums to 1), or None (concat, rn).
      image_to_text: [B, L] co_attention: the image tokens' mean attention over the question's tokens, else None.
      per_token: [B, K, N] each learned query's (query) or shared token z's (bottleneck) attention over the image,
        else None.
      per_token_weight: [B, K] how much the question reads each of those K tokens, or None.
      per_token_name: "query" | "bottleneck token" | "".
      how: one line saying how text_to_image was computed (shown in the figure).
    """

    text_to_image: np.ndarray | None
    image_to_text: np.ndarray | None = None
    per_token: np.ndarray | None = None
    per_token_weight: np.ndarray | None = None
    per_token_name: str = ""
    how: str = ""


def attention_views(
    intermediates: Mapping[str, Any], text_mask: np.ndarray, num_image_tokens: int, fusion: str | None = None
) -> AttentionViews:
    """Reduces a sow_weights model's ``intermediates`` to the maps eval draws, from the variant's attention roles.

      text_to_image   mean over the real question tokens (over layers and heads); with image_to_text, that
                      module's mean over the image tokens gives the image -> text bars.
      joint           text rows of the [text; image] self-attention restricted to the image columns, renormalised.
      query_to_image  per learned query its map over the image; the question's map composes the readout
                      (text_to_query, last layer) with them: sum_q a(t, q) a(q, image) (a plain mean without one).
      text_stream     + image_stream: the question reaches the image only through z: per z token, z -> image in the
                      image stream; the question's map composes text -> z (layer l) with z -> image of layer l - 1
                      (what z carried into layer l); with one layer, where z looks.

    ``text_mask`` is bool [B, L], ``num_image_tokens`` N; ``fusion`` the variant's registry name (None tries every
    registered variant's roles, most roles first, and keeps the first whose modules and shapes fit). Returns
    AttentionViews (text_to_image None when the fusion has no attention, e.g. concat, rn).
    """
    mods = _by_module(intermediates)
    text_mask = np.asarray(text_mask, bool)
    if fusion is not None:
        candidates = [models.fusion_info(fusion).attention_maps]
    else:
        candidates = sorted((i.attention_maps for i in models.FUSIONS.values() if i.attention_maps), key=len)[::-1]
    for roles in candidates:
        views = _views({r: _module(mods, m) for r, m in roles.items()}, text_mask, int(num_image_tokens))
        if views is not None:
            views.text_to_image = _renorm(views.text_to_image)
            return views
    return AttentionViews(None)


def _views(maps: dict[str, list[np.ndarray]], text_mask: np.ndarray, n: int) -> AttentionViews | None:
    """attention_views for one variant's role -> per-layer [B, Lq, Lk] maps; None when they do not fit."""
    length = text_mask.shape[1]
    t2i = maps.get("text_to_image")
    if t2i and t2i[0].shape[-1] == n:
        views = AttentionViews(_rows_mean(np.mean(t2i, 0), text_mask), how="text -> image cross-attention")
        if maps.get("image_to_text"):
            views.image_to_text = np.mean(maps["image_to_text"], 0).mean(1)  # [B, L]: over layers, image rows
        return views
    q2i, readout = maps.get("query_to_image"), maps.get("text_to_query")
    if q2i and q2i[0].shape[-1] == n:
        per_query = np.mean(q2i, 0)  # [B, Q, N]
        if readout:
            weight = _rows_mean(readout[-1], text_mask)  # [B, Q]
            how = "sum over queries of (text -> query) x (query -> image)"
        else:
            weight, how = np.full(per_query.shape[:2], 1.0 / per_query.shape[1], np.float32), "mean over queries"
        return AttentionViews(np.einsum("bq,bqn->bn", weight, per_query), None, per_query, weight, "query", how)
    joint = maps.get("joint")
    if joint and joint[0].shape[-2:] == (length + n, length + n):
        w = _renorm(np.mean(joint, 0)[:, :length, length:])
        return AttentionViews(_rows_mean(w, text_mask), how="text rows of the joint self-attention")
    tz, iz = maps.get("text_stream"), maps.get("image_stream")
    if tz and iz and iz[0].shape[-1] > n:
        z2i = [_renorm(w[:, n:, :n]) for w in iz]  # per layer [B, nz, N]
        t2z = [_renorm(w[:, :length, length:]) for w in tz]  # per layer [B, L, nz]
        if len(z2i) > 1:
            comp = [_rows_mean(t2z[k] @ z2i[k - 1], text_mask) for k in range(1, len(z2i))]
            how = "(text -> z, layer l) x (z -> image, layer l-1)"
        else:
            comp = [_rows_mean(t2z[0] @ z2i[0], text_mask)]
            how = "one layer: (text -> z) x (z -> image) of the same layer (z reaches the text only after it)"
        weight = np.mean([_rows_mean(w, text_mask) for w in t2z], 0)  # [B, nz]
        return AttentionViews(np.mean(comp, 0), None, np.mean(z2i, 0), weight, "bottleneck token", how)
    return None


def gate_values(params: Mapping[str, Any]) -> list[float]:
    """tanh of every ``attn_gate`` parameter, in layer order (a variant registered with ``has_gates``; else empty)."""
    out = [(layer, float(g)) for _, layer, v in _leaves(layers.unbox(params), "attn_gate") for g in np.tanh(v.ravel())]
    return [g for _, g in sorted(out, key=lambda t: t[0])]


def token_grid(num_tokens: int) -> tuple[int, int, int]:
    """(skip, h, w): image tokens form an h x w grid after ``skip`` leading tokens (a ViT CLS token)."""
    for skip in (0, 1):
        side = math.isqrt(num_tokens - skip)
        if side * side == num_tokens - skip and side > 0:
            return skip, side, side
    raise ValueError(f"{num_tokens} image tokens do not form a square grid")


def overlay(image: np.ndarray, attention: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Heat map of per-token ``attention`` [N] upsampled onto ``image`` [H, W, 3] in [0, 1]. Returns [H, W, 3].
    ``grid`` (h, w) with h * w = N; None infers a square grid (after a ViT CLS token, if any)."""
    if grid is None:
        skip, h, w = token_grid(attention.shape[0])
    else:
        (h, w), skip = grid, attention.shape[0] - grid[0] * grid[1]
    grid_map = attention[skip:].reshape(h, w)
    grid_map = (grid_map - grid_map.min()) / max(float(grid_map.max() - grid_map.min()), 1e-9)
    hh, ww = image.shape[:2]
    up = np.kron(grid_map, np.ones((math.ceil(hh / h), math.ceil(ww / w))))[:hh, :ww]  # nearest-neighbour upsampling
    heat = matplotlib.colormaps["jet"](up)[..., :3]
    return np.clip(0.55 * image + 0.45 * heat, 0.0, 1.0)


def split_scales(attention: np.ndarray, grids: Grids) -> list[np.ndarray]:
    """Per-scale pieces of ``attention`` [N] over multi-scale image tokens (``vision.token_grids`` order); ``grids``
    None or one grid: the whole vector, one piece."""
    if not grids or len(grids) == 1:
        return [attention]
    sizes = [h * w for h, w in grids]
    if attention.shape[0] != sum(sizes):
        raise ValueError(f"{attention.shape[0]} image tokens do not match the scales' grids {list(grids)}")
    return np.split(attention, np.cumsum(sizes)[:-1])


def _scale_panels(image, attention, grids, label: str) -> list[tuple[str, np.ndarray]]:
    pieces = split_scales(np.asarray(attention, np.float32), grids)
    if len(pieces) == 1:
        return [(label, overlay(image, pieces[0], tuple(grids[0]) if grids else None))]
    return [
        (f"{label}, scale {k} ({h}x{w}, {float(p.sum()):.0%})", overlay(image, p, (h, w)))
        for k, (p, (h, w)) in enumerate(zip(pieces, grids, strict=True))
    ]


def save_attention_figure(
    path: str, image: np.ndarray, views: AttentionViews, index: int, grids: Grids = None, tokens: Words = None, title=""
) -> list[str]:
    """Writes one PNG of example ``index`` (its row in the batch's attention_views() ``views``): the image ([H, W, 3]
    float in [0, 1], or uint8), the question's attention (a panel per scale, with its share), co_attention's image ->
    text bars (labelled with ``tokens``, the question's real tokens), one query / bottleneck map per learned token.
    ``grids``: (h, w) of each scale's token grid (``vision.token_grids``; None = one square grid); ``title``: the
    caption. Returns the panel titles in drawing order (eval records them next to the PNGs)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    top: list[tuple[str, Any]] = [("image", image)]
    top += _scale_panels(image, views.text_to_image[index], grids, "question -> image")
    if views.image_to_text is not None:
        n_tok = len(tokens) if tokens is not None else views.image_to_text.shape[1]
        top.append(("image -> text (mean over image tokens)", ("bar", views.image_to_text[index, :n_tok])))
    extra: list[tuple[str, Any]] = []
    if views.per_token is not None:
        for k in range(views.per_token.shape[1]):
            w = float(views.per_token_weight[index, k]) if views.per_token_weight is not None else float("nan")
            label = f"{views.per_token_name} {k} (q reads {w:.2f})"
            extra += _scale_panels(image, views.per_token[index, k], grids, label)
    cols = max(len(top), min(4, len(extra)) or 1)
    rows = 1 + math.ceil(len(extra) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.9))  # no pyplot: files only, the caller's backend untouched
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    placed = [(axes[0, c], p) for c, p in enumerate(top)]
    placed += [(axes[1 + k // cols, k % cols], p) for k, p in enumerate(extra)]
    for ax, (name, content) in placed:
        ax.set_title(name, fontsize=7)
        if isinstance(content, tuple):  # ("bar", weights over the question's tokens)
            ax.axis("on")
            values = np.asarray(content[1], np.float32)
            ax.bar(range(len(values)), values, color="tab:orange")
            labels = list(tokens) if tokens is not None else [str(i) for i in range(len(values))]
            ax.set_xticks(range(len(values)), labels[: len(values)], rotation=70, fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
        else:
            ax.imshow(content)
    fig.suptitle(f"{title}\n{views.how}" if views.how else title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [name for name, _ in top + extra]


def save_attention_map(path: str, image: np.ndarray, attention: np.ndarray, title="", grids: Grids = None) -> None:
    """Writes a PNG: ``image`` beside the heat map of ``attention`` ([N] weights over the image tokens) drawn on it,
    one panel per scale (``grids`` as for save_attention_figure)."""
    views = AttentionViews(np.asarray(attention, np.float32)[None])
    save_attention_figure(path, image, views, 0, grids, title=title)


def save_confusion_matrix(path: str, matrix: np.ndarray, names: Sequence[str], title: str = "") -> None:
    """Writes a PNG of ``matrix[true, predicted]`` (colour = row-normalised share, text = counts)."""
    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    for i, j in zip(*np.nonzero(m), strict=True):
        color = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6, color=color)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
