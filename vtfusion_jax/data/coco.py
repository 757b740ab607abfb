"""TFDS builder for COCO captions in Karpathy's splits (Karpathy & Fei-Fei, CVPR 2015), the splits VLP papers report
(CLIP, ALBEF, BLIP): train 113,287 images (82,783 "train" + 30,504 "restval"), validation 5,000, test 5,000.

Sources (docs/retrieval_captioning.md, "COCO"), under one folder ``path``: Karpathy's ``dataset_coco.json`` (from
caption_datasets.zip) and COCO 2014's ``train2014/`` and ``val2014/`` image folders (the JSON's ``filepath``).
One record per image: ``image`` (resized to a square ``image_size`` without a crop, bilinear, as ALBEF / BLIP resize;
stored as JPEG, quality 95), ``image_id`` (the COCO id), ``caption`` (its first ``captions_per_image`` raw captions,
newline-separated: the grouping data/captions.py reads; a few COCO images have 6 or 7, the 25,000-caption test set
keeps 5) and ``image_path`` (filepath/filename). The split sizes (SPLIT_IMAGES) are checked against the JSON before
any image is read, unless ``max_images`` (a debugging subset: the first images of each split, in JSON order) is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from vtfusion_jax.data import manifest

JSON_NAME = "dataset_coco.json"
SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}  # ours -> Karpathy's "split"
KARPATHY_IMAGES = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
SPLIT_IMAGES = {ours: sum(KARPATHY_IMAGES[k] for k in theirs) for ours, theirs in SPLITS.items()}


class CocoError(ValueError):
    """Bad or mismatching COCO sources; the message names the file."""


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
    """Attributes: path (folder of dataset_coco.json, train2014/, val2014/), image_size, captions_per_image,
    max_images: as for ``coco_config``."""

    path: str = ""
    image_size: int = 224
    captions_per_image: int = 5
    max_images: int = 0


def coco_config(path: str, image_size: int = 224, captions_per_image: int = 5, max_images: int = 0) -> CocoConfig:
    """The config of the COCO sources under ``path``, named after the options and the JSON's path and size.

    Args:
      path: folder holding dataset_coco.json, train2014/ and val2014/.
      image_size: stored square side in px.
      captions_per_image: captions kept per image (the first ones; an image with fewer raises CocoError).
      max_images: > 0: at most this many images per split and no split-size check (debugging subsets).
    """
    path = os.path.abspath(os.path.expanduser(path))
    source = os.path.join(path, JSON_NAME)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source} not found: put Karpathy's {JSON_NAME} and COCO's train2014/, val2014/ there")
    digest = hashlib.sha256(repr((source, os.path.getsize(source))).encode()).hexdigest()[:8]
    name = f"px{image_size}_cap{captions_per_image}" + (f"_first{max_images}" if max_images else "") + f"_{digest}"
    kw = dict(image_size=int(image_size), captions_per_image=int(captions_per_image), max_images=int(max_images))
    return CocoConfig(name=name, description=f"COCO Karpathy splits from {path}", path=path, **kw)


def split_images(images: list, where: str, captions_per_image: int = 5, max_images: int = 0) -> dict[str, list]:
    """Groups the ``images`` list of dataset_coco.json (read from ``where``, named in errors) into our splits.

    Returns:
      {"train" | "validation" | "test": [{"image_id", "image_path", "captions"}]} in JSON order.
    Raises:
      CocoError: a malformed entry, an image with too few captions, or (without ``max_images``) split sizes that
        differ from KARPATHY_IMAGES.
    """
    ours = {k: s for s, theirs in SPLITS.items() for k in theirs}
    out: dict[str, list] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(KARPATHY_IMAGES, 0)
    for n, img in enumerate(images):
        try:
            split, caps = ours[img["split"]], [c for c in (" ".join(s["raw"].split()) for s in img["sentences"]) if c]
            row = dict(image_id=int(img["cocoid"]), image_path=f"{img['filepath']}/{img['filename']}")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CocoError(f"{where}: images[{n}] is not a Karpathy entry ({type(e).__name__}: {e})") from None
        if len(caps) < captions_per_image:
            raise CocoError(f"{where}: images[{n}] (cocoid {row['image_id']}) has < {captions_per_image} captions")
        counts[img["split"]] += 1
        if not max_images or len(out[split]) < max_images:
            out[split].append(dict(row, captions=caps[:captions_per_image]))
    if not max_images and counts != KARPATHY_IMAGES:
        raise CocoError(
            f"{where}: images per Karpathy split {counts}, expected {KARPATHY_IMAGES} (train = train + restval = "
            f"{SPLIT_IMAGES['train']:,}); is it Karpathy's {JSON_NAME}? (builder_kwargs.max_images > 0 skips the check)"
        )
    return out


class CocoKarpathy(tfds.core.GeneratorBasedBuilder):
    """COCO captions, Karpathy splits (module docstring); ``config`` a CocoConfig (coco_config)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Karpathy's dataset_coco.json + COCO 2014 images; restval in train."}
    BUILDER_CONFIGS: list = []  # made per source folder by coco_config(...)

    def _info(self) -> tfds.core.DatasetInfo:
        s, f = self.builder_config.image_size, tfds.features
        features = f.FeaturesDict(dict(image=f.Image(shape=(s, s, 3), encoding_format="jpeg"), image_id=np.int64,
                                       caption=f.Text(), image_path=f.Text()))  # fmt: skip
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        where = os.path.join(cfg.path, JSON_NAME)
        try:
            with open(where, "rb") as f:
                images = json.load(f)["images"]
        except (ValueError, KeyError, TypeError) as e:
            raise CocoError(f"{where}: not Karpathy's JSON with an 'images' list ({type(e).__name__}: {e})") from None
        splits = split_images(images, where, cfg.captions_per_image, cfg.max_images)  # before reading any image
        return {split: self._generate_examples(rows) for split, rows in splits.items() if rows}  # subsets may lack one

    def _generate_examples(self, rows):
        cfg = self.builder_config
        for row in rows:
            path = os.path.join(cfg.path, row["image_path"])
            try:
                image = manifest.load_image(path, cfg.image_size)
            except Exception as e:  # PIL raises many types for missing / corrupt files
                raise CocoError(
                    f"cannot read image {path} (cocoid {row['image_id']}): {type(e).__name__}: {e}"
                ) from None
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            example = dict(image_id=row["image_id"], image_path=row["image_path"], caption="\n".join(row["captions"]))
            yield row["image_id"], dict(example, image=buf.getvalue())
