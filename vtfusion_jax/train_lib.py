"""The one training loop: ``train_and_evaluate(config, workdir)`` trains any task (tasks/) the same way.

Flow (each box sharded over the ('data', 'fsdp', 'tensor') mesh of sharding.py):

    Task(config) ─► eval_shape(init) ─► shardings ─► jit(init, out_shardings) ─► [restore newest checkpoint |
    import init_from towers] ─► loop: task batch ─► jit(step, donate state) ─► log / validate / save (async) ─► ...

Resume is exact: the state holds params, optimiser state, step and RNG, and the task's data iterator's batch at
step s is a pure function of (seed, s), so k steps + restart + (N - k) steps equals N steps straight.

Stops, each saving a checkpoint first: the last step; SIGTERM (preemption); ``train.steps_per_run`` steps in one
process; ``train.time_limit_seconds`` of wall time; ``train.early_stopping_patience`` evaluations without a better
``task.main_metric``. A NaN / Inf loss follows ``train.nan_policy``: "stop" raises NonFiniteLossError naming the
step and the newest checkpoint (the last good one: a step's metrics are checked before it is saved); "skip" keeps
params and optimiser state of that step (the data moves on) and counts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import struct

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import metrics as metrics_lib
from vtfusion_jax import optim, preflight, pretrained_init, sharding

if TYPE_CHECKING:
    import ml_collections

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
STOP_REASONS = ("num_steps", "preempted", "train.steps_per_run", "train.time_limit_seconds", "early_stopping")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / Inf loss or gradient; the message names the step and the last good checkpoint."""


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data-iterator state (all global jax.Arrays)."""

    step: jax.Array  # int32 [], micro-steps done
    params: Any  # float32 parameter tree
    opt_state: Any  # optimiser state (float32)
    rng: jax.Array  # uint32 [2], base key; step s uses fold_in(rng, s)


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job
    (JAX_COORDINATOR_ADDRESS, several SLURM / Open MPI tasks, or several TPU hosts). Call before using jax.

    Outside a cluster jax detects, set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (jax reads only the first itself), e.g. two processes on one machine:
    ``JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0|1 python train.py ...``.
    """
    env = os.environ
    wants = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if wants and not jax.distributed.is_initialized():
        explicit = {}
        if "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env:
            explicit = dict(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**explicit)


def state_layout(model, init_batch: dict, tx: optax.GradientTransformation, mesh) -> tuple[Any, Any]:
    """Shapes and shardings of the train state, from ``eval_shape`` alone (nothing is initialised or compiled).

    Returns:
      (abstract state: TrainState of ShapeDtypeStructs carrying their shardings, state shardings).
    """
    boxed = jax.eval_shape(
        lambda k: model.init({"params": k}, init_batch, train=False)["params"], jax.random.PRNGKey(0)
    )
    p_sh = sharding.param_shardings(boxed, mesh)
    params = sharding.unbox(boxed)
    opt = jax.eval_shape(tx.init, params)
    o_sh = sharding.optimizer_shardings(opt, params, p_sh, mesh)
    rep = sharding.replicated(mesh)
    state_sh = TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt, jax.ShapeDtypeStruct((2,), jnp.uint32))
    return abstract_state(state_sh, shapes), state_sh


def create_train_state(model, init_batch: dict, tx, mesh, seed: int) -> tuple[TrainState, Any]:
    """Sharded initialisation: eval_shape -> shardings -> jit(init, out_shardings).

    Returns:
      (state, state_shardings), the state already laid out on ``mesh``.
    """
    _, state_sh = state_layout(model, init_batch, tx, mesh)
    rep = sharding.replicated(mesh)
    # Three small programs rather than one: the parameter init (the slow compile: one RNG kernel per parameter)
    # then depends only on the model, so the persistent compilation cache reuses it across optimiser settings.
    k = jax.random.PRNGKey(seed)

    def init_params():
        return sharding.unbox(model.init({"params": jax.random.fold_in(k, 0)}, init_batch, train=False)["params"])

    with jax.set_mesh(mesh):
        params = jax.jit(init_params, out_shardings=state_sh.params)()
        opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
        step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.fold_in(k, 1)), out_shardings=(rep, rep))()
    return TrainState(step, params, opt_state, rng), state_sh


def abstract_state(state_shardings: Any, state_or_shapes: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings (restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_or_shapes, state_shardings
    )


def make_optimizer(config, task, total_steps: int):
    """(tx, schedule) for ``total_steps`` micro-steps (``optim.accum_steps`` micro-steps per update)."""
    accum = int(config.optim.accum_steps)
    return optim.make_optimizer(config.optim, max(total_steps // accum, 1), optim.frozen_towers(config.model))


def restore(config, workdir: str, checkpoint: str | int | None = "best", mesh=None):
    """A trained model: (task, params, checkpoint step) from ``workdir``'s checkpoint ("best" | "latest" | step;
    an unreadable best / latest step is moved aside and the newest step that reads is used).

    The restore target comes from ``state_layout`` (shapes and shardings), so nothing is initialised or compiled,
    and nothing reads the train split (the optimiser state's shapes do not depend on the schedule's length).
    """
    from vtfusion_jax import tasks

    task = tasks.make_task(config, mesh, workdir)
    tx, _ = make_optimizer(config, task, 1)
    target, _ = state_layout(task.model, task.init_batch(), tx, task.mesh)
    ckpt = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", best_metric=task.main_metric, read_only=True)
    try:
        found = ckpt.restore_readable(target, checkpoint)  # an unreadable step: the newest one that reads
    finally:
        ckpt.close()
    if found is None:
        at = "" if checkpoint in (None, "best", "latest") else f" at step {checkpoint}"
        raise FileNotFoundError(f"no readable checkpoint{at} in {ckpt.directory}")
    log.info("Restored checkpoint step %d from %s", found[0], ckpt.directory)
    return task, eval_params(found[1]), found[0]


def eval_params(state: TrainState) -> Any:
    """The parameters evaluation and prediction use: the moving average when ``optim.ema_decay`` > 0."""
    ema = optim.ema_params(state.opt_state)
    return state.params if ema is None else ema


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, skip_nonfinite: bool = False) -> Callable:
    """The (unjitted) training step of any task: ``step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch, rng) -> (loss, aux dict of scalars)`` (a task's ``loss``).
      tx: the optimiser.
      skip_nonfinite: train.nan_policy "skip": a NaN / Inf loss or gradient leaves params and optimiser state
        unchanged (the step counter still advances, so the data moves on) and sets ``skipped`` = 1.

    Returns:
      The step; its metrics are the aux scalars plus loss, grad_norm and skipped.
    """

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(p, batch, rng), has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params, opt_state = jax.tree.map(keep, params, state.params), jax.tree.map(keep, opt_state, state.opt_state)
            skipped = jnp.logical_not(finite).astype(jnp.int32)
        metrics = dict(aux, loss=loss, grad_norm=grad_norm, skipped=skipped)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


@contextlib.contextmanager
def _preemption():
    """Yields ``reached(step) -> bool``: SIGTERM sets a flag the loop checks between steps (multi-process: jax's
    preemption sync point, so every process stops at the same step)."""
    requested = []
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, lambda *_: requested.append(True)) if main else None

    def reached(step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(requested) or multihost_utils.reached_preemption_sync_point(step)
        return bool(requested)

    try:
        yield reached
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def write_config(config, workdir: str) -> None:
    """``workdir/config.json`` (process 0 only)."""
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def window_scalar(key: str, window: list[dict]) -> float:
    """Log value of a metric over the steps since the last log: skipped updates are summed; the others are
    averaged over the steps that were not skipped (NaN when all were)."""
    if key == "skipped":
        return float(np.sum([w[key] for w in window]))
    kept = [w[key] for w in window if not w["skipped"]]
    return float(np.mean(kept)) if kept else float("nan")


def check_finite(step: int, m: Mapping[str, Any], ckpt: ckpt_lib.Checkpointer) -> None:
    """Raises NonFiniteLossError for a non-finite step that was not skipped (naming the last good checkpoint)."""
    if int(m["skipped"]):
        log.warning("non-finite loss %s at step %d: update skipped (train.nan_policy='skip')", float(m["loss"]), step)
        return
    if all(np.isfinite(float(m[k])) for k in ("loss", "grad_norm")):
        return
    ckpt.wait()
    good = ckpt.latest_step()
    where = f"step {good} in {ckpt.directory}" if good is not None else "none (nothing was saved yet)"
    raise NonFiniteLossError(
        f"non-finite training loss {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {step}; "
        f"training stopped, last good checkpoint: {where}"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config``'s task in ``workdir``, resuming from its newest complete checkpoint.

    Writes workdir/config.json, workdir/checkpoints/, TensorBoard events, workdir/metrics.jsonl and the task's
    assets (the caption tasks' vocab.json).

    Args:
      config: a locked experiment config (configs/*.py).
      workdir: output folder.

    Returns:
      {"step", "best_step", "best_val" (the task's main metric), "val": last validation metrics, "stop_reason"
      (STOP_REASONS), "preempted", "early_stopped", "stopped_for_run_limit", "skipped_steps", "wall_seconds"}
      (also written to workdir/train_summary.json).

    Raises:
      NonFiniteLossError: a NaN / Inf loss or gradient; the newest checkpoint stays the last good one.
      preflight.WorkdirError: an unwritable workdir, too little disk, or another model's checkpoints in it.
    """
    from vtfusion_jax import tasks

    started = time.time()
    t = config.train
    if t.nan_policy not in NAN_POLICIES:
        raise ValueError(f"train.nan_policy {t.nan_policy!r} is not one of {sorted(NAN_POLICIES)}")
    if t.compilation_cache_dir:  # before the first compile: a rerun or a restart loads the compiled programs
        from jax.experimental.compilation_cache import compilation_cache as cc

        cc.set_cache_dir(t.compilation_cache_dir)  # = jax.config.update("jax_compilation_cache_dir", ...)
        cc.reset_cache()  # a cache this process opened before (an earlier run, a notebook) would otherwise stay
    maybe_initialize_distributed()
    workdir = preflight.absolute(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        preflight.check_writable(workdir)  # before any slow work
    task = tasks.make_task(config, workdir=workdir)
    mesh, model, init_batch = task.mesh, task.model, task.init_batch()
    total = task.num_train_steps()
    accum = int(config.optim.accum_steps)
    tx, sched = make_optimizer(config, task, total)
    ckpt = ckpt_lib.Checkpointer(
        f"{workdir}/checkpoints", keep=t.keep_checkpoints, best_metric=task.main_metric, best_mode="max"
    )
    abstract, state_sh = state_layout(model, init_batch, tx, mesh)  # shapes only: the checks cost no compilation
    config_json, saved = config.to_json_best_effort(sort_keys=True), ckpt.all_steps()

    def compatible(step, meta):  # refuse another model's checkpoint before restoring it
        preflight.check_compatible(workdir, step, meta, abstract, config_json)

    try:
        if is_main:
            preflight.check_free_disk(ckpt.directory, abstract)
        found = ckpt.restore_readable(abstract, "latest", compatible)  # unreadable steps are moved aside
    except preflight.WorkdirError:
        ckpt.close()
        raise
    data_state, best = None, (-math.inf, None)
    if found is not None:
        _, state, data_state = found
        best_step = ckpt.best_step()
        best_metrics = ckpt.metrics(best_step) if best_step is not None else None
        if best_metrics:
            best = (float(best_metrics[task.main_metric]), best_step)
        log.info("Resumed from step %d in %s", int(state.step), ckpt.directory)
    else:  # a fresh run: towers with model.<tower>.init_from start from their pretrained checkpoint
        if saved:
            log.warning("No readable checkpoint left in %s: training starts from step 0", ckpt.directory)
        state, _ = create_train_state(model, init_batch, tx, mesh, config.seed)
        spec = getattr(model, "model_config", None) or config.model.to_dict()
        state = pretrained_init.import_into_state(state, state_sh, spec, task.image_size, config.seed)
    start = int(state.step)
    write_config(config, workdir)
    task.save_assets(workdir)
    writer = metrics_lib.create_writer(workdir, is_main=is_main)
    if start == 0:
        writer.write_hparams({k: str(v) for k, v in config.items()})
    train_iter = task.train_iter(start)
    if data_state:
        train_iter.set_state(data_state)
    step_fn = jax.jit(
        make_train_step(task.loss, tx, skip_nonfinite=t.nan_policy == "skip"),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    def validate(step: int) -> dict:
        val = task.evaluate(eval_params(state), config.dataset.val_split)
        scalars = {k: v for k, v in val.items() if isinstance(v, (int, float))}
        scalars.update({f"accuracy_{k}": v for k, v in val.get("per_type", {}).items()})
        writer.write_scalars(step, {f"val/{k}": v for k, v in scalars.items()})
        log.info("step %d: validation %s %.4f", step, task.main_metric, val[task.main_metric])
        return val

    def save(step: int, val: dict | None) -> None:
        metrics = {k: v for k, v in val.items() if isinstance(v, (int, float))} if val else None
        ckpt.save(step, state, train_iter.get_state(), metrics)

    val, reason = None, "num_steps"
    pending: tuple[int, Any] | None = None  # (step, device metrics) not yet checked
    window: list[dict] = []
    bad_evals = skipped_steps = 0
    last_log_time, last_log_step = time.time(), start
    try:
        with (
            _preemption() as preempted,
            jax.set_mesh(mesh),
            sharding.activation_rules(),
            _progress(total, start, t.progress_bar and is_main) as bar,
            contextlib.ExitStack() as trace,  # train.profile_steps; closed at `last` or on the way out
        ):
            step = start
            while step < total:
                if step + 1 == t.profile_steps[0]:  # TensorBoard's profile plugin reads workdir/profile
                    profile = f"{workdir}/profile"  # staged locally and uploaded on an object store
                    local = profile if preflight.is_local(profile) else tempfile.mkdtemp(prefix="vtfusion_profile_")
                    jax.profiler.start_trace(local)
                    if local != profile:
                        trace.callback(preflight.copy_tree, local, profile)
                    trace.callback(jax.profiler.stop_trace)  # (callbacks run last-in first-out)
                state, m = step_fn(state, next(train_iter))
                step += 1
                if step == t.profile_steps[1]:
                    jax.block_until_ready(state)  # the trace holds the last step's device work
                    trace.close()
                if pending is not None:  # the previous step's metrics: one step of lag keeps dispatch async
                    window.append(jax.device_get(pending[1]))
                    check_finite(pending[0], window[-1], ckpt)
                pending = (step, m)
                if 0 < t.time_limit_seconds < time.time() - started and step < total:
                    reason = "train.time_limit_seconds"
                elif t.steps_per_run > 0 and step - start >= t.steps_per_run and step < total:
                    reason = "train.steps_per_run"
                elif preempted(step):
                    reason = "preempted"
                is_last = step == total or reason != "num_steps"
                # validate at the cadence, at the end and at the time limit; a preempted or steps_per_run stop
                # only saves (the grace period after SIGTERM is short)
                finishing = step == total or reason == "train.time_limit_seconds"
                do_eval = t.eval_every_steps >= 0 and (
                    finishing or (t.eval_every_steps > 0 and step % t.eval_every_steps == 0)
                )
                do_save = do_eval or is_last or step % t.checkpoint_every_steps == 0
                if do_eval or do_save or step % t.log_every_steps == 0:  # checked before the step is saved
                    window.append(jax.device_get(pending[1]))
                    check_finite(step, window[-1], ckpt)
                    pending = None
                if step % t.log_every_steps == 0 or is_last:
                    now = time.time()
                    sps = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    scalars = {f"train/{k}": window_scalar(k, window) for k in window[0]}
                    skipped_steps += int(scalars["train/skipped"])
                    lr = optim.current_lr(sched, step - 1, accum)
                    scalars.update({"train/lr": lr, "train/steps_per_sec": sps})
                    writer.write_scalars(step, dict(scalars, **{"train/examples_per_sec": sps * t.global_batch_size}))
                    if bar is not None:
                        bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", steps_s=f"{sps:.2f}", refresh=False)
                    window, last_log_time, last_log_step = [], now, step
                new_val = validate(step) if do_eval else None
                if new_val is not None:
                    val, better = new_val, new_val[task.main_metric] > best[0]
                    best, bad_evals = ((val[task.main_metric], step), 0) if better else (best, bad_evals + 1)
                    if 0 < t.early_stopping_patience <= bad_evals and not is_last:
                        reason, is_last = "early_stopping", True
                if do_save or is_last:
                    save(step, new_val)
                if bar is not None:
                    bar.update(1)
                if is_last:
                    break
    finally:
        train_iter.close()
        writer.close()
        ckpt.close()
    if reason != "num_steps":
        log.warning("Stopped at step %d (%s); saved a checkpoint: rerun the same command to resume.", step, reason)
    result = {
        "step": int(step),
        "best_step": best[1],
        "best_val": best[0],
        "val": val,
        "stop_reason": reason,
        "preempted": reason == "preempted",
        "early_stopped": reason == "early_stopping",
        "stopped_for_run_limit": reason in ("train.steps_per_run", "train.time_limit_seconds"),
        "skipped_steps": skipped_steps,
        "wall_seconds": time.time() - started,
    }
    if is_main:
        (epath.Path(workdir) / "train_summary.json").write_text(json.dumps(result, indent=2, default=float))
    return result
