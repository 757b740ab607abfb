"""Optimiser and learning-rate schedule from the config (``config.optim``).

    grads ─► zero frozen towers ─► clip by global norm ─► per tower: AdamW(lr = schedule * multiplier)
          ─► (optim.ema_decay > 0: ParamsEma) ─► (optax.MultiSteps: applied every ``accum_steps`` micro-batches)

Weight decay skips biases and normalisation parameters (by path). Towers, the top-level entries of the parameter
tree, freeze with ``model.<tower>.freeze`` and scale their lr by ``optim.lr_multipliers.<tower>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")
TOWERS = ("image_encoder", "text_encoder", "fusion", "head")
FROZEN = "frozen"

# A path component naming a normalisation layer (ours: *_ln, ln, final_ln, norm0, stem_norm, query_norm, ...).
_NORM_RE = re.compile(r"(^|_)(ln|norm|layernorm|groupnorm)\d*($|_)", re.IGNORECASE)


def schedule(optim_config: Mapping[str, Any], num_updates: int) -> optax.Schedule:
    """An optax schedule (update count -> learning rate) from ``config.optim``: linear warmup to ``lr`` over
    ``warmup_steps``, then cosine / linear decay to ``lr * end_lr_factor`` at ``num_updates`` (micro-steps /
    accum_steps), or constant."""
    c = optim_config
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {c['schedule']!r}; valid: {SCHEDULES}")
    lr, warmup = float(c["lr"]), int(c["warmup_steps"])
    decay_steps = max(1, int(num_updates) - warmup)
    end = lr * float(c["end_lr_factor"])
    if c["schedule"] == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif c["schedule"] == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    else:
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything except biases and normalisation parameters."""

    def keep(path, _):
        keys = _keys(path)
        if keys and keys[-1] in ("bias", "scale"):
            return False
        return not any(_NORM_RE.search(k) for k in keys)

    return jax.tree_util.tree_map_with_path(keep, params)


def tower_labels(params: Any, frozen: frozenset[str] = frozenset()) -> Any:
    """Label of each parameter: its top-level tower name, or ``"frozen"`` for frozen towers."""
    label = lambda path, _: FROZEN if _keys(path)[0] in frozen else _keys(path)[0]  # noqa: E731
    return jax.tree_util.tree_map_with_path(label, params)


def frozen_towers(model_config: Mapping[str, Any]) -> frozenset[str]:
    """Towers whose spec in ``config.model`` says ``freeze: True``."""
    return frozenset(t for t in TOWERS if t in model_config and bool(model_config[t].get("freeze", False)))


def make_optimizer(
    optim_config: Mapping[str, Any], num_updates: int, frozen: frozenset[str] = frozenset()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimiser of the module docstring.

    Args:
      optim_config: ``config.optim`` with lr, warmup_steps, schedule, end_lr_factor, b1, b2, eps, weight_decay,
        grad_clip_norm (0 = off), accum_steps (1 = off), ema_decay (0 = off) and lr_multipliers {tower: float}.
      num_updates: total optimiser updates, for the schedule.
      frozen: towers whose parameters never change.

    Returns:
      (transformation, base schedule); with accum_steps > 1 an ``optax.MultiSteps`` (schedule per real update).
    """
    c = optim_config
    sched = schedule(c, num_updates)
    mults = dict(c["lr_multipliers"])
    unknown = set(mults) - set(TOWERS)
    if unknown:
        raise ValueError(f"optim.lr_multipliers has unknown towers {sorted(unknown)}; valid: {TOWERS}")

    def adamw(mult: float) -> optax.GradientTransformation:
        lr = (lambda count: sched(count) * mult) if mult != 1.0 else sched
        return optax.adamw(lr, **{k: float(c[k]) for k in ("b1", "b2", "eps", "weight_decay")}, mask=decay_mask)

    per_tower = {t: adamw(float(mults.get(t, 1.0))) for t in TOWERS}
    per_tower[FROZEN] = optax.set_to_zero()
    labels = lambda params: tower_labels(params, frozen)
    chain = []
    if frozen:
        # Frozen gradients are zeroed first so that they do not count towards the clipping norm.
        chain.append(_zero_frozen(labels))
    if float(c["grad_clip_norm"]) > 0:
        chain.append(clip_by_global_norm(float(c["grad_clip_norm"])))
    chain.append(optax.multi_transform(per_tower, labels))
    if float(c.get("ema_decay", 0.0)) > 0:
        chain.append(params_ema(float(c["ema_decay"])))
    tx = optax.chain(*chain)
    if int(c["accum_steps"]) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(c["accum_steps"]))
    return tx, sched


class ParamsEma(NamedTuple):
    ema: Any  # the moving average of the parameters, a tree like them


def params_ema(decay: float) -> optax.GradientTransformation:
    """Last in the chain: ema <- decay * ema + (1 - decay) * (params + updates) after every update, from the initial
    parameters. It lives in the optimiser state, so it is sharded like the parameters (``optimizer_shardings``),
    checkpointed, resumed exactly and rolled back with a skipped non-finite step; updates pass through unchanged."""

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        return updates, ParamsEma(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new))

    return optax.GradientTransformation(lambda params: ParamsEma(jax.tree.map(jnp.array, params)), update)


def ema_params(opt_state: Any) -> Any | None:
    """The parameter average held in ``opt_state`` (see ``params_ema``), or None when the optimiser keeps none."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEma))
    return next((x.ema for x in found if isinstance(x, ParamsEma)), None)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the gradients by min(1, max_norm / global norm), as ``optax.clip_by_global_norm``, but as one scalar
    factor multiplied in, which XLA fuses into AdamW instead of writing every clipped gradient out once more on CPU
    (docs/performance.md). Same values up to float32 rounding of the factor."""

    def update(updates, state, params=None):
        del params
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(updates)))
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _zero_frozen(labels) -> optax.GradientTransformation:
    """Zeroes the gradients of parameters labelled ``frozen`` (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g, lb: g * 0 if lb == FROZEN else g, updates, labels(updates)), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def current_lr(sched: optax.Schedule, step: int, accum_steps: int) -> float:
    """Learning rate (multiplier 1) in effect at micro-step ``step``."""
    return float(sched(step // max(1, accum_steps)))
