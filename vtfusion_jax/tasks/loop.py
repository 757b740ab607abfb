"""The training loop of the retrieval and captioning tasks (train_lib's loop is the classification one).

Same contracts as train_lib: sharded init (eval_shape -> shardings -> jit(init, out_shardings)), a jitted step with
donated state, Orbax checkpoints via checkpoint.py (resume from the newest; the best by the task's validation
metric is kept), workdir/config.json, metrics.jsonl + TensorBoard, workdir/train_summary.json. Training batches are
a pure function of (seed, step), so resuming is exact.

A task supplies a ``Task`` object: the model, a one-example init batch, ``batch(step)`` (global sharded arrays),
``loss(params, batch, rng) -> (loss, metrics)`` and ``validate(params) -> metrics`` with the ``main_metric`` key.
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
from vtfusion_jax.train_lib import TrainState, abstract_state, write_config

log = logging.getLogger(__name__)


def init_state(config, model, init_batch: dict, tx, mesh) -> tuple[TrainState, Any]:
    """Sharded initialisation. Returns (state, state shardings)."""
    k = jax.random.PRNGKey(config.seed)

    def init_params():
        return model.init({"params": jax.random.fold_in(k, 0)}, init_batch, train=False)["params"]

    boxed = jax.eval_shape(init_params)
    p_sh = sharding.param_shardings(boxed, mesh)
    opt = jax.eval_shape(tx.init, sharding.unbox(boxed))
    o_sh = sharding.optimizer_shardings(opt, sharding.unbox(boxed), p_sh, mesh)
    rep = sharding.replicated(mesh)
    state_sh = TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: sharding.unbox(init_params()), out_shardings=p_sh)()
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.fold_in(k, 1)), out_shardings=(rep, rep))()
    return TrainState(step, params, opt_state, rng), state_sh


def restore_params(config, model, init_batch: dict, workdir: str, which: str | int | None, mesh):
    """Parameters of a saved checkpoint ("best" | "latest" | step). Returns (params, step)."""
    tx, _ = optim.make_optimizer(config.optim, 1, optim.frozen_towers(config.model))
    state, state_sh = init_state(config, model, init_batch, tx, mesh)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        step = ckpt_lib.resolve_step(ckpt, which)
        state, _ = ckpt.restore(step, abstract_state(state_sh, state))
    finally:
        ckpt.close()
    return state.params, step


def train(config, workdir: str, task) -> dict:
    """Trains ``task`` for ``config.train.num_steps`` steps in ``workdir`` (resuming). Returns the summary dict."""
    started = time.time()
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

    def step_fn(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, m), grads = jax.value_and_grad(lambda p: task.loss(p, batch, rng), has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = dict(m, loss=loss, grad_norm=optax.tree_utils.tree_norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), m

    step_jit = jax.jit(
        step_fn,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    step, val, window = int(state.step), None, []
    last = (time.time(), step)
    try:
        with jax.set_mesh(mesh), sharding.activation_rules():
            while step < total:
                state, m = step_jit(state, task.batch(step))
                step += 1
                window.append(m)
                if 0 < t.time_limit_seconds < time.time() - started and step < total:
                    log.warning("train.time_limit_seconds reached at step %d: validating, saving, stopping", step)
                    total = step
                if step % t.log_every_steps == 0 or step == total:
                    rows = jax.device_get(window)
                    scalars = {f"train/{k}": float(sum(float(r[k]) for r in rows) / len(rows)) for k in rows[0]}
                    if not math.isfinite(scalars["train/loss"]):
                        raise FloatingPointError(f"non-finite training loss at step {step}")
                    now = time.time()
                    scalars["train/steps_per_sec"] = (step - last[1]) / max(now - last[0], 1e-9)
                    scalars["train/lr"] = optim.current_lr(sched, step - 1, 1)
                    writer.write_scalars(step, scalars)
                    window, last = [], (now, step)
                do_eval = step == total or (t.eval_every_steps > 0 and step % t.eval_every_steps == 0)
                if do_eval:
                    val = task.validate(state.params)
                    writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
                    log.info("step %d: %s", step, json.dumps(val))
                    if val[task.main_metric] > best[0]:
                        best = (val[task.main_metric], step)
                if do_eval or step % t.checkpoint_every_steps == 0:
                    ckpt.save(step, state, {"step": step}, {k: v for k, v in (val or {}).items()} if do_eval else None)
    finally:
        writer.close()
        ckpt.close()
    result = {
        "step": step,
        "best_step": best[1],
        "best_val": best[0],
        "val": dict(val or {}, accuracy=(val or {}).get(task.main_metric, float("nan"))),
        "preempted": False,
        "early_stopped": False,
        "stopped_for_run_limit": step < int(t.num_steps),  # train.time_limit_seconds
        "wall_seconds": time.time() - started,
    }
    if is_main:
        with open(os.path.join(workdir, "train_summary.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)
    return result
