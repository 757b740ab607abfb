"""The Task interface: what differs between VQA, retrieval and captioning; train_lib runs every task the same way.

A task owns its model, a one-example init batch, ``loss(params, batch, rng) -> (loss, aux)``, its train iterator
(data/pipeline.py: deterministic in (seed, step), exact resume, this process's rows, prefetched global arrays),
``evaluate(params, split, out_dir)`` and its prediction entry points. ``main_metric`` (higher is better) picks the
best checkpoint and drives early stopping.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vtfusion_jax import pretrained_init, sharding
from vtfusion_jax.data import pipeline


class Task(abc.ABC):
    """Base of the tasks in tasks/__init__.py's TASKS.

    Args:
      config: the experiment config.
      mesh: device mesh (default: ``config.mesh_shape``).
      workdir: an existing run's folder when evaluating / predicting (its saved assets are loaded), None while
        training.
    """

    main_metric = ""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, workdir=None):
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh_shape)
        self.workdir = workdir
        self.image_norm = pretrained_init.image_normalization(config.model.to_dict())  # {image_mean, image_std}
        self._eval_cache: dict = {}

    @abc.abstractmethod
    def build_model(self, sow_weights: bool = False) -> nn.Module:
        """The task's model (``sow_weights``: a copy recording attention maps; same params)."""

    @abc.abstractmethod
    def init_batch(self) -> dict:
        """A one-example batch of zeros with the model's input shapes (parameter shapes do not depend on B)."""

    @abc.abstractmethod
    def loss(self, params, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, dict of scalar metrics) of a training batch; ``rng`` is this step's dropout key."""

    @abc.abstractmethod
    def evaluate(self, params, split: str, out_dir: str | None = None) -> dict:
        """Metrics of ``params`` on ``split`` (with ``main_metric``); ``out_dir``: also write the task's files
        (predictions, figures) there."""

    def num_train_steps(self) -> int:
        """Micro-steps to train (``train.num_steps``; VQA can count epochs instead)."""
        return int(self.config.train.num_steps)

    def save_assets(self, workdir: str) -> None:  # noqa: B027  (optional hook: most tasks have no assets)
        """Files a restored model needs besides the checkpoint (the caption tasks' word vocabulary)."""

    @property
    def image_size(self) -> int:
        """Side of the images fed to the model."""
        return int(self.init_batch()["image"].shape[1])

    def data_kwargs(self, split: str) -> dict:
        """The pipeline iterators' arguments for ``split`` (``self.tokenizer``: a Tokenizer or a WordVocab); tasks
        add their own (the image-group plan, the captions)."""
        d = self.config.dataset
        kw = dict(dataset=d.name, split=split, mesh=self.mesh, tokenizer=self.tokenizer, image_size=d.image_size)
        return dict(kw, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict(), **self.image_norm)

    def train_iter(self, start_step: int) -> Iterator[dict]:
        """Global training batches from ``start_step`` (get_state / set_state / close: pipeline.TrainIterator)."""
        t, d = self.config.train, self.config.dataset
        return pipeline.make_train_iterator(
            global_batch_size=t.global_batch_size, seed=self.config.seed, augment=d.augment, start_step=start_step,
            prefetch=t.prefetch, worker_count=t.data_workers, images_per_batch=t.images_per_batch,
            **self.data_kwargs(d.train_split),
        )  # fmt: skip

    def eval_batches(self, split: str):
        """Every example of ``split`` once, in order, the last batch padded (pipeline.make_eval_iterator)."""
        return pipeline.make_eval_iterator(
            global_batch_size=self.config.train.eval_batch_size, **self.data_kwargs(split)
        )

    def normalize(self, images_uint8: np.ndarray) -> jax.Array:
        """Host uint8 images [B, H, W, 3] -> the model's float32 input, normalised on device like the pipeline's."""
        return pipeline.normalize_images(jnp.asarray(images_uint8), **self.image_norm)

    def put(self, x) -> jax.Array:
        """A host array on the mesh: split over the batch axes when its rows divide evenly, else replicated."""
        x = np.asarray(x)
        n = sharding.mesh_axis_size(self.mesh, sharding.BATCH_AXES)
        split = x.ndim and x.shape[0] % n == 0
        return jax.device_put(x, sharding.batch_sharding(self.mesh) if split else sharding.replicated(self.mesh))

    @staticmethod
    def map_batches(fn: Callable, x: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
        """fn over chunks of ``batch`` rows (the last padded, so one shape compiles); outputs concatenated."""
        outs = []
        for s in range(0, len(x), batch):
            chunk = x[s : s + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, axis=0)])
            out = jax.device_get(fn(chunk))
            out = out if isinstance(out, tuple) else (out,)
            outs.append([np.asarray(o)[:n] for o in out])
        return tuple(np.concatenate([o[j] for o in outs]) for j in range(len(outs[0])))
