"""TFDS builder for easy-VQA, read from the files of the installed `easy-vqa` package (no download).

easy-VQA (Victor Zhou, 2020): 64x64 RGB images of one coloured shape; questions about its colour, its shape and
yes/no questions; 13 answers. The package ships a train split (4,000 images, 38,575 questions) and a test split
(1,000 images, 9,673 questions). We hold out the questions of a fixed 10 % of the train *images* as `validation`
so that no image is in both train and validation; model selection must never look at `test`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 64
VALIDATION_FRACTION = 0.1
QUESTION_TYPES = ("yes_no", "color", "shape")
_YES_NO = ("yes", "no")
_SHAPES = ("circle", "rectangle", "triangle")


def package_data_dir() -> str:
    """Absolute path of `site-packages/easy_vqa/data` (answers.txt, {train,test}/{questions.json,images/})."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("easy_vqa needs the `easy-vqa` package: pip install easy-vqa==1.0")
    return os.path.join(os.path.dirname(spec.origin), "data")


def read_answers(data_dir: str | None = None) -> list[str]:
    """Returns the package's 13 answers in file order (the ClassLabel order)."""
    with open(os.path.join(data_dir or package_data_dir(), "answers.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def read_questions(split: str, data_dir: str | None = None) -> list[tuple[str, str, int]]:
    """Returns the package's (question, answer, image_id) triples of `split` ("train" or "test")."""
    with open(os.path.join(data_dir or package_data_dir(), split, "questions.json")) as f:
        return [(q, a, int(i)) for q, a, i in json.load(f)]


def question_type(answer: str) -> str:
    """Derives the question type from the answer: yes/no -> yes_no, a shape -> shape, otherwise color."""
    return "yes_no" if answer in _YES_NO else "shape" if answer in _SHAPES else "color"


def validation_image_ids(image_ids, fraction: float = VALIDATION_FRACTION) -> set[int]:
    """The fixed held-out train images: the set of `round(fraction * n)` of the n train `image_ids`, ordered by a
    salted SHA-256 of the id (fixed forever, independent of numpy's RNG)."""
    ids = sorted(set(int(i) for i in image_ids))
    key = lambda i: hashlib.sha256(f"easy_vqa/validation/{i}".encode()).hexdigest()
    return set(sorted(ids, key=key)[: round(fraction * len(ids))])


def split_questions(data_dir: str | None = None) -> dict[str, list[tuple[str, str, int]]]:
    """Returns {"train", "validation", "test"} -> (question, answer, image_id) lists, as the builder writes them."""
    train = read_questions("train", data_dir)
    val_ids = validation_image_ids(i for _, _, i in train)
    return {
        "train": [q for q in train if q[2] not in val_ids],
        "validation": [q for q in train if q[2] in val_ids],
        "test": read_questions("test", data_dir),
    }


def _png_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))  # reads only the header
    if img.mode == "RGB" and img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.format == "PNG":
        return data
    img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class EasyVqa(tfds.core.GeneratorBasedBuilder):
    """easy-VQA from the installed package: image, question, answer (13), question_type (3), image_id."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Package splits; validation = questions of a fixed 10% of train images."}

    def _info(self) -> tfds.core.DatasetInfo:
        f = tfds.features
        features = dict(image=f.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)), question=f.Text())
        features.update(answer=f.ClassLabel(names=read_answers()), question_type=f.ClassLabel(names=QUESTION_TYPES))
        features = f.FeaturesDict(dict(features, image_id=np.int32))
        homepage = "https://github.com/vzhou842/easy-VQA"
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features, homepage=homepage)

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is in the installed package
        root = package_data_dir()
        splits = split_questions(root)
        folder = lambda name: os.path.join(root, "test" if name == "test" else "train")  # noqa: E731
        return {name: self._generate_examples(rows, folder(name)) for name, rows in splits.items()}

    def _generate_examples(self, rows, split_dir):
        cache: dict[int, bytes] = {}  # ~10 questions per image: encode/read each PNG once
        for n, (question, answer, image_id) in enumerate(rows):
            if image_id not in cache:
                cache[image_id] = _png_bytes(os.path.join(split_dir, "images", f"{image_id}.png"))
            example = dict(question=question, answer=answer, question_type=question_type(answer), image_id=image_id)
            yield n, dict(example, image=cache[image_id])
