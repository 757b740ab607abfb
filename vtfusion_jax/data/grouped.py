"""Image-grouped training batches: all the questions of an image travel in one batch, so the image is encoded once.

Gathering each image's tokens per question (``batch["image_index"]``, models/vtfusion.py) computes exactly what
per-question batches do. Layout (K = ``images_per_batch`` image slots, B = ``global_batch_size``)::

    image        [K, H, W, 3]   the batch's distinct images (padding slots are zeros)
    image_index  [B] int32      which image slot each question looks at (0 on padding rows)
    text_ids, text_mask, label, question_type, ... [B]  as in ungrouped batches
    valid        [B] bool       False on padding rows (the loss and the metrics ignore them)

Epoch plan, a pure function of (seed, epoch) so resume and multi-process reading stay exact: the images, shuffled,
are packed greedily into batches of at most B questions and K images (the last may be partial).
"""

from __future__ import annotations

import collections
import math
import threading

import numpy as np

_SALT = 0x6A0B


class GroupPlan:
    """Deterministic image-grouped batch plan over one split.

    Args:
      image_ids: int [N], the image of every record of the split (record order).
      seed, global_batch_size, images_per_batch: data seed; B question and K image slots per batch.
    """

    def __init__(self, image_ids: np.ndarray, seed: int, global_batch_size: int, images_per_batch: int):
        ids = np.asarray(image_ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"image-grouped batches need one image id per record, got shape {ids.shape}")
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
        order = np.argsort(ids, kind="stable")
        _, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
        self.groups = np.split(order, starts[1:])  # record indices of each image, ascending
        self.counts = counts
        if counts.max() > global_batch_size:
            raise ValueError(
                f"an image has {counts.max()} questions but a batch holds only {global_batch_size}: "
                "raise the batch size or turn off image grouping (train.global_batch_size / images_per_batch; "
                "eval: train.eval_batch_size / eval_images_per_batch)"
            )
        self.seed, self.batch, self.images = int(seed), int(global_batch_size), int(images_per_batch)
        self.num_examples = len(ids)
        self._epochs: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()
        self._starts = [0]  # _starts[e] = global step of epoch e's first batch (known epochs + 1)
        # grain builds batches on several threads at once: the caches above must not be filled concurrently.
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:  # picklable for grain worker processes (a lock is not)
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def epoch(self, e: int) -> list[np.ndarray]:
        """The batches of epoch ``e``: a list of int arrays of group (image) numbers, in order."""
        with self._lock:
            return self._epoch(e)

    def _epoch(self, e: int) -> list[np.ndarray]:
        if e in self._epochs:
            self._epochs.move_to_end(e)
            return self._epochs[e]
        perm = np.random.default_rng([_SALT, self.seed, e]).permutation(len(self.groups))
        batches, cur, used = [], [], 0
        for g in perm:
            n = int(self.counts[g])
            if cur and (used + n > self.batch or len(cur) == self.images):
                batches.append(np.asarray(cur))
                cur, used = [], 0
            cur.append(g)
            used += n
        batches.append(np.asarray(cur))
        self._epochs[e] = batches
        while len(self._epochs) > 4:
            self._epochs.popitem(last=False)
        return batches

    def _know_epochs(self, n: int) -> None:
        """Fills ``_starts`` up to epoch ``n`` (so ``_starts[n]`` exists). Call with the lock held."""
        while len(self._starts) <= n:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e)))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global training step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        with self._lock:
            while self._starts[-1] <= step:
                self._know_epochs(len(self._starts))
            e = int(np.searchsorted(self._starts, step, side="right")) - 1
            return e, step - self._starts[e]

    def steps_for_epochs(self, num_epochs: float) -> int:
        """Training steps that cover ``num_epochs`` epochs (a fractional last epoch rounds up to whole batches)."""
        whole = int(num_epochs)
        with self._lock:
            self._know_epochs(whole + 1)
            in_last = self._starts[whole + 1] - self._starts[whole]
            return self._starts[whole] + math.ceil((num_epochs - whole) * in_last)

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The global batch of ``step``.

        Returns:
          (image_records int64 [K]: a record of each image slot's image, -1 on padding slots;
           question_records int64 [B]: record of each question slot, -1 on padding rows;
           image_index int32 [B]: image slot of each question, 0 on padding rows).
        """
        e, b = self.locate(step)
        groups = self.epoch(e)[b]
        image_records = np.full(self.images, -1, np.int64)
        question_records = np.full(self.batch, -1, np.int64)
        image_index = np.zeros(self.batch, np.int32)
        row = 0
        for slot, g in enumerate(groups):
            recs = self.groups[g]
            image_records[slot] = recs[0]
            question_records[row : row + len(recs)] = recs
            image_index[row : row + len(recs)] = slot
            row += len(recs)
        return image_records, question_records, image_index
