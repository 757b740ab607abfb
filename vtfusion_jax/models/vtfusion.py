"""VisionTextModel: image encoder + text encoder -> fusion -> head, each chosen by name from the config.

    image [B, H, W, 3] ──► image encoder ──► (image tokens [B, N, Di], image mask [B, N]) ─┐
                                                                                         ├─► fusion ─► head ─► logits
    text_ids [B, L] ─────► text encoder ───► (text tokens [B, L, Dt], text mask [B, L]) ──┘

The model config (ConfigDict or dict): ``width, dtype, attention_impl, scan_layers, remat_policy`` (shared by every
component with the field), ``image_encoder = {name, ...fields}``, ``text_encoder``, ``fusion``, ``head`` and
optionally ``text_dedup`` = U > 0: the text encoder runs once per distinct (text_ids, text_mask) row of a batch, on
at most U rows, and each question gathers its row: the same result (and gradients) as once per question, with the
text tower's cost set by U instead of B when questions repeat (Sort-of-CLEVR has 36 distinct questions). A batch with
more than U distinct rows runs the plain path (``nn.cond``); so do training with dropout drawn in the text tower and
capturing intermediates (attention maps).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtfusion_jax import models
from vtfusion_jax.models import fusion

SHARED_KEYS = ("width", "dtype", "attention_impl", "scan_layers", "remat_policy")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def shared_settings(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model-wide settings handed to every component, with the dtype name resolved."""
    shared = {k: model_config[k] for k in SHARED_KEYS if k in model_config}
    if "dtype" in shared:
        if shared["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {shared['dtype']!r}; valid: {sorted(DTYPES)}")
        shared["dtype"] = DTYPES[shared["dtype"]]
    return shared


def as_dict(x: Any) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


class VisionTextModel(nn.Module):
    """Composite model. ``model_config`` as in the module docstring; ``num_classes`` from the dataset."""

    model_config: Any
    num_classes: int
    per_image_fusion: bool = True  # False: image rows gathered per question before any fusion (the reference path)

    def setup(self):
        cfg = as_dict(self.model_config)
        shared = shared_settings(cfg)
        self.image_encoder = models.get_image_encoder(cfg["image_encoder"], shared)
        self.text_encoder = models.get_text_encoder(cfg["text_encoder"], shared)
        self.fusion = models.get_fusion(cfg["fusion"], shared)
        self.head = models.get_head(cfg["head"], shared, num_classes=self.num_classes)
        self.grouped_fusion = self.per_image_fusion and models.fusion_info(cfg["fusion"]["name"]).per_image
        # Frozen encoders (spec freeze=True; optim.py never updates them) get no backward pass: stop_gradient at
        # their outputs lets XLA drop it (a frozen MiniLM then costs one forward).
        self.frozen = tuple(t for t in ("image_encoder", "text_encoder") if cfg[t].get("freeze", False))
        self.text_dedup = int(cfg.get("text_dedup", 0))  # optional key: absent = off

    def encode_text(self, ids: jax.Array, mask: jax.Array, det: bool) -> tuple[jax.Array, jax.Array]:
        """The text encoder on [B, L] ids / mask; with ``text_dedup`` = U once per distinct row (module docstring)."""
        u = self.text_dedup
        drawn = not det and getattr(self.text_encoder, "dropout_rate", 0) > 0  # one mask per question (GRU: none)
        if u <= 0 or u >= ids.shape[0] or drawn or self.is_mutable_collection("intermediates"):  # sown: per question
            return self.text_encoder(ids, mask, deterministic=det)
        key = jnp.concatenate([ids, mask.astype(ids.dtype)], axis=1)  # [B, 2L]: a question is its ids and mask
        rows, inverse = jnp.unique(key, axis=0, size=u, return_inverse=True)  # [U, 2L], [B]
        inverse = inverse.reshape(-1)
        count = jnp.max(inverse) + 1  # distinct rows (the inverse indexes all of them, even beyond U)
        rows = jnp.where((jnp.arange(u) < count)[:, None], rows, rows[0])  # unused slots: a real row, not all-padding
        length = ids.shape[1]

        def distinct(mdl, rows, inverse):
            text, text_mask = mdl.text_encoder(rows[:, :length], rows[:, length:].astype(bool), deterministic=det)
            return fusion.rows(text, inverse), fusion.rows(text_mask, inverse)

        def every(mdl, rows, inverse):
            del rows, inverse
            return mdl.text_encoder(ids, mask, deterministic=det)

        return nn.cond(count <= u, distinct, every, self, rows, inverse)

    def encode(self, batch: Mapping[str, jax.Array], train: bool = False):
        """Runs both encoders and the fusion. Returns (text [B,L,D], text_mask, image [B,N,D], image_mask, pooled).

        With ``batch["image_index"]`` (int [B]), ``batch["image"]`` holds K distinct images and question b looks at
        image ``image_index[b]``: the same result as repeating the images per question, with K image-tower passes
        (and, for a ``per_image`` fusion variant, its question-independent work once per image too)."""
        det = not train
        image, image_mask = self.image_encoder(batch["image"], deterministic=det)  # [B or K, N, Di], [B or K, N]
        text, text_mask = self.encode_text(batch["text_ids"], batch["text_mask"], det)  # [B, L, Dt], [B, L]
        if "image_encoder" in self.frozen:
            image = jax.lax.stop_gradient(image)
        if "text_encoder" in self.frozen:
            text = jax.lax.stop_gradient(text)
        index = batch.get("image_index")  # image-grouped batch (data/grouped.py): K images for B questions
        if self.grouped_fusion and index is not None:  # the fusion gathers the rows where its maths needs them
            text, image, pooled = self.fusion(text, text_mask, image, image_mask, deterministic=det, image_index=index)
            image_mask = fusion.rows(image_mask, index)  # per question, as the tokens it returned
        else:
            image, image_mask = fusion.rows(image, index), fusion.rows(image_mask, index)
            text, image, pooled = self.fusion(text, text_mask, image, image_mask, deterministic=det)
        return text, text_mask, image, image_mask, pooled

    def __call__(self, batch: Mapping[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
        """batch with image [B,H,W,3], text_ids [B,L], text_mask [B,L] -> {"logits": float32 [B, C]}."""
        text, text_mask, image, image_mask, pooled = self.encode(batch, train)
        return {"logits": self.head(text, text_mask, image, image_mask, pooled, deterministic=not train)}
