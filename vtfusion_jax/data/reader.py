"""Host-side batch making: record indices -> decoded, preprocessed numpy batches (no jax here).

`train_indices` defines the training order (see pipeline.py for the contract); `BatchReader` reads the rows of a
global batch that one process owns, decoding only the features a batch needs straight from the serialized records
(about 2x faster than decoding every feature through tfds).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from vtfusion_jax.data import datasets, grouped
from vtfusion_jax.data.datasets import get_data_source
from vtfusion_jax.data.tokenizer import Tokenizer

_SEED_SALT = 0x5EED
_TEXT_CACHE_SIZE = 1_000_000  # distinct texts kept tokenised (~70 MB at L = 32)


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence is a fixed, version-stable hash; index_shuffle wants a 32-bit seed.
    return int(np.random.SeedSequence([_SEED_SALT, seed, epoch]).generate_state(1)[0])


def train_indices(seed: int, step: int, global_batch_size: int, num_examples: int) -> np.ndarray:
    """int64 [B] record indices of the global training batch at `step` (B = `global_batch_size`, N = `num_examples`
    in the split): epoch-wise permutations seeded by (seed, epoch), each epoch of N consecutive positions a
    permutation of range(N)."""
    out = np.empty(global_batch_size, np.int64)  # [B]
    seeds: dict[int, int] = {}
    for r in range(global_batch_size):
        epoch, k = divmod(step * global_batch_size + r, num_examples)
        if epoch not in seeds:
            seeds[epoch] = _epoch_seed(seed, epoch)
        out[r] = grain.experimental.index_shuffle(k, max_index=num_examples - 1, seed=seeds[epoch], rounds=4)
    return out


class BatchReader:
    """Host-side batch maker for one split: record indices -> numpy batch dict of this process's rows (images as
    uint8: the iterators normalise them on device). Picklable (grain worker processes get a copy)."""

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
        images_per_batch: int = 0,
        image_rows: slice | None = None,
        plan: grouped.GroupPlan | None = None,
    ):
        """Opens the split (building the dataset if absent).

        Args:
          dataset, split, data_dir, builder_kwargs: as for datasets.get_data_source (TFDS slicing allowed).
          global_batch_size, tokenizer, seed: B; the text tokenizer; the data seed (shuffling and crops).
          rows: rows of each global batch this process reads (see `process_slice` / `local_rows`).
          image_size: output side; None keeps the stored size. Resizing is PIL bilinear.
          augment: random crops after edge padding of max(1, round(size / 16)) px. Never flips.
          images_per_batch: K > 0: image-grouped batches with K image slots (see data/grouped.py; the split's
            records need an image: ``read_image_ids``), for training and for eval (eval batch i = batch i of the
            plan's first epoch: every question once); 0: one image per question.
          image_rows: image slots of each grouped batch this process reads (default: all K).
          plan: the split's GroupPlan if already built (group_plan); built here otherwise.
        """
        self.dataset, self.split, self.seed = dataset, split, int(seed)
        self.global_batch_size, self.rows = int(global_batch_size), rows
        self.spec = datasets.get_spec(dataset)
        self.source = get_data_source(dataset, split, data_dir=data_dir, builder_kwargs=builder_kwargs)
        self.num_examples = len(self.source)
        if self.num_examples == 0:
            raise ValueError(f"{dataset}/{split} is empty")
        keys = [self.spec.text_key, self.spec.label_key, self.spec.type_key, *(f for f, _ in self.spec.extra_keys)]
        features = self.source.dataset_info.features
        self._decode_fields = RecordDecoder(features, keys)
        self.images = ImageReader(self.source, image_size, augment, seed)
        self.images_per_batch = int(images_per_batch)
        self.image_rows = image_rows if image_rows is not None else slice(0, self.images_per_batch)
        self.plan = plan
        if self.images_per_batch > 0 and plan is None:
            if "image_id" not in features and "image_path" not in features:
                raise ValueError(
                    f"{dataset}/{split} records have no 'image_id' / 'image_path' feature: image-grouped batches "
                    "(train.images_per_batch > 0) need one; set train.images_per_batch=0"
                )
            ids = read_image_ids(self.source)
            self.plan = grouped.GroupPlan(ids, self.seed, self.global_batch_size, self.images_per_batch)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _tokenize(self, texts: list[str]) -> dict:
        # Questions repeat a lot (Sort-of-CLEVR has 36 distinct ones): tokenise each distinct text once.
        cache = self._text_cache
        missing = sorted({t for t in texts if t not in cache})
        local = {}
        if missing:
            fresh = self.tokenizer(missing)
            local = dict(zip(missing, zip(fresh["text_ids"], fresh["text_mask"], strict=True), strict=True))
            if len(cache) < _TEXT_CACHE_SIZE:
                cache.update(local)
        ids, mask = zip(*[cache.get(t) or local[t] for t in texts], strict=True)
        return {"text_ids": np.stack(ids).astype(np.int32), "text_mask": np.stack(mask).astype(bool)}  # [b, L] each

    def load(
        self, indices: np.ndarray, valid: np.ndarray, crop_offsets: np.ndarray | None = None, with_images: bool = True
    ) -> dict:
        """Reads and preprocesses the records ``indices`` (int [b]; ``valid`` bool [b] False on padding rows), cropped
        at ``crop_offsets`` (int [b, 2] (dy, dx) from ImageReader.offsets, or None), without "image" unless
        ``with_images``. Returns {"image": uint8 [b,H,W,3], "text_ids": int32 [b,L], "text_mask": bool [b,L], "label":
        int32 [b], "question_type": int32 [b], "valid": bool [b]} plus the dataset's extra keys (Sort-of-CLEVR:
        "family" int32 [b], "question_code" float32 [b,11])."""
        records = self.source.data_source.__getitems__([int(i) for i in indices])
        examples = [self._decode_fields(r) for r in records]
        batch = self._tokenize([_text(ex[self.spec.text_key]) for ex in examples])
        if with_images:
            batch["image"] = self.images.from_raw(records, crop_offsets)
        batch["label"] = np.asarray([ex[self.spec.label_key] for ex in examples], np.int32)  # [b]
        batch["question_type"] = np.asarray([ex[self.spec.type_key] for ex in examples], np.int32)  # [b]
        for feature, key in self.spec.extra_keys:
            arr = np.stack([np.asarray(ex[feature]) for ex in examples])
            batch[key] = arr.astype(np.float32 if arr.dtype.kind == "f" else np.int32)
        batch["valid"] = np.asarray(valid, bool)  # [b]
        return batch

    def train_batch(self, step: int) -> dict:
        """This process's rows of the global training batch at `step` (a pure function of (seed, step))."""
        if self.plan is None:
            idx = train_indices(self.seed, step, self.global_batch_size, self.num_examples)[self.rows]
            return self.load(idx, np.ones(len(idx), bool), self.images.offsets(step, self.global_batch_size, self.rows))
        return self._grouped_batch(step)

    def _grouped_batch(self, step: int, with_index: bool = False) -> dict:
        """This process's question rows and image slots of the plan's batch ``step`` (data/grouped.py); with
        ``with_index`` also "index": each row's record in the split (-1 on padding rows)."""
        image_records, question_records, image_index = self.plan.batch_at(step)
        q = question_records[self.rows]
        batch = self.load(np.maximum(q, 0), q >= 0, with_images=False)
        if with_index:
            batch["index"] = q.astype(np.int32)
        batch["image_index"] = image_index[self.rows]  # [b] slot in the global image axis
        recs = image_records[self.image_rows]  # [k]; -1 = an empty slot (zeros)
        size = self.images.out_size
        batch["image"] = np.zeros((len(recs), size, size, 3), np.uint8)
        real = np.flatnonzero(recs >= 0)
        if len(real):
            offsets = self.images.offsets(step, self.images_per_batch, self.image_rows)
            batch["image"][real] = self.images(recs[real], None if offsets is None else offsets[real])
        return batch

    def num_eval_batches(self) -> int:
        """ceil(N / B), image-grouped: the plan's first epoch; every process runs the same number of eval batches."""
        return len(self.plan.epoch(0)) if self.plan else -(-self.num_examples // self.global_batch_size)

    def eval_batch(self, i: int) -> dict:
        """This process's rows of eval batch `i`; positions past the split are padding (valid False, index -1).
        Image-grouped: batch i of the plan's first epoch (every question once, grouped by image)."""
        if self.plan is not None:
            return self._grouped_batch(i, with_index=True)
        pos = np.arange(i * self.global_batch_size, (i + 1) * self.global_batch_size)[self.rows]  # [b]
        valid = pos < self.num_examples
        batch = self.load(np.where(valid, pos, 0), valid)
        batch["index"] = np.where(valid, pos, -1).astype(np.int32)  # record index in the split, -1 on padding
        return batch


class ImageReader:
    """uint8 images [b, H, W, 3] of a data source's records: decoded, resized to ``image_size`` (PIL bilinear; None
    keeps the stored size) and, with ``augment``, randomly cropped after edge padding. Picklable."""

    def __init__(self, source, image_size: int | None, augment: bool, seed: int):
        self.source, self.image_size, self.augment, self.seed = source, image_size, augment, int(seed)
        self._decode = RecordDecoder(source.dataset_info.features, ["image"])
        self.out_size = int(image_size or source[0]["image"].shape[0])

    def offsets(self, step: int, total: int, rows: slice) -> np.ndarray | None:
        """Crop offsets of this process's ``rows``, drawn for the whole global batch of ``total`` images from
        (seed, step), so they do not depend on the process count; None without ``augment``."""
        if not self.augment:
            return None
        rng = np.random.default_rng([_SEED_SALT, self.seed, step])
        return rng.integers(0, 2 * _crop_pad(self.out_size) + 1, size=(total, 2))[rows]

    def from_raw(self, raw: Sequence[bytes], offsets: np.ndarray | None = None) -> np.ndarray:
        """Images of serialized records (``offsets`` int [b, 2]: crops, or None)."""
        images = np.stack([self._resize(self._decode(r)["image"]) for r in raw])
        if offsets is not None:
            pad, s = _crop_pad(self.out_size), self.out_size
            padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
            for i, (dy, dx) in enumerate(offsets):
                images[i] = padded[i, dy : dy + s, dx : dx + s]
        return images

    def __call__(self, records, offsets: np.ndarray | None = None) -> np.ndarray:
        return self.from_raw(self.source.data_source.__getitems__([int(i) for i in records]), offsets)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        return img if self.image_size is None else resize(img, self.image_size)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3], PIL bilinear (the training images' resize; a no-op at that size)."""
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def read_image_ids(source) -> np.ndarray:
    """int64 [N]: the image of every record of a data source, in record order: the source's own ``image_ids()``
    (one record per question over one per image, data/clevr.py), else the ``image_id`` feature, else the number of
    the normalised ``image_path`` (manifests: rows sharing an image path share an image)."""
    if hasattr(source, "image_ids"):
        return source.image_ids()
    key = "image_id" if "image_id" in source.dataset_info.features else "image_path"
    decode = RecordDecoder(source.dataset_info.features, [key])
    ids, chunk, n = [], 4096, len(source)
    for start in range(0, n, chunk):
        records = source.data_source.__getitems__(list(range(start, min(start + chunk, n))))
        ids += [decode(r)[key] for r in records]
    if key == "image_path":
        return np.unique([os.path.normpath(_text(p)) for p in ids], return_inverse=True)[1].astype(np.int64)
    return np.asarray(ids, np.int64)


def group_plan(
    *, dataset, split, seed, global_batch_size, images_per_batch, data_dir=None, builder_kwargs=None
) -> grouped.GroupPlan:
    """The image-grouped batch plan (data/grouped.py) of ``split``; pass it to make_train_iterator(plan=...) so the
    split's image ids are read once."""
    source = get_data_source(dataset, split, data_dir=data_dir, builder_kwargs=builder_kwargs)
    return grouped.GroupPlan(read_image_ids(source), seed, global_batch_size, images_per_batch)


def _crop_pad(size: int) -> int:
    return max(1, round(size / 16))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RecordDecoder:
    """Decodes selected top-level features of a serialized TFDS record (tf.train.Example) with numpy + PIL.

    Gives the same values as the tfds data source (texts as bytes, ClassLabels as int, tensors as arrays, images
    as uint8 [H, W, C]) while skipping the features a batch does not use. A record already decoded (a mapping:
    data/clevr.py's per-question records) gives its values of the selected features.
    """

    def __init__(self, features: tfds.features.FeaturesDict, keys: Sequence[str]):
        self._specs = {}
        for key in keys:
            f = features[key]
            if isinstance(f, tfds.features.Image):
                self._specs[key] = ("image", None, None)
            elif isinstance(f, tfds.features.Text):
                self._specs[key] = ("text", None, None)
            else:
                self._specs[key] = ("tensor", tuple(f.shape), np.dtype(f.np_dtype))

    def __call__(self, record: bytes | Mapping) -> dict:
        if isinstance(record, Mapping):
            return {key: record[key] for key in self._specs}
        fmap = tf_example_pb2.Example.FromString(record).features.feature
        out = {}
        for key, (kind, shape, dtype) in self._specs.items():
            feat = fmap[key]
            if kind == "image":
                with Image.open(io.BytesIO(feat.bytes_list.value[0])) as img:
                    out[key] = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
            elif kind == "text":
                out[key] = feat.bytes_list.value[0]
            else:
                values = feat.int64_list.value if dtype.kind in "iub" else feat.float_list.value
                arr = np.asarray(values, dtype)
                out[key] = arr.reshape(shape) if shape else arr.item()
        return out
