"""The blocks every experiment config shares; each field is described once, here.

An experiment config (configs/<name>.py) loads this file with ``config_lib.sibling(__file__, "common")`` and
overrides only what differs, e.g. ``c.train = common.train(global_batch_size=64, num_steps=1300)``. An override of
a field that does not exist raises (the blocks are locked ConfigDicts).
"""

import ml_collections


def _block(fields: dict, overrides: dict) -> ml_collections.ConfigDict:
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise KeyError(f"unknown field(s) {unknown}; valid: {sorted(fields)}")
    block = ml_collections.ConfigDict({**fields, **overrides})
    block.lock()
    return block


def fusion_name(name: str) -> str:
    """``name`` if it is a registered fusion variant a ':fusion=' argument may pick (not the probe); else a
    ValueError listing them."""
    from vtfusion_jax import models

    valid = tuple(n for n, info in models.FUSIONS.items() if issubclass(info.cls, models.FusionBase))
    if name not in valid:
        raise ValueError(f"unknown fusion {name!r}; valid: {valid}")
    return name


def optim(**overrides) -> ml_collections.ConfigDict:
    """AdamW + learning-rate schedule (vtfusion_jax/optim.py)."""
    return _block(
        dict(
            lr=2e-3,  # peak learning rate
            warmup_steps=50,  # linear warmup (optimiser updates)
            schedule="cosine",  # decay after warmup: cosine | linear | constant
            end_lr_factor=0.01,  # final lr = lr * end_lr_factor
            b1=0.9,  # Adam beta1
            b2=0.999,  # Adam beta2
            eps=1e-8,  # Adam epsilon
            weight_decay=0.01,  # decoupled weight decay (never on biases / norm parameters)
            grad_clip_norm=1.0,  # global-norm clipping (0 = off)
            accum_steps=1,  # micro-batches per update (optax.MultiSteps); effective batch = global * accum
            ema_decay=0.0,  # > 0: evaluate / predict / export an exponential moving average of the parameters
            lr_multipliers=ml_collections.ConfigDict(  # per-tower learning-rate scale
                dict(image_encoder=1.0, text_encoder=1.0, fusion=1.0, head=1.0)
            ),
        ),
        overrides,
    )


def train(**overrides) -> ml_collections.ConfigDict:
    """The loop, logging and checkpointing (vtfusion_jax/train_lib.py)."""
    return _block(
        dict(
            global_batch_size=256,  # examples per micro-step (divisible by the batch mesh axes)
            images_per_batch=0,  # VQA: > 0 = image-grouped batches (data/grouped.py), each image encoded once
            num_epochs=1.0,  # VQA: epochs of the train split, used when num_steps <= 0
            num_steps=-1,  # training length in micro-steps; <= 0: from num_epochs
            label_smoothing=0.0,  # cross-entropy label smoothing (VQA answers, caption tokens)
            focal_gamma=0.0,  # VQA focal loss: (1 - p)^gamma down-weights examples already right (0 = plain CE)
            nan_policy="stop",  # non-finite loss: "stop" (names the step) | "skip" the update (train/skipped)
            log_every_steps=20,  # train metrics to TensorBoard / metrics.jsonl
            eval_every_steps=300,  # validation + checkpoint cadence; 0 = only at the end, -1 = never
            checkpoint_every_steps=300,  # periodic checkpoints (asynchronous)
            keep_checkpoints=2,  # newest checkpoints kept (plus the best by the task's validation metric)
            steps_per_run=0,  # stop with a checkpoint after this many steps in one process (0 = no limit)
            time_limit_seconds=0,  # > 0: validate, save and stop after this much wall time (0 = no limit)
            early_stopping_patience=0,  # stop after this many evaluations without improvement (0 = off)
            eval_batch_size=256,  # validation / test batch size
            eval_images_per_batch=0,  # VQA: > 0 = image-grouped validation / test batches, each image encoded once
            prefetch=2,  # batches prepared ahead on a background thread
            data_workers=0,  # grain worker processes (0 = threads)
            progress_bar=True,  # tqdm bar with loss and steps/s
            compilation_cache_dir="",  # jax's persistent compilation cache: reruns load compiled programs ("" = off)
            profile_steps=(0, 0),  # (first, last) step traced by jax.profiler into workdir/profile ((0, 0) = off)
        ),
        overrides,
    )


def evaluation(**overrides) -> ml_collections.ConfigDict:
    """eval.py's defaults (task-specific fields are added by the task's configs)."""
    return _block(
        dict(
            split="test",  # default split of eval.py
            checkpoint="best",  # best | latest | a step number
            num_attention_maps=8,  # VQA: attention-map PNGs written by eval.py
        ),
        overrides,
    )


def accelerator(c: ml_collections.ConfigDict, on: bool = True) -> ml_collections.ConfigDict:
    """The ``accel=1`` ':' argument of every experiment config (docs/accelerators.md): ``c`` with bfloat16 compute
    and the fused attention kernels chosen per backend. Batch size and mesh stay the experiment's: set them per
    machine on the command line."""
    if on:
        c.model.dtype = "bfloat16"  # activations; params, optimiser state, softmax, LayerNorm and losses stay float32
        c.model.attention_impl = "auto"  # GPU: cuDNN fused attention, TPU: Pallas splash kernel, else xla
    return c
