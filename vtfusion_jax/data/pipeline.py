"""Input pipeline: TFDS array_record source -> grain -> deterministic batches -> global sharded jax.Arrays.

Determinism and resume contract (training):
  * Training is an infinite stream of global batches. Global example position `p = step * B + row` lives in epoch
    `p // N` at offset `p % N`; its record is `perm_{seed, epoch}[p % N]`, a bijective shuffle (grain's
    `index_shuffle`) seeded by (seed, epoch). So the batch at step s is a pure function of (seed, s, B, dataset):
    resuming at step k yields exactly the batches an uninterrupted run yields from step k, whatever the number of
    processes, and the iterator state is just `{"step": k, ...}` (saved with the checkpoint).
  * Random crops (when `augment=True`) draw from a generator seeded by (seed, step) for the whole global batch, so
    they also do not depend on the process count. There are no flips (they would change Sort-of-CLEVR answers).
  * Each process reads and decodes only the rows of the global batch that its devices hold; the rows are derived
    from the batch sharding (`process_slice` for the usual contiguous layout) and assembled with
    `jax.make_array_from_process_local_data`.
Eval visits every example exactly once in record order; the last batch is padded and `valid` is False on padding.
Images travel to the devices as uint8 and are normalised there ((x / 255 - mean) / std, float32).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from vtfusion_jax import sharding
from vtfusion_jax.data.captions import CaptionIndex, CaptionReader
from vtfusion_jax.data.datasets import dataset_meta, get_data_source  # noqa: F401  (public API)
from vtfusion_jax.data.reader import BatchReader, group_plan, train_indices  # noqa: F401  (public API)

_HORIZON = 2**40  # training steps are unbounded in practice
# Reader fields a saved iterator state records: resuming with other values is refused.
_STATE_KEYS = ("seed", "global_batch_size", "dataset", "split", "num_examples", "images_per_batch")


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows ``slice(i * B / P, (i + 1) * B / P)`` of the global batch of B (divisible by P) rows that process
    i = ``process_index`` of P = ``process_count`` reads in the usual contiguous layout."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    n = global_batch_size // process_count
    return slice(process_index * n, (process_index + 1) * n)


def local_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """The contiguous rows (a slice) of the global batch of B rows that this process's devices hold under the batch
    sharding `sharding` (sharding.batch_sharding): the rows this process must read."""
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values()]
    spans = {(s.start or 0, global_batch_size if s.stop is None else s.stop) for s in rows}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(global_batch_size, bool)
    for a, b in spans:
        covered[a:b] = True
    if not covered[start:stop].all():
        raise ValueError(f"this process's batch rows are not contiguous: {sorted(spans)}")
    return slice(start, stop)


def normalize_images(images: jax.Array, image_mean: Sequence[float], image_std: Sequence[float]) -> jax.Array:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std: the one image normalisation (run on device)."""
    std = np.asarray(image_std, np.float32)
    return images.astype(jnp.float32) * (1.0 / (255.0 * std)) - np.asarray(image_mean, np.float32) / std


class _ToGlobal:
    """Host batch (this process's rows, uint8 images) -> global sharded arrays, images normalised on device."""

    def __init__(self, sharding, global_batch_size: int, image_mean, image_std, images_per_batch: int = 0):
        self._sharding, self._size = sharding, global_batch_size
        # Image-grouped batches (data/grouped.py) carry K images for B questions.
        self._sizes = {"image": images_per_batch} if images_per_batch > 0 else {}
        self._normalize = jax.jit(lambda x: normalize_images(x, image_mean, image_std), out_shardings=sharding)

    def __call__(self, batch: dict) -> dict:
        shape = lambda k, v: (self._sizes.get(k, self._size), *v.shape[1:])  # noqa: E731
        out = {k: jax.make_array_from_process_local_data(self._sharding, v, shape(k, v)) for k, v in batch.items()}
        if out["image"].dtype == jnp.uint8:
            out["image"] = self._normalize(out["image"])  # [B, H, W, 3] float32
        return out


class _Prefetcher:
    """Background thread: pulls host batches, shards them onto devices, keeps up to `size` ready."""

    _END = object()

    def __init__(self, host_iter: Iterator[dict], convert: Callable[[dict], dict], size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._host_iter = host_iter
        self._thread = threading.Thread(target=self._run, args=(convert,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, convert):
        try:
            for batch in self._host_iter:
                if not self._put(convert(batch)):
                    return
            self._put(self._END)
        except BaseException as e:  # surfaced in the consumer thread
            self._put(e)

    def get(self) -> dict:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=30)
        close = getattr(self._host_iter, "close", None)
        if close is not None and not self._thread.is_alive():  # never close an iterator another thread runs
            close()


class TrainIterator:
    """Infinite iterator of global training batches; `.step` is the step of the next batch.

    `get_state()` returns a JSON-able dict to save with the checkpoint; `set_state(state)` resumes exactly there.
    """

    def __init__(
        self,
        reader: BatchReader,
        to_global: Callable[[dict], dict],
        *,
        start_step: int,
        prefetch: int,
        worker_count: int,
        num_threads: int,
    ):
        self.reader, self._to_global = reader, to_global
        self._prefetch, self._worker_count, self._num_threads = prefetch, worker_count, num_threads
        self._prefetcher: _Prefetcher | None = None
        self.step = int(start_step)
        self._start()

    def _start(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
        ds = grain.MapDataset.range(self.step, self.step + _HORIZON).map(self.reader.train_batch)
        options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=max(self._prefetch, 1))
        it = ds.to_iter_dataset(options)
        if self._worker_count > 0:
            from absl import flags  # grain's worker processes read absl flags; allow non-absl programs

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        # The thread holds only to_global (not `self`), so dropping the iterator lets __del__ stop it.
        self._prefetcher = _Prefetcher(iter(it), self._to_global, self._prefetch)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        batch = self._prefetcher.get()
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """Returns {"step", "seed", "global_batch_size", "dataset", "split", "num_examples", "images_per_batch"}."""
        return {"step": self.step, **{k: getattr(self.reader, k) for k in _STATE_KEYS}}

    def set_state(self, state: dict) -> None:
        """Resumes at `state["step"]` (a dict from `get_state()`); refuses one saved for another seed, batch size or
        dataset."""
        mine = self.get_state()
        for key in _STATE_KEYS:
            if key in state and state[key] != mine[key]:
                raise ValueError(f"iterator state has {key}={state[key]!r} but this iterator has {mine[key]!r}")
        self.step = int(state["step"])
        self._start()

    def close(self) -> None:
        """Stops the background threads (and worker processes)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class EvalIterable:
    """Re-iterable eval batches: every example exactly once, fixed order, last batch padded (`valid` False)."""

    def __init__(self, reader: BatchReader, to_global: Callable[[dict], dict], prefetch: int = 2):
        self.reader, self._to_global, self._prefetch = reader, to_global, prefetch

    def __len__(self) -> int:
        return self.reader.num_eval_batches()

    @property
    def num_examples(self) -> int:
        return self.reader.num_examples

    def __iter__(self) -> Iterator[dict]:
        host = (self.reader.eval_batch(i) for i in range(len(self)))
        prefetcher = _Prefetcher(host, self._to_global, self._prefetch)
        try:
            yield from iter(prefetcher.get, None)  # get() never returns None: its StopIteration ends the loop
        finally:
            prefetcher.close()


def _reader_for(mesh, global_batch_size, image_mean, image_std, images_per_batch=0, captions=False, **kwargs):
    batch, axes = sharding.batch_sharding(mesh), sharding.BATCH_AXES
    shards = sharding.mesh_axis_size(mesh, axes)
    for what, size in (("global_batch_size", global_batch_size), ("images_per_batch", images_per_batch)):
        if size % shards:
            raise ValueError(f"{what} {size} is not divisible by the {shards} batch shards of mesh axes {axes}")
    image_rows = local_rows(batch, images_per_batch) if images_per_batch > 0 else None
    make = BatchReader
    if captions:  # True or the split's CaptionIndex
        make = functools.partial(CaptionReader, index=captions if isinstance(captions, CaptionIndex) else None)
    kw = dict(rows=local_rows(batch, global_batch_size), images_per_batch=images_per_batch, image_rows=image_rows)
    reader = make(global_batch_size=global_batch_size, **kw, **kwargs)
    return reader, _ToGlobal(batch, global_batch_size, image_mean, image_std, images_per_batch)


def make_train_iterator(
    *,
    mesh: jax.sharding.Mesh,
    global_batch_size: int,
    start_step: int = 0,
    prefetch: int = 2,
    worker_count: int = 0,
    num_threads: int = 2,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    captions: CaptionIndex | bool = False,
    **reader_kwargs,
) -> TrainIterator:
    """Infinite, deterministic, resumable training batches as global jax.Arrays (see the module docstring).

    Args:
      mesh: device mesh; dim 0 of every array is sharded over its batch axes (sharding.batch_sharding).
      global_batch_size: B over all processes; divisible by the product of the batch mesh axes.
      start_step: step of the first batch (resume).
      prefetch: batches kept ready on device by the background thread (and in grain's buffer).
      worker_count: grain worker processes (0 = threads in this process).
      num_threads: grain threads each building whole batches in parallel.
      image_mean, image_std: per-channel mean and std of images in [0, 1] (normalisation on device).
      captions: (image, caption) pair batches of data/captions.py instead of questions: True, or the split's
        CaptionIndex if already built; the tokenizer is then a captions.WordVocab.
      **reader_kwargs: the reader's (reader.BatchReader / captions.CaptionReader): dataset, split, seed, tokenizer,
        image_size, augment, data_dir, builder_kwargs, images_per_batch (K > 0: image-grouped batches, "image" is
        [K,H,W,3] and "image_index" i32 [B] points each question at its image), plan.

    Returns:
      A TrainIterator yielding {"image": f32 [B,H,W,3], "text_ids": i32 [B,L], "text_mask": bool [B,L],
      "label": i32 [B], "question_type": i32 [B], "valid": bool [B], + dataset extras}.
    """
    reader, to_global = _reader_for(mesh, global_batch_size, image_mean, image_std, captions=captions, **reader_kwargs)
    return TrainIterator(
        reader, to_global, start_step=start_step, prefetch=prefetch, worker_count=worker_count, num_threads=num_threads
    )


def make_eval_iterator(
    *,
    mesh: jax.sharding.Mesh,
    global_batch_size: int,
    prefetch: int = 2,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    captions: CaptionIndex | bool = False,
    **reader_kwargs,
) -> EvalIterable:
    """Eval batches: each example exactly once, in record order; the last batch is padded.

    Arguments as in `make_train_iterator` (no shuffling); with `captions` eval batches hold each image of the split
    once ({"image", "index", "valid"}; the captions are in the CaptionIndex). Returns a re-iterable of len
    ceil(N / B) batches like the training ones, with "valid" bool [B] False on padding and "index" int32 [B] (record
    index within the split, -1 on padding). Mask metrics with "valid".
    """
    reader, to_global = _reader_for(mesh, global_batch_size, image_mean, image_std, captions=captions, **reader_kwargs)
    return EvalIterable(reader, to_global, prefetch=prefetch)
