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
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from vtfusion_jax.data import datasets
from vtfusion_jax.data.datasets import dataset_meta, get_data_source  # noqa: F401  (public API)
from vtfusion_jax.data.tokenizer import Tokenizer

_HORIZON = 2**40  # training steps are unbounded in practice
_SEED_SALT = 0x5EED


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of the global batch that process `process_index` reads in the usual contiguous layout.

    Args:
      global_batch_size: B, divisible by process_count.
      process_index: this process, in [0, process_count).
      process_count: number of processes.

    Returns:
      slice(process_index * B / P, (process_index + 1) * B / P).
    """
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    n = global_batch_size // process_count
    return slice(process_index * n, (process_index + 1) * n)


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes: Sequence[str]) -> jax.sharding.NamedSharding:
    """Sharding of a batch array: dim 0 over the mesh's `batch_axes` (those it has), the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


def local_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """Contiguous rows of the global batch held by this process's devices under `sharding`.

    Args:
      sharding: batch sharding (see `batch_sharding`).
      global_batch_size: B.

    Returns:
      The slice of rows this process must read.
    """
    spans = set()
    for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        s = idx[0]
        spans.add((s.start or 0, global_batch_size if s.stop is None else s.stop))
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(global_batch_size, bool)
    for a, b in spans:
        covered[a:b] = True
    if not covered[start:stop].all():
        raise ValueError(f"this process's batch rows are not contiguous: {sorted(spans)}")
    return slice(start, stop)


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence is a fixed, version-stable hash; index_shuffle wants a 32-bit seed.
    return int(np.random.SeedSequence([_SEED_SALT, seed, epoch]).generate_state(1)[0])


def train_indices(seed: int, step: int, global_batch_size: int, num_examples: int) -> np.ndarray:
    """Record indices of the global training batch at `step` (epoch-wise permutations seeded by (seed, epoch)).

    Args:
      seed: data seed.
      step: training step.
      global_batch_size: B.
      num_examples: N, size of the split.

    Returns:
      int64 [B] record indices; each epoch of N consecutive positions is a permutation of range(N).
    """
    out = np.empty(global_batch_size, np.int64)  # [B]
    seeds: dict[int, int] = {}
    for r in range(global_batch_size):
        epoch, k = divmod(step * global_batch_size + r, num_examples)
        if epoch not in seeds:
            seeds[epoch] = _epoch_seed(seed, epoch)
        out[r] = grain.experimental.index_shuffle(k, max_index=num_examples - 1, seed=seeds[epoch], rounds=4)
    return out


class BatchReader:
    """Host-side batch maker for one split: record indices -> numpy batch dict of this process's rows.

    Picklable (grain worker processes get a copy).
    """

    def __init__(
        self,
        *,
        dataset: str,
        split: str,
        global_batch_size: int,
        tokenizer: Tokenizer,
        rows: slice,
        seed: int = 0,
        image_size: int | None = None,
        augment: bool = False,
        data_dir: str | None = None,
        builder_kwargs: dict | None = None,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        """Opens the split (building the dataset if absent).

        Args:
          dataset: "easy_vqa", "sort_of_clevr" or "manifest".
          split: split name (TFDS slicing allowed).
          global_batch_size: B.
          tokenizer: text tokenizer.
          rows: rows of each global batch this process reads (see `process_slice` / `local_rows`).
          seed: data seed (shuffling and crops).
          image_size: output side; None keeps the stored size. Resizing is PIL bilinear.
          augment: random crops after edge padding of max(1, round(size / 16)) px. Never flips.
          data_dir: TFDS data folder.
          builder_kwargs: builder options.
          image_mean: per-channel mean subtracted from images in [0, 1].
          image_std: per-channel std dividing them.
        """
        self.dataset, self.split, self.seed = dataset, split, int(seed)
        self.global_batch_size = int(global_batch_size)
        self.rows = rows
        self.spec = datasets.get_spec(dataset)
        self.source = get_data_source(dataset, split, data_dir=data_dir, builder_kwargs=builder_kwargs)
        self.num_examples = len(self.source)
        if self.num_examples == 0:
            raise ValueError(f"{dataset}/{split} is empty")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.augment = augment
        # Side of the output images (for crop padding): the stored size unless resized.
        self.out_size = int(image_size or self.source[0]["image"].shape[0])
        std = np.asarray(image_std, np.float32)
        self._scale = 1.0 / (255.0 * std)  # [3]
        self._bias = -np.asarray(image_mean, np.float32) / std  # [3]

    def _images(self, examples, crop_offsets) -> np.ndarray:
        imgs = []
        for ex in examples:
            img = ex["image"]  # uint8 [H, W, 3]
            if self.image_size is not None and img.shape[:2] != (self.image_size, self.image_size):
                pil = Image.fromarray(img).resize((self.image_size, self.image_size), Image.BILINEAR)
                img = np.asarray(pil)
            imgs.append(img)
        images = np.stack(imgs)  # [b, H, W, 3] uint8
        if crop_offsets is not None:
            pad = _crop_pad(images.shape[1])
            padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
            h, w = images.shape[1:3]
            for i, (dy, dx) in enumerate(crop_offsets):
                images[i] = padded[i, dy : dy + h, dx : dx + w]
        out = np.multiply(images, self._scale, dtype=np.float32)  # [b, H, W, 3]
        out += self._bias
        return out

    def load(self, indices: np.ndarray, valid: np.ndarray, crop_offsets: np.ndarray | None = None) -> dict:
        """Reads and preprocesses records.

        Args:
          indices: int [b] record indices.
          valid: bool [b]; False marks padding rows.
          crop_offsets: int [b, 2] (dy, dx) crop offsets in [0, 2 * pad], or None for no crop.

        Returns:
          {"image": float32 [b,H,W,3], "text_ids": int32 [b,L], "text_mask": bool [b,L], "label": int32 [b],
           "question_type": int32 [b], "valid": bool [b]} plus the dataset's extra keys (Sort-of-CLEVR:
          "family" int32 [b], "question_code" float32 [b,11]).
        """
        examples = self.source.__getitems__([int(i) for i in indices])
        texts = [_text(ex[self.spec.text_key]) for ex in examples]
        batch = {"image": self._images(examples, crop_offsets), **self.tokenizer(texts)}
        batch["label"] = np.asarray([ex[self.spec.label_key] for ex in examples], np.int32)  # [b]
        batch["question_type"] = np.asarray([ex[self.spec.type_key] for ex in examples], np.int32)  # [b]
        for feature, key in self.spec.extra_keys:
            arr = np.stack([np.asarray(ex[feature]) for ex in examples])
            batch[key] = arr.astype(np.float32 if arr.dtype.kind == "f" else np.int32)
        batch["valid"] = np.asarray(valid, bool)  # [b]
        return batch

    def train_batch(self, step: int) -> dict:
        """This process's rows of the global training batch at `step` (a pure function of (seed, step))."""
        idx = train_indices(self.seed, step, self.global_batch_size, self.num_examples)[self.rows]
        offsets = None
        if self.augment:
            rng = np.random.default_rng([_SEED_SALT, self.seed, step])
            offsets = rng.integers(0, 2 * _crop_pad(self.out_size) + 1, size=(self.global_batch_size, 2))[self.rows]
        return self.load(idx, np.ones(len(idx), bool), offsets)

    def num_eval_batches(self) -> int:
        """ceil(N / B): every process runs the same number of eval batches."""
        return -(-self.num_examples // self.global_batch_size)

    def eval_batch(self, i: int) -> dict:
        """This process's rows of eval batch `i`; positions past the split are padding (valid False, index -1)."""
        pos = np.arange(i * self.global_batch_size, (i + 1) * self.global_batch_size)[self.rows]  # [b]
        valid = pos < self.num_examples
        batch = self.load(np.where(valid, pos, 0), valid)
        batch["index"] = np.where(valid, pos, -1).astype(np.int32)  # record index in the split, -1 on padding
        return batch


def _crop_pad(size: int) -> int:
    return max(1, round(size / 16))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _to_global(batch: dict, sharding: jax.sharding.Sharding, global_batch_size: int) -> dict:
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
        for k, v in batch.items()
    }


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
        self._thread.join(timeout=10)
        close = getattr(self._host_iter, "close", None)
        if close is not None:
            close()


class TrainIterator:
    """Infinite iterator of global training batches; `.step` is the step of the next batch.

    `get_state()` returns a JSON-able dict to save with the checkpoint; `set_state(state)` resumes exactly there.
    """

    def __init__(
        self, reader: BatchReader, sharding, *, start_step: int, prefetch: int, worker_count: int, num_threads: int
    ):
        self.reader, self._sharding = reader, sharding
        self._prefetch, self._worker_count, self._num_threads = prefetch, worker_count, num_threads
        self._prefetcher: _Prefetcher | None = None
        self.step = int(start_step)
        self._start()

    def _start(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
        ds = grain.MapDataset.range(self.step, self.step + _HORIZON).map(self.reader.train_batch)
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=max(self._prefetch, 1))
        )
        if self._worker_count > 0:
            from absl import flags  # grain's worker processes read absl flags; allow non-absl programs

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        sharding, size = self._sharding, self.reader.global_batch_size  # the thread must not hold `self`
        convert = lambda b: _to_global(b, sharding, size)
        self._prefetcher = _Prefetcher(iter(it), convert, self._prefetch)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        batch = self._prefetcher.get()
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """Returns {"step", "seed", "global_batch_size", "dataset", "split", "num_examples"} (JSON-able)."""
        r = self.reader
        return {
            "step": self.step,
            "seed": r.seed,
            "global_batch_size": r.global_batch_size,
            "dataset": r.dataset,
            "split": r.split,
            "num_examples": r.num_examples,
        }

    def set_state(self, state: dict) -> None:
        """Resumes at `state["step"]`; refuses a state saved for another seed, batch size or dataset.

        Args:
          state: a dict from `get_state()`.
        """
        mine = self.get_state()
        for key in ("seed", "global_batch_size", "dataset", "split", "num_examples"):
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
        try:
            self.close()
        except Exception:
            pass


class EvalIterable:
    """Re-iterable eval batches: every example exactly once, fixed order, last batch padded (`valid` False)."""

    def __init__(self, reader: BatchReader, sharding, prefetch: int = 2):
        self.reader, self._sharding, self._prefetch = reader, sharding, prefetch

    def __len__(self) -> int:
        return self.reader.num_eval_batches()

    @property
    def num_examples(self) -> int:
        return self.reader.num_examples

    def __iter__(self) -> Iterator[dict]:
        host = (self.reader.eval_batch(i) for i in range(len(self)))
        prefetcher = _Prefetcher(
            host, lambda b: _to_global(b, self._sharding, self.reader.global_batch_size), self._prefetch
        )
        try:
            while True:
                try:
                    yield prefetcher.get()
                except StopIteration:
                    return
        finally:
            prefetcher.close()


def _reader_for(mesh, batch_axes, global_batch_size, **kwargs):
    sharding = batch_sharding(mesh, batch_axes)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.axis_names]))
    if global_batch_size % shards:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the {shards} batch shards "
            f"of mesh axes {tuple(batch_axes)}"
        )
    rows = local_rows(sharding, global_batch_size)
    return BatchReader(global_batch_size=global_batch_size, rows=rows, **kwargs), sharding


def make_train_iterator(
    *,
    dataset: str,
    split: str,
    global_batch_size: int,
    seed: int,
    mesh: jax.sharding.Mesh,
    tokenizer: Tokenizer,
    image_size: int | None = None,
    augment: bool = False,
    data_dir: str | None = None,
    builder_kwargs: dict | None = None,
    start_step: int = 0,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    prefetch: int = 2,
    worker_count: int = 0,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    num_threads: int = 2,
) -> TrainIterator:
    """Infinite, deterministic, resumable training batches as global jax.Arrays (see the module docstring).

    Args:
      dataset: "easy_vqa", "sort_of_clevr" or "manifest".
      split: split to train on.
      global_batch_size: B over all processes; divisible by the product of the batch mesh axes.
      seed: data seed; the batch at step s is a pure function of (seed, s).
      mesh: device mesh; dim 0 of every array is sharded over `batch_axes`.
      tokenizer: text tokenizer (fixes L = tokenizer.max_len).
      image_size: output side; None keeps the stored size.
      augment: random crops after small edge padding, seeded by (seed, step). Never flips.
      data_dir: TFDS data folder (default $TFDS_DATA_DIR or ~/tensorflow_datasets); built on first use.
      builder_kwargs: builder options (see `datasets.get_builder`).
      start_step: step of the first batch (resume).
      batch_axes: mesh axes the batch dim is sharded over (absent ones are ignored).
      prefetch: batches kept ready on device by the background thread (and in grain's buffer).
      worker_count: grain worker processes (0 = threads in this process).
      image_mean: per-channel mean of images in [0, 1].
      image_std: per-channel std.
      num_threads: grain threads each building whole batches in parallel.

    Returns:
      A TrainIterator yielding {"image": f32 [B,H,W,3], "text_ids": i32 [B,L], "text_mask": bool [B,L],
      "label": i32 [B], "question_type": i32 [B], "valid": bool [B] (all True), + dataset extras}.
    """
    reader, sharding = _reader_for(
        mesh,
        batch_axes,
        global_batch_size,
        dataset=dataset,
        split=split,
        seed=seed,
        tokenizer=tokenizer,
        image_size=image_size,
        augment=augment,
        data_dir=data_dir,
        builder_kwargs=builder_kwargs,
        image_mean=image_mean,
        image_std=image_std,
    )
    return TrainIterator(
        reader, sharding, start_step=start_step, prefetch=prefetch, worker_count=worker_count, num_threads=num_threads
    )


def make_eval_iterator(
    *,
    dataset: str,
    split: str,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    tokenizer: Tokenizer,
    image_size: int | None = None,
    data_dir: str | None = None,
    builder_kwargs: dict | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    prefetch: int = 2,
) -> EvalIterable:
    """Eval batches: each example exactly once, in record order; the last batch is padded.

    Args:
      dataset, split, global_batch_size, mesh, tokenizer, image_size, data_dir, builder_kwargs, batch_axes,
      image_mean, image_std: as in `make_train_iterator` (no augmentation, no shuffling).
      prefetch: batches kept ready by the background thread.

    Returns:
      A re-iterable of len ceil(N / B) batches like the training ones, with "valid" bool [B] False on padding and
      "index" int32 [B] (record index within the split, -1 on padding). Mask metrics with "valid".
    """
    reader, sharding = _reader_for(
        mesh,
        batch_axes,
        global_batch_size,
        dataset=dataset,
        split=split,
        tokenizer=tokenizer,
        image_size=image_size,
        data_dir=data_dir,
        builder_kwargs=builder_kwargs,
        image_mean=image_mean,
        image_std=image_std,
    )
    return EvalIterable(reader, sharding, prefetch=prefetch)
