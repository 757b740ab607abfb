"""Losses as free functions: classification cross-entropy / focal loss and the caption LM loss.

(ITC / ITM live beside the retrieval model in models/retrieval.py: they need its embedding methods.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(
    logits: jax.Array, labels: jax.Array, valid: jax.Array, label_smoothing: float = 0.0, focal_gamma: float = 0.0
) -> jax.Array:
    """Mean (label-smoothed) softmax cross-entropy over valid rows. logits [B, C], labels [B], valid [B].

    ``focal_gamma`` > 0 gives the focal loss (Lin et al. 2017), sum_c y_c (1 - p_c)^gamma (-log p_c): examples the
    model already gets right with confidence p weigh (1 - p)^gamma, so once the common cases are learnt the gradient
    comes from the rare ones still wrong. gamma = 0 is plain cross-entropy.
    """
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    logits = logits.astype(jnp.float32)
    if focal_gamma:
        logp = jax.nn.log_softmax(logits)
        weight = (1.0 - jnp.exp(logp)) ** focal_gamma  # gradients flow through the weight too, as in Lin et al.
        per = -jnp.sum(onehot * weight * logp, axis=-1)
    else:
        per = optax.softmax_cross_entropy(logits, onehot)  # [B]
    w = valid.astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_loss(
    model, params, batch: dict, rng: jax.Array, *, label_smoothing: float = 0.0, focal_gamma: float = 0.0
) -> tuple[jax.Array, dict]:
    """Training loss of a VisionTextModel on a batch with "label" [B] and "valid" [B].

    Returns:
      (loss, {"accuracy"}): the mean loss over valid rows and their accuracy.
    """
    logits = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})["logits"]
    loss = cross_entropy(logits, batch["label"], batch["valid"], label_smoothing, focal_gamma)
    valid = batch["valid"].astype(jnp.float32)
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return loss, {"accuracy": acc}


def sequence_loss(logits: jax.Array, targets: jax.Array, pad_id: int, label_smoothing: float = 0.0):
    """Token-level LM loss. logits [B, T, V], targets [B, T]; positions holding ``pad_id`` are excluded.

    Returns:
      (mean label-smoothed cross-entropy over real target tokens, their token accuracy).
    """
    valid = (targets != pad_id).astype(jnp.float32)
    onehot = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    per = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.sum(per * valid) / n, jnp.sum((jnp.argmax(logits, -1) == targets) * valid) / n
