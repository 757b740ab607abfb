"""TFDS builder for user image-text data: JSON Lines manifests + an image folder (format and rules: docs/data.md).

A folder holds train.jsonl (required), validation.jsonl / test.jsonl and the images; a row is `{"image": ...,
"text": ..., "label": ...}` plus optional `"caption"`, `"question_type"`. Vocabularies are the sorted train values;
images become 8-bit RGB, resized (bilinear, no crop) to `image_size`. A bad row raises `ManifestError` naming line
and file unless `skip_bad_rows=True` (counted as `skipped_rows`); a validation / test label absent from train becomes
-1 (eval counts it wrong: `num_unseen_label`, stored as `unseen_label_rows`). Caption mode (`captions=True`, a
separate `..._captions` dataset): `image` and `caption` (a string or list of strings) required, `text` / `label`
optional. The config name hashes the manifests, so editing one builds a fresh dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import warnings

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SPLITS = ("train", "validation", "test")
DEFAULT_TYPE = "all"


class ManifestError(ValueError):
    """A bad manifest row; the message names the manifest file, line and image."""


@dataclasses.dataclass(eq=False)
class ManifestConfig(tfds.core.BuilderConfig):
    """Where the data lives and how to store it.

    Attributes:
      manifests: split -> absolute path of its .jsonl file.
      image_dir: absolute folder that image paths are relative to; no image may resolve outside it.
      image_size, skip_bad_rows, captions: as for ``manifest_config``.
    """

    manifests: dict = dataclasses.field(default_factory=dict)
    image_dir: str = ""
    image_size: int = 224
    skip_bad_rows: bool = False
    captions: bool = False


CAPTIONS_SUFFIX = "_captions"


def with_captions(config: ManifestConfig) -> ManifestConfig:
    """``config`` in caption mode (its name gets CAPTIONS_SUFFIX: a separate dataset)."""
    if config.captions:
        return config
    return dataclasses.replace(config, captions=True, name=config.name + CAPTIONS_SUFFIX)


def manifest_config(
    path: str, image_dir: str | None = None, image_size: int = 224, skip_bad_rows: bool = False, captions: bool = False
) -> ManifestConfig:
    """The config, named after the manifests' content and the options, of a dataset folder ``path`` holding
    train.jsonl [validation.jsonl, test.jsonl] (or of one .jsonl file, which becomes the train split).

    Args:
      image_dir: folder the rows' image paths are relative to (default: the folder of the manifests).
      image_size, skip_bad_rows, captions: stored square image size; skip and count bad rows instead of raising
        ManifestError; caption mode (module docstring).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        manifests = {s: os.path.join(path, f"{s}.jsonl") for s in SPLITS}
        manifests = {s: p for s, p in manifests.items() if os.path.exists(p)}
        folder = path
    elif os.path.isfile(path):
        manifests, folder = {"train": path}, os.path.dirname(path)
    else:
        raise FileNotFoundError(f"manifest path {path} does not exist")
    if "train" not in manifests:
        raise FileNotFoundError(f"{path} has no train.jsonl (the label vocabulary comes from the train split)")
    image_dir = os.path.abspath(os.path.expanduser(image_dir or folder))
    digest = hashlib.sha256(repr((sorted(manifests.items()), image_dir, image_size, skip_bad_rows)).encode())
    for split in sorted(manifests):
        with open(manifests[split], "rb") as f:
            digest.update(f.read())
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(folder).lower()).strip("_") or "data"
    name = f"{stem}_{digest.hexdigest()[:10]}"  # unchanged by caption mode: existing datasets keep their names
    kw = dict(manifests=manifests, image_dir=image_dir, image_size=int(image_size), skip_bad_rows=bool(skip_bad_rows))
    config = ManifestConfig(name=name, description=f"manifests {manifests}, images under {image_dir}", **kw)
    return with_captions(config) if captions else config


def _safe_path(image_dir: str, rel) -> str:
    """Resolves `rel` under `image_dir`, refusing absolute paths and anything that resolves outside it."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"'image' must be a non-empty relative path, got {rel!r}")
    if os.path.isabs(rel):
        raise ValueError(f"image path {rel!r} is absolute; paths must be relative to {image_dir}")
    full = os.path.realpath(os.path.join(image_dir, rel))
    if os.path.commonpath([full, os.path.realpath(image_dir)]) != os.path.realpath(image_dir):
        raise ValueError(f"image path {rel!r} leaves the dataset folder {image_dir}")
    return full


def _captions(row: dict) -> list[str]:
    """The row's captions (caption mode): a non-empty string or a non-empty list of non-empty strings."""
    if "caption" not in row or row["caption"] is None:
        raise ValueError(f"missing field 'caption' (image {row['image']!r}); caption mode needs one per row")
    caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
    if not caps or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"'caption' must be a string or a list of strings, got {row['caption']!r}")
    if not all(c.strip() for c in caps):
        raise ValueError(f"empty caption (image {row['image']!r})")
    return [" ".join(c.split()) for c in caps]  # newlines (the list separator in storage) become spaces


def parse_rows(manifest: str, image_dir: str, captions: bool = False) -> list[tuple[int, dict | None, str | None]]:
    """Cheap checks of every line of the .jsonl file ``manifest`` (no image decoding; image paths relative to
    ``image_dir``; ``captions``: caption mode, `caption` required, `text` / `label` optional, the row gets "captions":
    [str]). Returns (line, row dict with "path" added, None) for rows that pass, else (line, None, error message)."""
    out = []
    with open(manifest, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")
                if "image" not in row:
                    raise ValueError("missing field 'image'")
                label = row.get("label")
                if captions:
                    row = dict(row, captions=_captions(row))
                    row["text"] = row["text"] if isinstance(row.get("text"), str) else ""
                else:
                    if "text" not in row:
                        raise ValueError("missing field 'text'")
                    if not isinstance(row["text"], str):
                        raise ValueError(f"'text' must be a string, got {row['text']!r}")
                    if not row["text"].strip():
                        raise ValueError(f"empty text (image {row['image']!r})")
                    if label is None or str(label).strip() == "":
                        raise ValueError(f"empty label (image {row['image']!r})")
                path = _safe_path(image_dir, row["image"])
                if not os.path.isfile(path):
                    raise ValueError(f"image file not found: {path}")
            except ValueError as e:
                out.append((lineno, None, f"{where}: {e}"))
                continue
            has_label = label is not None and str(label).strip() != ""
            row = dict(row, label=str(label).strip() if has_label else None, path=path)
            if row.get("question_type") is not None:
                row["question_type"] = str(row["question_type"])
            out.append((lineno, row, None))
    return out


# PIL's decompression-bomb threshold; larger images are refused, not decoded (PIL would decode up to 2x of it).
MAX_IMAGE_PIXELS = 89_478_485


def decode_image(path, min_size: int | None = None) -> Image.Image:
    """Any PIL-readable image (path or file object) as 8-bit RGB: alpha composited over white, 16-bit channels
    scaled to 8 bits, CMYK / palette / grayscale converted; a JPEG much larger than ``min_size`` is decoded at a
    reduced scale (>= min_size). Raises ValueError for an image with no pixels or more than MAX_IMAGE_PIXELS (checked
    before decoding), OSError / PIL errors for unreadable, truncated or unsupported files."""
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x of its limit; we refuse those below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except Image.DecompressionBombError as e:  # PIL refuses > 2x its limit already when reading the header
        raise ValueError(f"image over the {MAX_IMAGE_PIXELS:,}-pixel limit ({e})") from None
    with opened as img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"image has no pixels ({w} x {h})")
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {w} x {h} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit")
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            img = Image.fromarray(np.clip(np.asarray(img, np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("RGB")


def load_image(path: str, size: int) -> Image.Image:
    """``decode_image`` resized to size x size (bilinear)."""
    img = decode_image(path, min_size=size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return img


class Manifest(tfds.core.GeneratorBasedBuilder):
    """User image-text data from JSON Lines manifests (see the module docstring).

    Args:
      captions: caption mode (from ``builder_kwargs``; the other manifest options make the config).
      **kwargs: tfds builder arguments (``config`` a ManifestConfig, ``data_dir``).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSON Lines manifest + image folder."}
    BUILDER_CONFIGS: list = []  # configs are made per dataset by manifest_config(...)

    def __init__(self, *, captions: bool = False, **kwargs):
        if captions:
            kwargs["config"] = with_captions(kwargs["config"])
        super().__init__(**kwargs)

    def _rows(self, split: str):
        cache = self.__dict__.setdefault("_row_cache", {})
        if split not in cache:
            cfg = self.builder_config
            cache[split] = parse_rows(cfg.manifests[split], cfg.image_dir, captions=cfg.captions)
        return cache[split]

    def _vocab(self, key: str, default: list[str]) -> list[str]:
        names = sorted({row[key] for _, row, _ in self._rows("train") if row and row.get(key) is not None})
        return names or default

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        labels = self._vocab("label", [])
        if not labels and not cfg.captions:  # caption mode: labels are optional (none at all is fine)
            raise ManifestError(f"{cfg.manifests['train']}: no valid row with a label; cannot build a vocabulary")
        s = cfg.image_size
        types = [DEFAULT_TYPE] if cfg.captions else self._vocab("question_type", [DEFAULT_TYPE])
        text, label = tfds.features.Text, tfds.features.ClassLabel
        features = dict(image=tfds.features.Image(shape=(s, s, 3)), text=text(), label=label(names=labels))
        features = tfds.features.FeaturesDict(
            dict(features, question_type=label(names=types), caption=text(), image_path=text(), line=np.int32)
        )
        meta = tfds.core.MetadataDict(skipped_rows={}, unseen_label_rows={})
        return tfds.core.DatasetInfo(builder=self, description=cfg.description, features=features, metadata=meta)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.manifests}

    def _generate_examples(self, split):
        cfg = self.builder_config
        labels = set(self.info.features["label"].names)
        types = self.info.features["question_type"].names
        skipped = unseen = 0

        def bad(message):
            nonlocal skipped
            if not cfg.skip_bad_rows:
                raise ManifestError(message + " (pass skip_bad_rows=True to skip bad rows)")
            logging.warning("manifest: skipping %s", message)
            skipped += 1

        for lineno, row, error in self._rows(split):
            if error is not None:
                bad(error)
                continue
            where = f"{cfg.manifests[split]}:{lineno}"
            qtype = row.get("question_type", DEFAULT_TYPE if types == [DEFAULT_TYPE] else None)
            label = row["label"]
            if cfg.captions:  # question types are not read in caption mode (the vocabulary is just "all")
                qtype = DEFAULT_TYPE
            if label is None and cfg.captions:
                label = -1  # no label: fine in caption mode (rows without one never reach here otherwise)
            elif label not in labels:
                if split == "train":  # cannot happen (the vocabulary is the train split's); kept as a guard
                    bad(f"{where}: label {label!r} does not occur in the train split")
                    continue
                logging.warning("manifest: %s: label %r does not occur in the train split; kept as -1", where, label)
                label, unseen = -1, unseen + 1  # kept: eval counts it wrong
            if qtype not in types:
                bad(f"{where}: question_type {qtype!r} is missing or not in the train split's {types}")
                continue
            try:
                image = load_image(row["path"], cfg.image_size)
            except Exception as e:  # PIL raises many types for corrupt files
                bad(f"{where}: cannot decode image file {row['path']}: {type(e).__name__}: {e}")
                continue
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            caption = "\n".join(row["captions"]) if cfg.captions else str(row.get("caption") or "")
            example = dict(text=row["text"], label=label, question_type=qtype, caption=caption, image_path=row["image"])
            yield lineno, dict(example, image=buf.getvalue(), line=lineno)
        self.info.metadata["skipped_rows"][split] = skipped
        self.info.metadata["unseen_label_rows"][split] = unseen
        if unseen:
            print(f"manifest: {unseen} rows of split {split!r} have a label unseen in train (kept with label -1)")
        if skipped:
            print(f"manifest: skipped {skipped} bad rows in split {split!r} ({cfg.manifests[split]})")
