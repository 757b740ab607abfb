"""Image-caption data for the retrieval and captioning tasks: images with one or more captions, a word vocabulary,
and deterministic global batches.

Sort-of-CLEVR (``dataset.name = "sort_of_clevr"``): every image has one scene caption (data/sort_of_clevr.py
``caption``: each object's colour, shape and coarse 3x3 position). The TFDS records repeat image and caption once per
question, so the images are taken straight from the generator, ``generate_image(seed, split, index)`` -- the pure
function the TFDS builder writes -- and cached as one ``.npz`` per split under
``<data_dir>/sort_of_clevr_captions/<builder config>/``.

User manifests (``dataset.name = "manifest"``, ``dataset.builder_kwargs = {path, image_size, captions: True, ...}``):
the manifest TFDS builder (data/manifest.py) in caption mode, so a row without a caption or with an unreadable image
raises ``ManifestError`` naming the manifest file and line (or is skipped and counted with ``skip_bad_rows``). Rows
are grouped by image path (normalised, in manifest order): an image on several rows, and a row whose ``caption`` is a
list, give one image with several captions -- the form the retrieval protocol scores (tasks/retrieval.py). A
split's images are held in host memory (N x S x S x 3 bytes at ``image_size`` S).

Captions are tokenised by ``metrics_caption.tokenize`` (lowercase words, no punctuation) and mapped to ids by a
word vocabulary built from the training captions (``WordVocab``, saved as ``workdir/vocab.json``): the same ids feed
the retrieval text encoder and the caption decoder. Training batches are a pure function of (seed, step): the
(image, caption) pairs are shuffled once per epoch by a generator seeded with (seed, epoch).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from vtfusion_jax import sharding
from vtfusion_jax.data import datasets, manifest, pipeline
from vtfusion_jax.data import sort_of_clevr as soc
from vtfusion_jax.metrics_caption import tokenize

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


class WordVocab:
    """Word-level vocabulary: ids 0-3 are [PAD], [BOS], [EOS], [UNK], then the words by decreasing frequency."""

    def __init__(self, words: Sequence[str]):
        self.words = [PAD, BOS, EOS, UNK, *[w for w in words if w not in (PAD, BOS, EOS, UNK)]]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Sequence[str]) -> WordVocab:
        counts = Counter(w for c in captions for w in tokenize(c))
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

    @property
    def size(self) -> int:
        return len(self.words)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"words": self.words}, f)

    @classmethod
    def load(cls, path: str) -> WordVocab:
        with open(path) as f:
            return cls(json.load(f)["words"])

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """[BOS] words [EOS] [PAD]... as int32 [max_len] (truncated: the last kept position stays [EOS])."""
        ids = [self.bos_id, *[self.index.get(w, self.unk_id) for w in tokenize(text)]][: max_len - 1]
        ids.append(self.eos_id)
        return np.asarray(ids + [self.pad_id] * (max_len - len(ids)), np.int32)

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


DATASETS = ("sort_of_clevr", "manifest")


def _check_dataset(config) -> str:
    name = config.dataset.name
    if name not in DATASETS:
        raise ValueError(f"caption tasks support datasets {list(DATASETS)}, got {name!r}")
    return name


def image_size(config) -> int:
    """Side of the square images a config's split loads: 75 (Sort-of-CLEVR) or ``builder_kwargs.image_size``."""
    if _check_dataset(config) == "manifest":
        return int(config.dataset.builder_kwargs.image_size)
    return soc.IMAGE_SIZE


def _cache_path(config, split: str) -> str:
    d = config.dataset
    conf = soc.config_from_kwargs(**d.builder_kwargs.to_dict())
    root = d.data_dir or datasets.default_data_dir()
    return os.path.join(root, "sort_of_clevr_captions", conf.name, f"{split}.npz")


def _sort_of_clevr_split(config, name: str) -> tuple[np.ndarray, list[list[str]]]:
    path = _cache_path(config, name)
    if not os.path.exists(path):
        kw = config.dataset.builder_kwargs.to_dict()
        n = {"train": kw["num_train"], "validation": kw["num_validation"], "test": kw["num_test"]}[name]
        gens = [soc.generate_image(kw["seed"], name, i) for i in range(n)]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, image=np.stack([g["image"] for g in gens]), caption=np.array([g["caption"] for g in gens]))
        os.replace(tmp, path)
    with np.load(path) as f:
        return f["image"], [[str(c)] for c in f["caption"]]


def _manifest_split(config, name: str) -> tuple[np.ndarray, list[list[str]]]:
    """A manifest split grouped by image: (uint8 [N, S, S, 3], N lists of captions), in manifest order."""
    kwargs = config.dataset.builder_kwargs.to_dict()
    builder = datasets.get_builder("manifest", data_dir=config.dataset.data_dir, builder_kwargs=kwargs)
    cfg = builder.builder_config
    if name not in cfg.manifests:
        raise FileNotFoundError(
            f"manifest dataset {kwargs['path']!r} has no {name!r} split: add {name}.jsonl beside train.jsonl"
        )
    src = builder.as_data_source(split=name)
    rows = sorted(src.__getitems__(list(range(len(src)))), key=lambda r: int(r["line"]))
    images, captions, index = [], [], {}
    for r in rows:
        caps = [c for c in r["caption"].decode("utf-8").split("\n") if c.strip()]
        if not caps:  # only without builder_kwargs.captions (caption mode refuses such rows while building)
            raise manifest.ManifestError(
                f"{cfg.manifests[name]}:{int(r['line'])}: no caption (image {r['image_path'].decode()!r}); "
                "the retrieval / caption tasks need one per row (set builder_kwargs.captions=True to check every "
                "row while building)"
            )
        key = os.path.normpath(r["image_path"].decode("utf-8"))
        if key not in index:
            index[key] = len(images)
            images.append(r["image"])
            captions.append([])
        captions[index[key]].extend(caps)
    if not images:
        raise manifest.ManifestError(f"{cfg.manifests[name]}: no usable rows")
    return np.stack(images), captions


def load_split(config, split: str) -> dict:
    """Images and captions of a split.

    Args:
      config: experiment config (``dataset.name``, ``dataset.builder_kwargs``, ``dataset.data_dir``).
      split: "train" | "validation" | "test", optionally sliced "test[:50]" (a slice of images, not of rows).

    Returns:
      {"image": uint8 [N, H, W, 3], "captions": list of N lists of caption strings}.
    """
    name = split.split("[")[0]
    if _check_dataset(config) == "manifest":
        image, caption = _manifest_split(config, name)
    else:
        image, caption = _sort_of_clevr_split(config, name)
    if "[" in split:
        sl = slice(*[int(x) if x else None for x in split[split.index("[") + 1 : -1].split(":")])
        image, caption = image[sl], caption[sl]
    return {"image": image, "captions": caption}


def pairs(captions: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """Flattens per-image caption lists: (image index of each text int32 [T], texts [T])."""
    idx = np.asarray([i for i, cs in enumerate(captions) for _ in cs], np.int32)
    return idx, [c for cs in captions for c in cs]


def train_rows(seed: int, step: int, batch: int, n: int) -> np.ndarray:
    """Pair indices of training step ``step``: position p = step * B + r is item perm_{seed, p // n}[p % n]."""
    pos = step * batch + np.arange(batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


def normalise_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 (x / 255 - mean) / std."""
    return ((images.astype(np.float32) / 255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host arrays holding the whole global batch -> global jax.Arrays sharded over the batch axes (each process
    contributes the rows its devices hold)."""
    sh = sharding.batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        rows = pipeline.local_rows(sh, v.shape[0])
        out[k] = jax.make_array_from_process_local_data(sh, np.ascontiguousarray(v[rows]), v.shape)
    return out
