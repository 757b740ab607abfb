"""CLEVR VQA (Johnson et al. 2017) from the TFDS ``clevr`` dataset, version 3.1.0 (the one with question text).

TFDS stores one record per image with its questions as a sequence; the pipeline reads one record per question.
``QuestionSource`` flattens a split without copying an image per question: an index (built once per split by
reading the questions of every image record, cached as ``<data_dir>/clevr_questions/3.1.0/<split>.npz``) maps the
flat question index to its image record, and images are read from that record on demand. The image record's index
in the split is the question's ``image_id`` (image-grouped batches, data/grouped.py).

Answer vocabulary: the sorted distinct answers of the train split (28 on CLEVR v1.0). An answer absent from it
becomes label -1 (counted wrong by eval): the whole test split, whose answers TFDS stores as "" (CLEVR withholds
them), so evaluate on ``validation``.

Question types: TFDS keeps no question family, so ``question_type`` is one of Santoro et al.'s five, derived from
the answer and the question text (``question_type``): a number answers ``count``; an answer other than yes / no
answers ``query_attribute``; a yes / no question is ``compare_numbers`` if it contains one of the words "number",
"more", "fewer", "less", "greater" (CLEVR's compare-integer templates), ``exist`` if it contains "is there", "are
there" or "are any", else ``compare_attribute``.

Preparing the data needs TensorFlow and the network (TFDS's builder; docs/datasets.md); reading it needs neither.
"""

from __future__ import annotations

import io
import os
import re
import types

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

NAME = "clevr:3.1.0"  # 3.0.0 has no questions
SPLITS = ("train", "validation", "test")
TYPES = ("exist", "count", "compare_numbers", "query_attribute", "compare_attribute")
_COMPARE_NUMBERS = re.compile(r"\b(number|more|fewer|less|greater)\b")
_EXIST = re.compile(r"\b(is there|are there|are any)\b")
BUILD = (
    "pip install tensorflow tensorflow-datasets && "
    "tfds build clevr:3.1.0 --file_format=array_record --data_dir={data_dir}"
)


def question_type(question: str, answer: str) -> int:
    """Index in TYPES of a question with its answer (rules: module docstring)."""
    answer, question = answer.strip().lower(), question.lower()
    if answer.isdigit():
        return TYPES.index("count")
    if answer not in ("yes", "no"):
        return TYPES.index("query_attribute")
    if _COMPARE_NUMBERS.search(question):
        return TYPES.index("compare_numbers")
    return TYPES.index("exist" if _EXIST.search(question) else "compare_attribute")


def make_builder(data_dir: str, kwargs: dict) -> tfds.core.DatasetBuilder:
    """TFDS's clevr 3.1.0 builder (prepared separately: ``BUILD``)."""
    if kwargs:
        raise ValueError(f"dataset 'clevr' takes no builder_kwargs, got {sorted(kwargs)}")
    return tfds.builder(NAME, data_dir=data_dir)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _questions(record) -> tuple[list[str], list[str]]:
    """(questions, answers) of an image record: serialized (array_record) or already decoded (a dict)."""
    if isinstance(record, bytes):  # parse the two text lists only, not the image
        f = tf_example_pb2.Example.FromString(record).features.feature
        qs, ans = f["question_answer/question"].bytes_list.value, f["question_answer/answer"].bytes_list.value
    else:
        qs, ans = record["question_answer"]["question"], record["question_answer"]["answer"]
    # TFDS writes the pairs aligned; zip stops at the shorter list for sources that are not (tfds.testing.mock_data)
    return [_text(q) for q, _ in zip(qs, ans)], [_text(a) for _, a in zip(qs, ans)]  # noqa: B905


def _image(record) -> np.ndarray:
    """uint8 [H, W, 3] of an image record (CLEVR's PNGs are RGBA: alpha dropped)."""
    if not isinstance(record, bytes):
        return np.asarray(record["image"])
    png = tf_example_pb2.Example.FromString(record).features.feature["image"].bytes_list.value[0]
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def _index(images, cache: str) -> dict[str, np.ndarray]:
    """{"image_record" int64 [Q], "questions", "answers": str [Q]} of a split's image source, cached in ``cache``."""
    n = len(images)
    if os.path.exists(cache):
        with np.load(cache) as z:
            if int(z["num_images"]) == n:
                split = lambda k: z[k].tobytes().decode().split("\n") if len(z["image_record"]) else []  # noqa: E731
                return {"image_record": z["image_record"], "questions": split("questions"), "answers": split("answers")}
    print(f"Indexing the questions of {n} CLEVR images -> {cache} ...", flush=True)
    per_image = [_questions(images.data_source[r]) for r in range(n)]
    records = np.repeat(np.arange(n, dtype=np.int64), [len(q) for q, _ in per_image])
    out = dict(image_record=records, questions=[q for qs, _ in per_image for q in qs],
               answers=[a for _, ans in per_image for a in ans])  # fmt: skip
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp.npz"
    blobs = {k: np.frombuffer("\n".join(out[k]).encode(), np.uint8) for k in ("questions", "answers")}
    np.savez(tmp, image_record=records, num_images=n, **blobs)
    os.replace(tmp, cache)  # atomic: concurrent processes write the same content
    return out


class QuestionSource:
    """One record per question of a CLEVR split; looks like a tfds data source to the pipeline (len, [i],
    ``__getitems__``, ``dataset_info.features``, ``data_source``) plus ``image_ids()`` for the group plan.

    A record is a dict {"question": bytes, "answer": int (-1: not in the train vocabulary), "question_type": int,
    "image_id": int} whose "image" (uint8 [H, W, 3]) is read on first access. Picklable.
    """

    def __init__(self, images, index: dict, labels: list[str], builder_dir: str):
        self.images, self.builder_dir, self.data_source = images, builder_dir, self
        self.image_record = index["image_record"]  # [Q] int64
        self.questions = index["questions"]  # [Q] str
        lookup = {a: i for i, a in enumerate(labels)}
        self.answers = np.asarray([lookup.get(a, -1) for a in index["answers"]], np.int64)  # [Q]
        qtypes = [question_type(q, a) for q, a in zip(self.questions, index["answers"], strict=True)]
        self.question_types = np.asarray(qtypes, np.int64)  # [Q]
        f = tfds.features
        shape = self.image(0).shape if len(self) else (None, None, 3)
        features = dict(image=f.Image(shape=shape), question=f.Text(), answer=f.ClassLabel(names=labels))
        features.update(question_type=f.ClassLabel(names=TYPES), image_id=np.int64)
        self.dataset_info = types.SimpleNamespace(features=f.FeaturesDict(features))

    def __len__(self) -> int:
        return len(self.image_record)

    def image(self, q: int) -> np.ndarray:
        """uint8 [H, W, 3]: the image of question ``q``."""
        return _image(self.images.data_source[int(self.image_record[q])])

    def image_ids(self) -> np.ndarray:
        """int64 [Q]: each question's image (its record index in the split)."""
        return self.image_record.copy()

    def __getitem__(self, q: int) -> dict:
        fields = dict(question=self.questions[q].encode(), answer=int(self.answers[q]))
        return _Record(self, q, fields, question_type=int(self.question_types[q]), image_id=int(self.image_record[q]))

    def __getitems__(self, keys) -> list[dict]:
        return [self[int(q)] for q in keys]


class _Record(dict):
    """A question's fields; its "image" is read from the image record on first access (most reads skip it)."""

    def __init__(self, source: QuestionSource, q: int, fields: dict, **more):
        super().__init__(fields, **more)
        self._source, self._q = source, q

    def __missing__(self, key):
        if key != "image":
            raise KeyError(key)
        self["image"] = image = self._source.image(self._q)
        return image


_INDEXES: dict[tuple[str, int], dict] = {}  # (cache file, images) -> index: a split is indexed once per process


def question_source(builder: tfds.core.DatasetBuilder, split: str, data_dir: str) -> QuestionSource:
    """The QuestionSource of ``split`` (TFDS slicing allowed: "validation[:1000]" slices images) of the clevr
    ``builder``; the question index cache lives under the local folder ``data_dir``.

    Raises:
      FileNotFoundError: CLEVR is not prepared under the builder's folder (the message has the build command).
    """
    folder = os.path.join(data_dir, "clevr_questions", str(builder.version))
    sources = {}
    for s in dict.fromkeys(("train", split)):  # the answer vocabulary comes from the train split
        try:
            images = builder.as_data_source(split=s)
        except Exception as e:  # noqa: BLE001 (TFDS raises several types for a missing dataset)
            if (builder.data_path / "dataset_info.json").exists():
                raise
            hint = BUILD.format(data_dir=data_dir)
            raise FileNotFoundError(f"CLEVR is not prepared in {builder.data_path} ({e}); build it: {hint}") from e
        cache = os.path.join(folder, re.sub(r"[^\w.-]+", "_", s) + ".npz")
        if (cache, len(images)) not in _INDEXES:
            _INDEXES[cache, len(images)] = _index(images, cache)
        sources[s] = (images, _INDEXES[cache, len(images)])
    labels = sorted(set(sources["train"][1]["answers"]))
    images, index = sources[split]
    if index["answers"] and not any(index["answers"]):
        raise ValueError(f"CLEVR split {split!r} has no answers (CLEVR withholds the test answers): evaluate a "
                         "validation slice instead, e.g. configs/clevr.py's eval.split validation[1000:]")  # fmt: skip
    return QuestionSource(images, index, labels, str(builder.data_dir))
