"""The training loop of the retrieval and captioning tasks (train_lib's loop is the classification one).

Same contracts as train_lib: sharded init (eval_shape -> shardings -> jit(init, out_shardings)), a jitted step with
donated state, Orbax checkpoints via checkpoint.py (resume from the newest; the best by the task's validation
metric is kept), workdir/config.json, metrics.jsonl + TensorBoard, workdir/train_summary.json. Training batches are
a pure function of (seed, step), so resuming is exact.

A task supplies a ``Task`` object: the model, a one-example init batch, ``batch(step)`` (global sharded arrays),
``loss(params, batch, rng) -> (loss, metrics)`` and ``validate(params) -> metrics`` with the ``main_metric`` key.

Non-finite losses follow ``train.nan_policy`` exactly as in train_lib's classification loop (its helpers are reused):
"stop" raises NonFiniteLossError naming the step and the newest checkpoint, which is the last good one (a step's
metrics are checked before that step is saved); "skip" keeps the params and optimiser state of a step whose loss or
gradient norm is NaN / Inf (the step counter still advances, so the data moves on), logs ``train/skipped`` and
counts ``skipped_steps``. Every stop says why: ``stop_reason`` in the result and train_summary.json is "num_steps"
(the run finished) or "train.time_limit_seconds" (``stopped_for_run_limit`` is True then), and the log line names it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import metrics as metrics_lib
from vtfusion_jax import optim, sharding
from vtfusion_jax.train_lib import (
    TrainState,
    _check_finite,
    _nan_policy,
    _window_scalar,
    abstract_state,
    write_config,
)

log = logging.getLogger(__name__)


def _init_fn(config, model, init_batch: dict):
    k = jax.random.PRNGKey(config.seed)
    return lambda: model.init({"params": jax.random.fold_in(k, 0)}, init_batch, train=False)["params"]


def state_layout(config, model, init_batch: dict, tx, mesh) -> tuple[TrainState, Any]:
    """Shapes only (jax.eval_shape: nothing is computed or compiled). Returns (TrainState of ShapeDtypeStructs,
    state shardings)."""
    boxed = jax.eval_shape(_init_fn(config, model, init_batch))
    params = sharding.unbox(boxed)
    p_sh = sharding.param_shardings(boxed, mesh)
    opt = jax.eval_shape(tx.init, params)
    o_sh = sharding.optimizer_shardings(opt, params, p_sh, mesh)
    rep = sharding.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return TrainState(scalar, params, opt, rng), TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)


def init_state(config, model, init_batch: dict, tx, mesh) -> tuple[TrainState, Any]:
    """Sharded initialisation. Returns (state, state shardings)."""
    k = jax.random.PRNGKey(config.seed)
    init_params = _init_fn(config, model, init_batch)
    _, state_sh = state_layout(config, model, init_batch, tx, mesh)
    rep = state_sh.step
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: sharding.unbox(init_params()), out_shardings=state_sh.params)()
        opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
        step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.fold_in(k, 1)), out_shardings=(rep, rep))()
    return TrainState(step, params, opt_state, rng), state_sh


def restore_params(config, model, init_batch: dict, workdir: str, which: str | int | None, mesh):
    """Parameters of a saved checkpoint ("best" | "latest" | step). Returns (params, step).

    The restore target comes from ``state_layout`` (shapes and shardings), so nothing is initialised or compiled."""
    tx, _ = optim.make_optimizer(config.optim, 1, optim.frozen_towers(config.model))
    shapes, state_sh = state_layout(config, model, init_batch, tx, mesh)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        step = ckpt_lib.resolve_step(ckpt, which)
        state, _ = ckpt.restore(step, abstract_state(state_sh, shapes))
    finally:
        ckpt.close()
    return state.params, step


STOP_REASONS = ("num_steps", "train.time_limit_seconds")


def make_step(task, tx, skip_nonfinite: bool):
    """The (unjitted) training step: (state, batch) -> (state, metrics incl. loss, grad_norm, skipped).

    ``skip_nonfinite`` (train.nan_policy "skip"): a NaN / Inf loss or gradient norm leaves params and optimiser state
    as they were and sets ``skipped`` = 1 (train_lib.train_step's rule)."""

    def step_fn(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, m), grads = jax.value_and_grad(lambda p: task.loss(p, batch, rng), has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        skipped = jnp.logical_not(finite).astype(jnp.int32) if skip_nonfinite else jnp.zeros((), jnp.int32)
        m = dict(m, loss=loss, grad_norm=grad_norm, skipped=skipped)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), m

    return step_fn


def train(config, workdir: str, task) -> dict:
    """Trains ``task`` for ``config.train.num_steps`` steps in ``workdir`` (resuming).

    Returns:
      {"step", "best_step", "best_val", "val", "stop_reason" (STOP_REASONS), "stopped_for_run_limit",
      "skipped_steps", "preempted", "early_stopped", "wall_seconds"}, also written to workdir/train_summary.json.

    Raises:
      NonFiniteLossError: train.nan_policy "stop" and a NaN / Inf loss or gradient.
    """
    started = time.time()
    nan_policy = _nan_policy(config)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    t = config.train
    mesh = task.mesh
    total = int(t.num_steps)
    tx, sched = optim.make_optimizer(config.optim, total, optim.frozen_towers(config.model))
    state, state_sh = init_state(config, task.model, task.init_batch, tx, mesh)
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, best_metric=task.main_metric, best_mode="max"
    )
    best = (-math.inf, None)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(ckpt.latest_step(), abstract_state(state_sh, state))
        if ckpt.best_step() is not None and ckpt.metrics(ckpt.best_step()):
            best = (float(ckpt.metrics(ckpt.best_step())[task.main_metric]), ckpt.best_step())
        log.info("Resumed from step %d", int(state.step))
    write_config(config, workdir)
    task.save_assets(workdir)
    writer = metrics_lib.create_writer(workdir, is_main=is_main)

    step_jit = jax.jit(
        make_step(task, tx, skip_nonfinite=nan_policy == "skip"),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    step, val, window, skipped_steps, reason = int(state.step), None, [], 0, "num_steps"
    pending = None  # (step, device metrics) not yet checked: one step of lag keeps dispatch asynchronous
    last = (time.time(), step)
    try:
        with jax.set_mesh(mesh), sharding.activation_rules():
            while step < total:
                state, m = step_jit(state, task.batch(step))
                step += 1
                if pending is not None:
                    window.append(jax.device_get(pending[1]))
                    _check_finite(pending[0], window[-1], ckpt)
                pending = (step, m)
                if 0 < t.time_limit_seconds < time.time() - started and step < total:
                    log.warning(
                        "Stopping at step %d of %d: train.time_limit_seconds (%s s) reached; validating and saving.",
                        step,
                        int(t.num_steps),
                        t.time_limit_seconds,
                    )
                    total, reason = step, "train.time_limit_seconds"
                do_eval = step == total or (t.eval_every_steps > 0 and step % t.eval_every_steps == 0)
                do_save = do_eval or step % t.checkpoint_every_steps == 0
                if do_save or step % t.log_every_steps == 0:  # this step's metrics, checked before it is saved
                    window.append(jax.device_get(pending[1]))
                    _check_finite(step, window[-1], ckpt)
                    pending = None
                if step % t.log_every_steps == 0 or step == total:
                    scalars = {f"train/{k}": _window_scalar(k, window) for k in window[0]}
                    skipped_steps += int(scalars["train/skipped"])
                    now = time.time()
                    scalars["train/steps_per_sec"] = (step - last[1]) / max(now - last[0], 1e-9)
                    scalars["train/lr"] = optim.current_lr(sched, step - 1, 1)
                    writer.write_scalars(step, scalars)
                    window, last = [], (now, step)
                if do_eval:
                    val = task.validate(state.params)
                    writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
                    log.info("step %d: %s", step, json.dumps(val))
                    if val[task.main_metric] > best[0]:
                        best = (val[task.main_metric], step)
                if do_save:
                    ckpt.save(step, state, {"step": step}, {k: v for k, v in (val or {}).items()} if do_eval else None)
    finally:
        writer.close()
        ckpt.close()
    if reason != "num_steps":
        log.warning("Stopped at step %d (%s); resume by running the same command again.", step, reason)
    result = {
        "step": step,
        "best_step": best[1],
        "best_val": best[0],
        "val": dict(val or {}, accuracy=(val or {}).get(task.main_metric, float("nan"))),
        "preempted": False,
        "early_stopped": False,
        "stop_reason": reason,
        "stopped_for_run_limit": reason == "train.time_limit_seconds",
        "skipped_steps": skipped_steps,
        "wall_seconds": time.time() - started,
    }
    if is_main:
        with open(os.path.join(workdir, "train_summary.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)
    return result
