"""TrainState, the sharded train / eval steps and ``train_and_evaluate(config, workdir)``.

Flow (each box sharded over the ('data', 'fsdp', 'tensor') mesh of sharding.py):

    eval_shape(init) ─► shardings ─► jit(init, out_shardings) ─► [restore newest checkpoint] ─►
    loop: batch ─► jit(train_step, donate state) ─► log / validate / save (async) ─► ... ─► final save

Resume is exact: the state holds params, optimiser state, step and RNG, and the data iterator's batch at step s is
a pure function of (seed, s), so k steps + restart + (N - k) steps equals N steps straight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import metrics as metrics_lib
from vtfusion_jax import optim, preflight, pretrained_init, sharding
from vtfusion_jax.data import pipeline
from vtfusion_jax.data.tokenizer import Tokenizer
from vtfusion_jax.models.vtfusion import VisionTextModel

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / Inf loss or gradient; the message names the step and the last good checkpoint."""


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data-iterator state (all global jax.Arrays)."""

    step: jax.Array  # int32 [], micro-steps done
    params: Any  # float32 parameter tree
    opt_state: Any  # optimiser state (float32)
    rng: jax.Array  # uint32 [2], base key; step s uses fold_in(rng, s)


# ----------------------------------------------------------------------------------------------- setup


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


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by ``config.dataset`` (None path = the MiniLM WordPiece vocabulary)."""
    return Tokenizer(config.dataset.tokenizer_path, max_len=config.dataset.max_len)


def get_meta(config: ml_collections.ConfigDict) -> dict:
    """Dataset metadata (builds the dataset on first use)."""
    d = config.dataset
    return pipeline.dataset_meta(d.name, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict())


def model_spec(config: ml_collections.ConfigDict, vocab_size: int, sow_weights: bool = False) -> dict:
    """``config.model`` as a plain dict, with the tokenizer's vocabulary size filled in and the architecture of
    towers with ``init_from`` taken from their checkpoint (pretrained_init.resolve_model_spec)."""
    spec = config.model.to_dict()
    spec["text_encoder"] = dict(spec["text_encoder"], vocab_size=int(vocab_size))
    if sow_weights:
        spec["fusion"] = dict(spec["fusion"], sow_weights=True)
    return pretrained_init.resolve_model_spec(spec)


def build_model(config, num_classes: int, vocab_size: int, sow_weights: bool = False) -> VisionTextModel:
    """The VisionTextModel of ``config.model`` (``sow_weights`` records attention maps; params are unchanged)."""
    return VisionTextModel(model_spec(config, vocab_size, sow_weights), int(num_classes))


def image_size(config, meta: Mapping[str, Any]) -> int:
    """Side of the images fed to the model."""
    return int(config.dataset.image_size or meta["image_shape"][0])


def init_batch(config, meta: Mapping[str, Any]) -> dict:
    """A one-example batch of zeros with the model's input shapes (parameter shapes do not depend on B)."""
    s, length = image_size(config, meta), config.dataset.max_len
    return {
        "image": jnp.zeros((1, s, s, 3), jnp.float32),
        "text_ids": jnp.zeros((1, length), jnp.int32),
        "text_mask": jnp.ones((1, length), bool),
    }


def _images_per_batch(config) -> int:
    """``train.images_per_batch``; configs written before the field existed (old workdirs) mean 0 (ungrouped)."""
    return int(config.train.images_per_batch) if "images_per_batch" in config.train else 0


def num_train_steps(config, meta: Mapping[str, Any]) -> int:
    """``train.num_steps`` if > 0, else ``num_epochs`` over the train split, rounded up to whole updates."""
    t = config.train
    accum = int(config.optim.accum_steps)
    if t.num_steps > 0:
        steps = int(t.num_steps)
    elif _images_per_batch(config) > 0:  # image-grouped batches: epochs come from the packing plan
        d = config.dataset
        steps = pipeline.grouped_steps_for_epochs(
            dataset=d.name,
            split=d.train_split,
            seed=config.seed,
            global_batch_size=t.global_batch_size,
            images_per_batch=t.images_per_batch,
            num_epochs=t.num_epochs,
            data_dir=d.data_dir,
            builder_kwargs=d.builder_kwargs.to_dict(),
        )
    else:
        n = meta["num_examples"][config.dataset.train_split.split("[")[0]]
        steps = math.ceil(t.num_epochs * n / t.global_batch_size)
    return int(math.ceil(steps / accum) * accum)


def state_layout(config, model: nn.Module, tx: optax.GradientTransformation, meta, mesh) -> tuple[Any, Any]:
    """Shapes and shardings of the train state, from ``eval_shape`` alone (nothing is initialised).

    Returns:
      (abstract state: TrainState of ShapeDtypeStructs carrying their shardings, state shardings).
    """
    batch = init_batch(config, meta)
    boxed = jax.eval_shape(lambda k: model.init({"params": k}, batch, train=False)["params"], jax.random.PRNGKey(0))
    p_sh = sharding.param_shardings(boxed, mesh)
    params = sharding.unbox(boxed)
    opt = jax.eval_shape(tx.init, params)
    o_sh = sharding.optimizer_shardings(opt, params, p_sh, mesh)
    rep = sharding.replicated(mesh)
    state_sh = TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt, jax.ShapeDtypeStruct((2,), jnp.uint32))
    return abstract_state(state_sh, shapes), state_sh


def create_train_state(config, model: nn.Module, tx: optax.GradientTransformation, meta, mesh) -> tuple[Any, Any]:
    """Sharded initialisation: eval_shape -> shardings -> jit(init, out_shardings).

    Returns:
      (state, state_shardings), the state already laid out on ``mesh``.
    """
    batch = init_batch(config, meta)
    _, state_sh = state_layout(config, model, tx, meta, mesh)
    rep = sharding.replicated(mesh)
    # Three small programs rather than one: the parameter init (the slow compile: one RNG kernel per parameter)
    # then depends only on the model, so the persistent compilation cache reuses it across optimiser settings.
    k = jax.random.PRNGKey(config.seed)

    def init_params():
        return sharding.unbox(model.init({"params": jax.random.fold_in(k, 0)}, batch, train=False)["params"])

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


# ----------------------------------------------------------------------------------------------- steps


def cross_entropy(
    logits: jax.Array, labels: jax.Array, valid: jax.Array, label_smoothing: float = 0.0, focal_gamma: float = 0.0
):
    """Mean (label-smoothed) softmax cross-entropy over valid rows. logits [B, C], labels [B], valid [B].

    ``focal_gamma`` > 0 gives the focal loss (Lin et al. 2017), sum_c y_c (1 - p_c)^gamma (-log p_c): examples the
    model already gets right with confidence p weigh (1 - p)^gamma, so once the common cases are learnt the gradient
    comes from the rare ones still wrong (easy-VQA's negated-colour "no" answers, 3.6 % of training questions).
    gamma = 0 is plain cross-entropy.
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


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    tx,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    skip_nonfinite=False,
):
    """One (micro-)step: forward, backward, optimiser update. Returns (new state, {loss, accuracy, grad_norm,
    skipped}). ``skip_nonfinite`` (train.nan_policy="skip"): a NaN / Inf loss or gradient leaves params and
    optimiser state unchanged (the step counter still advances, so the data moves on) and sets skipped = 1."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout_rng})["logits"]
        loss = cross_entropy(logits, batch["label"], batch["valid"], label_smoothing, focal_gamma)
        return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    valid = batch["valid"].astype(jnp.float32)
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params, opt_state = jax.tree.map(keep, params, state.params), jax.tree.map(keep, opt_state, state.opt_state)
    skipped = jnp.logical_not(finite).astype(jnp.int32) if skip_nonfinite else jnp.zeros((), jnp.int32)
    metrics = {"loss": loss, "accuracy": acc, "grad_norm": grad_norm, "skipped": skipped}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def predict_step(params, batch: dict, *, model, top_k: int = 5) -> dict:
    """Eval forward pass. Returns per-example {pred [B], loss [B], top_ids [B, k], top_probs [B, k]}."""
    logits = model.apply({"params": params}, batch, train=False)["logits"].astype(jnp.float32)
    k = min(top_k, logits.shape[-1])
    top_probs, top_ids = jax.lax.top_k(jax.nn.softmax(logits), k)
    # Label -1 (a validation / test label never seen in training): counted wrong, left out of the loss.
    label = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0))
    loss = jnp.where(label >= 0, loss, jnp.nan)
    return {"pred": jnp.argmax(logits, -1), "loss": loss, "top_ids": top_ids, "top_probs": top_probs}


def make_predict_fn(model, mesh, params_shardings):
    """jit(predict_step) with replicated outputs (every process sees every prediction)."""
    fn = jax.jit(
        lambda p, b: predict_step(p, b, model=model),
        in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    return fn


def evaluate(predict_fn, params, batches: Iterable[dict], meta: Mapping[str, Any], mesh) -> tuple[dict, dict]:
    """Runs ``predict_fn`` over eval batches.

    Returns:
      (summary {"accuracy", "loss", "num_examples", "per_type"}, per-example numpy arrays {"index", "label",
      "question_type", "pred", "top_ids", "top_probs"} over the valid rows, in record order). per_type holds the
      accuracy of each question type and, for datasets with question families (Sort-of-CLEVR), of each family.
    """
    keep = ("index", "label", "question_type", "family", "valid")
    rows: dict[str, list] = {k: [] for k in (*keep, "pred", "loss", "top_ids", "top_probs")}
    with jax.set_mesh(mesh), sharding.activation_rules():
        for batch in batches:
            out = predict_fn(params, batch)
            host = {k: np.asarray(_fully_replicated(batch[k], mesh)) for k in keep if k in batch}
            for k, v in {**host, **jax.device_get(out)}.items():
                rows[k].append(np.asarray(v))
    cat = {k: np.concatenate(v) for k, v in rows.items() if v}
    valid = cat.pop("valid").astype(bool)
    cat = {k: v[valid] for k, v in cat.items()}
    summary = {
        "accuracy": metrics_lib.accuracy(cat["pred"], cat["label"]),
        "loss": float(np.nanmean(cat["loss"])) if np.isfinite(cat["loss"]).any() else float("nan"),
        "num_examples": int(valid.sum()),
        "per_type": metrics_lib.per_type_accuracy(cat["pred"], cat["label"], cat["question_type"], meta["type_names"]),
    }
    if "family" in cat and "family_names" in meta:
        families = metrics_lib.per_type_accuracy(cat["pred"], cat["label"], cat["family"], meta["family_names"])
        summary["per_type"].update(families)
    return summary, cat


def _fully_replicated(x: jax.Array, mesh) -> jax.Array:
    """A batch array gathered onto every device (so every process can read it)."""
    if x.is_fully_addressable:
        return x
    return jax.jit(lambda a: a, out_shardings=sharding.replicated(mesh))(x)


# ----------------------------------------------------------------------------------------------- loop helpers


class _Preemption:
    """SIGTERM sets a flag; the loop checks it between steps (multi-process: Orbax/jax's preemption sync)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def write_config(config, workdir: str) -> None:
    """``workdir/config.json`` (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


NAN_POLICIES = ("stop", "skip")


def _nan_policy(config) -> str:
    """``train.nan_policy``, validated. Configs without the field (written before it existed) mean "stop"."""
    policy = config.train.nan_policy if "nan_policy" in config.train else "stop"
    if policy not in NAN_POLICIES:
        raise ValueError(f"train.nan_policy {policy!r} is not one of {sorted(NAN_POLICIES)}")
    return policy


def _window_scalar(key: str, window: list[dict]) -> float:
    """Log value of a metric over the steps since the last log: skipped updates are summed; the others are
    averaged over the steps that were not skipped (NaN when all were)."""
    if key == "skipped":
        return float(np.sum([w[key] for w in window]))
    kept = [w[key] for w in window if not w.get("skipped", 0)]
    return float(np.mean(kept)) if kept else float("nan")


def _check_finite(step: int, m: Mapping[str, Any], ckpt: ckpt_lib.Checkpointer) -> None:
    if int(m.get("skipped", 0)):
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


# ----------------------------------------------------------------------------------------------- main entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config`` in ``workdir``, resuming from its newest complete checkpoint.

    Writes workdir/config.json, workdir/checkpoints/, TensorBoard events and workdir/metrics.jsonl.

    Args:
      config: a locked experiment config (configs/*.py).
      workdir: output folder.

    Returns:
      {"step", "best_step", "best_val_accuracy", "val": last validation summary, "preempted", "early_stopped",
      "stopped_for_run_limit", "wall_seconds"} (also written to workdir/train_summary.json).

    Raises:
      NonFiniteLossError: a NaN / Inf loss or gradient; the newest checkpoint stays the last good one.
    """
    if "task" in config and config.task != "vqa":  # retrieval / captioning have their own loop (vtfusion_jax/tasks)
        from vtfusion_jax import tasks

        return tasks.train_and_evaluate(config, workdir)
    started = time.time()
    nan_policy = _nan_policy(config)
    maybe_initialize_distributed()
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        preflight.check_writable(workdir)  # before any slow work
    t, d = config.train, config.dataset
    mesh = sharding.make_mesh(config.mesh_shape)
    meta = get_meta(config)
    tokenizer = make_tokenizer(config)
    model = build_model(config, meta["num_classes"], tokenizer.vocab_size)
    total = num_train_steps(config, meta)
    accum = int(config.optim.accum_steps)
    tx, sched = optim.make_optimizer(config.optim, total // accum, optim.frozen_towers(config.model))
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, best_metric="accuracy", best_mode="max"
    )
    abstract, _ = state_layout(config, model, tx, meta, mesh)  # shapes only: the checks cost no compilation
    try:
        if ckpt.latest_step() is not None:  # refuse another model's checkpoint before restoring it
            step = ckpt.latest_step()
            preflight.check_compatible(
                workdir, step, ckpt.state_metadata(step), abstract, config.to_json_best_effort(sort_keys=True)
            )
        if is_main:
            preflight.check_free_disk(ckpt.directory, abstract)
    except preflight.WorkdirError:
        ckpt.close()
        raise
    state, state_sh = create_train_state(config, model, tx, meta, mesh)
    data_state, best = None, (-math.inf, None)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(ckpt.latest_step(), abstract_state(state_sh, state))
        best_step = ckpt.best_step()
        best_metrics = ckpt.metrics(best_step) if best_step is not None else None
        if best_metrics:
            best = (float(best_metrics["accuracy"]), best_step)
        log.info("Resumed from step %d in %s", int(state.step), ckpt.directory)
    else:  # a fresh run: towers with model.<tower>.init_from start from their pretrained checkpoint
        size = image_size(config, meta)
        state = pretrained_init.import_into_state(state, state_sh, model.model_config, size, config.seed)
    start = int(state.step)
    write_config(config, workdir)
    writer = metrics_lib.create_writer(workdir, is_main=is_main)
    if start == 0:
        writer.write_hparams({k: str(v) for k, v in config.items()})

    common = dict(
        dataset=d.name,
        global_batch_size=t.global_batch_size,
        mesh=mesh,
        tokenizer=tokenizer,
        image_size=d.image_size,
        data_dir=d.data_dir,
        builder_kwargs=d.builder_kwargs.to_dict(),
        **pretrained_init.image_normalization(model.model_config),  # a pretrained image tower's mean / std
    )
    train_iter = pipeline.make_train_iterator(
        split=d.train_split,
        seed=config.seed,
        augment=d.augment,
        start_step=start,
        prefetch=t.prefetch,
        worker_count=t.data_workers,
        images_per_batch=_images_per_batch(config),
        **common,
    )
    if data_state:
        train_iter.set_state(data_state)
    eval_batches = pipeline.make_eval_iterator(split=d.val_split, **dict(common, global_batch_size=t.eval_batch_size))

    step_fn = jax.jit(
        lambda s, b: train_step(
            s,
            b,
            model=model,
            tx=tx,
            label_smoothing=t.label_smoothing,
            focal_gamma=t.focal_gamma,
            skip_nonfinite=nan_policy == "skip",
        ),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    predict_fn = make_predict_fn(model, mesh, state_sh.params)

    def validate(step: int) -> dict:
        summary, _ = evaluate(predict_fn, state.params, eval_batches, meta, mesh)
        scalars = {"val/accuracy": summary["accuracy"], "val/loss": summary["loss"]}
        scalars.update({f"val/accuracy_{k}": v for k, v in summary["per_type"].items()})
        writer.write_scalars(step, scalars)
        log.info("step %d: validation accuracy %.4f (%d examples)", step, summary["accuracy"], summary["num_examples"])
        return summary

    def save(step: int, val: dict | None) -> None:
        metrics = {"accuracy": val["accuracy"], "loss": val["loss"]} if val else None
        ckpt.save(step, state, train_iter.get_state(), metrics)

    result = {"preempted": False, "early_stopped": False, "stopped_for_run_limit": False, "val": None}
    pending: tuple[int, Any] | None = None  # (step, device metrics) not yet checked
    window: list[dict] = []
    bad_evals = skipped_steps = 0
    last_log_time, last_log_step = time.time(), start
    try:
        with (
            _Preemption() as preempt,
            jax.set_mesh(mesh),
            sharding.activation_rules(),
            _progress(total, start, t.progress_bar and is_main) as bar,
        ):
            step = start
            while step < total:
                batch = next(train_iter)
                state, m = step_fn(state, batch)
                step += 1
                if pending is not None:  # the previous step's metrics: one step of lag keeps dispatch async
                    window.append(jax.device_get(pending[1]))
                    _check_finite(pending[0], window[-1], ckpt)
                pending = (step, m)
                is_last = step == total
                do_eval = t.eval_every_steps >= 0 and (
                    is_last or (t.eval_every_steps > 0 and step % t.eval_every_steps == 0)
                )
                do_save = do_eval or is_last or step % t.checkpoint_every_steps == 0
                stop = preempt.reached(step)
                if do_eval or do_save or stop or step % t.log_every_steps == 0:
                    window.append(jax.device_get(pending[1]))
                    _check_finite(step, window[-1], ckpt)
                    pending = None
                if step % t.log_every_steps == 0 or is_last:
                    now = time.time()
                    sps = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    scalars = {f"train/{k}": _window_scalar(k, window) for k in window[0]}
                    skipped_steps += int(scalars["train/skipped"])
                    scalars.update(
                        {
                            "train/lr": optim.current_lr(sched, step - 1, accum),
                            "train/steps_per_sec": sps,
                            "train/examples_per_sec": sps * t.global_batch_size,
                        }
                    )
                    writer.write_scalars(step, scalars)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{scalars['train/loss']:.4f}",
                            steps_s=f"{sps:.2f}",
                            ex_s=f"{sps * t.global_batch_size:.0f}",
                            refresh=False,
                        )
                    window, last_log_time, last_log_step = [], now, step
                val = None
                if do_eval:
                    val = result["val"] = validate(step)
                    if val["accuracy"] > best[0]:
                        best, bad_evals = (val["accuracy"], step), 0
                    else:
                        bad_evals += 1
                if do_save or stop:
                    save(step, val)
                if bar is not None:
                    bar.update(1)
                if stop:
                    log.warning("Preempted (SIGTERM): saved a checkpoint at step %d; exiting.", step)
                    result["preempted"] = True
                    break
                if t.steps_per_run > 0 and step - start >= t.steps_per_run and step < total:
                    log.warning(
                        "Stopping after %d steps in this run (train.steps_per_run); saved step %d.",
                        t.steps_per_run,
                        step,
                    )
                    result["stopped_for_run_limit"] = True
                    save(step, val)
                    break
                if t.early_stopping_patience > 0 and bad_evals >= t.early_stopping_patience:
                    log.warning(
                        "Early stopping at step %d: no better validation accuracy for %d evaluations "
                        "(best %.4f at step %s).",
                        step,
                        bad_evals,
                        best[0],
                        best[1],
                    )
                    result["early_stopped"] = True
                    save(step, val)
                    break
    finally:
        train_iter.close()
        writer.close()
        ckpt.close()
    result.update(
        skipped_steps=skipped_steps,
        step=int(step),
        best_step=best[1],
        best_val_accuracy=best[0],
        wall_seconds=time.time() - started,
    )
    if is_main:
        with open(os.path.join(workdir, "train_summary.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)
    return result
