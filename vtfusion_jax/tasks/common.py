"""What the retrieval and captioning tasks share: config, mesh, vocabulary, data, model and batching."""

from __future__ import annotations

import abc
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vtfusion_jax import pretrained_init, sharding
from vtfusion_jax.tasks import data as data_lib


class TaskBase(abc.ABC):
    """Subclasses set ``main_metric`` and define build_model, init_batch_extra, host_batch, loss and evaluate.

    Args:
      config: the experiment config.
      workdir: None while training (the vocabulary is built from the training captions); an existing run's folder
        for evaluation / prediction (its vocab.json is loaded).
    """

    main_metric = ""

    def __init__(self, config, workdir: str | None = None, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh_shape)
        norm = pretrained_init.image_normalization(config.model.to_dict())
        self.norm = (norm["image_mean"], norm["image_std"])
        self._train = None
        vocab_path = os.path.join(workdir, "vocab.json") if workdir else None
        if vocab_path and os.path.exists(vocab_path):
            self.vocab = data_lib.WordVocab.load(vocab_path)
        else:
            self.vocab = data_lib.WordVocab.build([c for cs in self.train_split["captions"] for c in cs])
        self.model = self.build_model()
        size = data_lib.image_size(config)  # the stored images are used as they are (tasks/data.py does not resize)
        if self.config.dataset.image_size not in (None, size):
            raise ValueError(
                f"caption tasks use the {size} px images as they are (a manifest's size is "
                f"builder_kwargs.image_size); got dataset.image_size {config.dataset.image_size}"
            )
        self.init_batch = {"image": jnp.zeros((1, size, size, 3), jnp.float32), **self.init_batch_extra()}
        self._val = None

    # data -------------------------------------------------------------------------------------------------
    @property
    def train_split(self) -> dict:
        if self._train is None:
            self._train = data_lib.load_split(self.config, self.config.dataset.train_split)
        return self._train

    @property
    def train_data(self) -> dict:
        """Training pairs: {"image" uint8 [N, ...], "text_image" [T], "text_ids" [T, L]} (token ids cached)."""
        d = self.train_split
        if "text_ids" not in d:
            d["text_image"], texts = data_lib.pairs(d["captions"])
            d["text_ids"] = np.stack([self.vocab.encode(t, self.config.dataset.max_len) for t in texts])
        return d

    def batch(self, step: int) -> dict:
        """Global sharded batch of training step ``step``."""
        return data_lib.to_global(self.host_batch(step), self.mesh)

    def validate(self, params) -> dict:
        if self._val is None:
            self._val = data_lib.load_split(self.config, self.config.dataset.val_split)
        return self.evaluate(params, self._val)

    def save_assets(self, workdir: str) -> None:
        if jax.process_index() == 0:
            self.vocab.save(os.path.join(workdir, "vocab.json"))

    # helpers ----------------------------------------------------------------------------------------------
    def put(self, x) -> jax.Array:
        """A host array on the mesh (evaluation inputs): split over the batch axes when its rows divide evenly
        (eval_batch_size a multiple of the data-parallel size), else replicated."""
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

    # to define --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self):
        """Defined by each task (tasks/retrieval.py, tasks/caption.py)."""

    @abc.abstractmethod
    def init_batch_extra(self) -> dict:
        """Defined by each task (tasks/retrieval.py, tasks/caption.py)."""

    @abc.abstractmethod
    def host_batch(self, step: int) -> dict:
        """Defined by each task (tasks/retrieval.py, tasks/caption.py)."""

    @abc.abstractmethod
    def loss(self, params, batch, rng):
        """Defined by each task (tasks/retrieval.py, tasks/caption.py)."""

    @abc.abstractmethod
    def evaluate(self, params, split_data: dict) -> dict:
        """Defined by each task (tasks/retrieval.py, tasks/caption.py)."""
