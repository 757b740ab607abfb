"""Image-caption data for the retrieval and captioning tasks, read through the same TFDS data source as VQA.

A split is indexed once (``CaptionIndex``): its records are grouped by image (the ``image_id`` feature of
Sort-of-CLEVR, whose records repeat the image and its scene caption once per question; the normalised
``image_path`` of a caption-mode manifest, data/manifest.py, where an image may sit on several rows and a row may
hold several newline-separated captions). Each image keeps one record to read its pixels from and the list of its
captions; the training examples are the (image, caption) pairs.

``CaptionReader`` is the caption counterpart of reader.BatchReader and plugs into the same iterators
(pipeline.make_train_iterator / make_eval_iterator with ``captions=True``): training pairs in the order of
reader.train_indices (one shuffle, a pure function of (seed, step), exact resume), this process's rows only, images
as uint8 (normalised on device by the pipeline). Eval batches visit each image once, in index order.

Captions become ids through ``WordVocab`` (lowercase words, no punctuation; built from the training captions and
saved as ``workdir/vocab.json``); the same ids feed the retrieval text encoder and the caption decoder.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
from etils import epath

from vtfusion_jax.data import manifest, reader
from vtfusion_jax.data.datasets import get_data_source
from vtfusion_jax.metrics_caption import tokenize
from vtfusion_jax.preflight import CorruptFileError, read_json

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


class WordVocab:
    """Word-level vocabulary: ids 0-3 are [PAD], [BOS], [EOS], [UNK], then the words by decreasing frequency.

    Called on texts it returns a batch like data.tokenizer.Tokenizer (so the readers take either).
    """

    def __init__(self, words: Sequence[str], max_len: int):
        self.words = [PAD, BOS, EOS, UNK, *[w for w in words if w not in (PAD, BOS, EOS, UNK)]]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.max_len = int(max_len)

    @classmethod
    def build(cls, captions: Sequence[str], max_len: int) -> WordVocab:
        counts = Counter(w for c in captions for w in tokenize(c))
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))], max_len)

    @property
    def size(self) -> int:
        return len(self.words)

    vocab_size = size

    def save(self, path: str) -> None:
        epath.Path(path).write_text(json.dumps({"words": self.words}))

    @classmethod
    def load(cls, path: str, max_len: int) -> WordVocab:
        fix = "; delete it to rebuild it from the training captions"
        raw = read_json(path, fix)
        words = raw.get("words") if isinstance(raw, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CorruptFileError(f"{path} holds no word list{fix}")
        return cls(words, max_len)

    def encode(self, text: str) -> np.ndarray:
        """[BOS] words [EOS] [PAD]... as int32 [max_len] (truncated: the last kept position stays [EOS])."""
        ids = [self.bos_id, *[self.index.get(w, self.unk_id) for w in tokenize(text)]][: self.max_len - 1]
        ids.append(self.eos_id)
        return np.asarray(ids + [self.pad_id] * (self.max_len - len(ids)), np.int32)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids = np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros((0, self.max_len), np.int32)
        return {"text_ids": ids, "text_mask": ids != self.pad_id}

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first [EOS] ([BOS] / [PAD] dropped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.words[i] if i < len(self.words) else UNK)
        return " ".join(out)


class CaptionIndex:
    """One split's images and captions: ``records`` int64 [I] (a record holding each image), ``captions`` (I
    lists of strings), ``pair_image`` int32 [T] and ``pair_text`` (T strings): the (image, caption) pairs."""

    def __init__(self, source, where: str):
        features = source.dataset_info.features
        keyed = "image_id" if "image_id" in features else "image_path"
        fields = [keyed, "caption"] + (["line"] if "line" in features else [])
        decode = reader.RecordDecoder(features, fields)
        rows, chunk = [], 4096
        for start in range(0, len(source), chunk):
            raw = source.data_source.__getitems__(list(range(start, min(start + chunk, len(source)))))
            rows += [(start + j, decode(r)) for j, r in enumerate(raw)]
        if "line" in features:  # manifests: manifest order
            rows.sort(key=lambda r: int(r[1]["line"]))
        records, captions, slot = [], [], {}
        for i, row in rows:
            key = row[keyed]
            key = os.path.normpath(reader._text(key)) if keyed == "image_path" else int(key)
            caps = [c for c in reader._text(row["caption"]).split("\n") if c.strip()]
            if not caps:
                line = f":{int(row['line'])}" if "line" in row else f" record {i}"
                raise manifest.ManifestError(
                    f"{where}{line}: no caption; the retrieval / caption tasks need one per row (build the "
                    "manifest with builder_kwargs.captions=True to check every row)"
                )
            if key not in slot:
                slot[key] = len(records)
                records.append(i)
                captions.append([])
            if keyed == "image_path" or not captions[slot[key]]:  # Sort-of-CLEVR repeats one caption per question
                captions[slot[key]].extend(caps)
        if not records:
            raise manifest.ManifestError(f"{where}: no usable rows")
        self.records = np.asarray(records, np.int64)
        self.captions = captions
        self.pair_image = np.asarray([i for i, cs in enumerate(captions) for _ in cs], np.int32)
        self.pair_text = [c for cs in captions for c in cs]


class CaptionReader:
    """Host-side batches of (image, caption) pairs (training) or images (eval) for one split; see the module doc.

    Same interface as reader.BatchReader (train_batch, eval_batch, num_eval_batches and the fields the train
    iterator's state records), so pipeline.TrainIterator / EvalIterable drive it unchanged.
    """

    def __init__(
        self,
        *,
        dataset: str,
        split: str,
        global_batch_size: int,
        tokenizer: WordVocab,
        rows: slice,
        seed: int = 0,
        image_size: int | None = None,
        augment: bool = False,
        data_dir: str | None = None,
        builder_kwargs: dict | None = None,
        index: CaptionIndex | None = None,
        **unused,
    ):
        if unused.get("images_per_batch"):
            raise ValueError("image-grouped batches (train.images_per_batch > 0) are for VQA; set it to 0")
        self.dataset, self.split, self.seed = dataset, split, int(seed)
        self.global_batch_size, self.rows, self.images_per_batch = int(global_batch_size), rows, 0
        self.source = get_data_source(dataset, split, data_dir=data_dir, builder_kwargs=builder_kwargs)
        self.index = index or CaptionIndex(self.source, f"{dataset}/{split}")
        self.num_examples = len(self.index.pair_text)
        self.tokenizer = tokenizer
        # the VQA reader's image path (resize, crops) on this source: one copy of the image preprocessing
        self._images = reader.ImageReader(self.source, image_size, augment, seed)

    def train_batch(self, step: int) -> dict:
        """This process's rows of training step ``step``: {"image" uint8 [b,H,W,3], "text_ids", "text_mask",
        "image_id" int32 [b] (the image's index in the split: equal ids are positives), "valid"}."""
        pairs = reader.train_indices(self.seed, step, self.global_batch_size, self.num_examples)[self.rows]
        image = self.index.pair_image[pairs]
        batch = self.tokenizer([self.index.pair_text[p] for p in pairs])
        offsets = self._images.offsets(step, self.global_batch_size, self.rows)
        batch["image"] = self._images(self.index.records[image], offsets)
        batch["image_id"], batch["valid"] = image.astype(np.int32), np.ones(len(pairs), bool)
        return batch

    def num_eval_batches(self) -> int:
        return -(-len(self.index.records) // self.global_batch_size)

    def eval_batch(self, i: int) -> dict:
        """Images ``i * B ..`` of the split: {"image", "index" int32 (-1 on padding), "valid"}."""
        pos = np.arange(i * self.global_batch_size, (i + 1) * self.global_batch_size)[self.rows]
        valid = pos < len(self.index.records)
        image = self._images(self.index.records[np.where(valid, pos, 0)])
        return {"image": image, "index": np.where(valid, pos, -1).astype(np.int32), "valid": valid}
