"""Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for relational reasoning", Appendix D).

A generator following the paper and the public generator (kimhc6028/relational-networks, sort_of_clevr_generator.py)
plus the TFDS builder that writes it. Each 75x75 RGB image (white background) holds 6 objects, one per colour
(red, green, blue, orange, gray, yellow), each a square (side 10: pixels [c-5, c+5], as cv2.rectangle draws it) or a
circle (radius 5: pixels with dx^2 + dy^2 < 5.5^2, the midpoint-circle rule, so both shapes span 11 pixels);
centres are integers uniform in [5, 70) and at least 10 px apart (x = column, y = row from the top).
Per image there are 10 non-relational and 10 relational questions, each about one colour X:

    non-relational  shape       shape of the X object                               square / circle
                    horizontal  is the X object on the left (x < 37.5)?             yes / no
                    vertical    is the X object on the top (y < 37.5)?              yes / no
    relational      closest     shape of the object closest to X                    square / circle
                    furthest    shape of the object furthest from X                 square / circle
                    count       how many other objects have the same shape as X?   0 .. 5

The 11-bit `question_code` is the public generator's: bits 0-5 one-hot colour, bit 6 non-relational, bit 7
relational, bits 8-10 one-hot subtype within the family. Deviation (documented): scenes in which some object's
closest or furthest object is tied are resampled, so every closest/furthest answer is well defined.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 75
NUM_OBJECTS = 6
HALF_SIZE = 5  # square half-side and circle radius
MIN_CENTRE, MAX_CENTRE = 5, 70  # centres uniform in [5, 70)
MIN_DISTANCE = 10
QUESTIONS_PER_FAMILY = 10
COLOR_NAMES = ("red", "green", "blue", "orange", "gray", "yellow")
COLORS_RGB = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 156, 0), (128, 128, 128), (255, 255, 0))
SHAPE_NAMES = ("square", "circle")
ANSWERS = ("yes", "no", "square", "circle", "0", "1", "2", "3", "4", "5")
FAMILIES = ("non_relational", "relational")
SUBTYPES = ("shape", "horizontal", "vertical", "closest", "furthest", "count")  # family * 3 + subtype bit
CODE_SIZE = 11
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
HOMEPAGE = "https://arxiv.org/abs/1706.01427"


def _sq_dists(xy: np.ndarray) -> np.ndarray:
    d = xy[:, None, :].astype(np.int64) - xy[None, :, :]
    return (d**2).sum(-1)  # [6, 6]


def _unambiguous(xy: np.ndarray) -> bool:
    d = _sq_dists(xy)
    for i in range(NUM_OBJECTS):
        others = np.delete(d[i], i)
        if (others == others.min()).sum() > 1 or (others == others.max()).sum() > 1:
            return False
    return True


def sample_objects(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Samples one scene with numpy Generator ``rng``: 6 objects, one per colour, centres >= 10 px apart, no
    closest/furthest ties. Returns {"color": int [6] (0..5, index into COLOR_NAMES), "shape": int [6] (0 square,
    1 circle), "x": int [6] (column), "y": int [6] (row)}.
    """
    while True:
        centres: list[np.ndarray] = []
        while len(centres) < NUM_OBJECTS:
            c = rng.integers(MIN_CENTRE, MAX_CENTRE, size=2)
            if all(((c - o) ** 2).sum() >= MIN_DISTANCE**2 for o in centres):
                centres.append(c)
        xy = np.stack(centres)  # [6, 2]
        shapes = rng.integers(0, 2, size=NUM_OBJECTS)
        if _unambiguous(xy):
            x, y = xy.T.astype(np.int32)
            return {"color": np.arange(NUM_OBJECTS, dtype=np.int32), "shape": shapes.astype(np.int32), "x": x, "y": y}


def render(objects: dict[str, np.ndarray]) -> np.ndarray:
    """Draws the scene (``sample_objects``) on a white background: uint8 [75, 75, 3]."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    for color, shape, x, y in zip(objects["color"], objects["shape"], objects["x"], objects["y"], strict=True):
        if shape == 0:
            img[y - HALF_SIZE : y + HALF_SIZE + 1, x - HALF_SIZE : x + HALF_SIZE + 1] = COLORS_RGB[color]
        else:
            img[(xx - x) ** 2 + (yy - y) ** 2 < (HALF_SIZE + 0.5) ** 2] = COLORS_RGB[color]
    return img


def question_code(color: int, family: int, subtype: int) -> np.ndarray:
    """The public generator's 11-bit question encoding, float32 [11]: one-hot ``color`` (0-5, the queried object's),
    one-hot ``family`` (6-7: non-relational, relational), one-hot ``subtype`` (8-10)."""
    code = np.zeros(CODE_SIZE, np.float32)
    code[[color, 6 + family, 8 + subtype]] = 1.0
    return code


def question_text(color: int, family: int, subtype: int) -> str:
    """English text of a question (see the module docstring)."""
    c = COLOR_NAMES[color]
    texts = [f"What is the shape of the {c} object?"] + [f"Is the {c} object on the {w}?" for w in ("left", "top")]
    texts += [f"What is the shape of the object {rel} the {c} object?" for rel in ("closest to", "furthest from")]
    texts.append(f"How many other objects have the same shape as the {c} object?")
    return texts[3 * family + subtype]


def answer(objects: dict[str, np.ndarray], color: int, family: int, subtype: int) -> int:
    """Computes the answer index into ANSWERS."""
    i = int(np.flatnonzero(objects["color"] == color)[0])
    shape, x, y = objects["shape"], objects["x"], objects["y"]
    if family == 0:
        if subtype == 0:
            return 2 + int(shape[i])
        pos = x[i] if subtype == 1 else y[i]
        return 0 if pos < IMAGE_SIZE / 2 else 1
    if subtype == 2:
        return 4 + int((shape == shape[i]).sum() - 1)
    d = _sq_dists(np.stack([x, y], -1))[i].astype(np.float64)
    d[i] = np.inf if subtype == 0 else -np.inf
    j = int(np.argmin(d) if subtype == 0 else np.argmax(d))
    return 2 + int(shape[j])


def caption(objects: dict[str, np.ndarray]) -> str:
    """Deterministic scene description: every object's colour, shape and coarse (3x3) position."""
    parts = []
    for color, shape, x, y in zip(objects["color"], objects["shape"], objects["x"], objects["y"], strict=True):
        row = ("top", "middle", "bottom")[min(int(y) * 3 // IMAGE_SIZE, 2)]
        col = ("left", "center", "right")[min(int(x) * 3 // IMAGE_SIZE, 2)]
        where = "the center" if (row, col) == ("middle", "center") else f"the {row} {col}"
        article = "an" if COLOR_NAMES[color][0] in "aeiou" else "a"
        parts.append(f"{article} {COLOR_NAMES[color]} {SHAPE_NAMES[shape]} at {where}")
    return ", ".join(parts).capitalize() + "."


def generate_image(seed: int, split: str, index: int) -> dict:
    """Image `index` of `split` ("train", "validation" or "test"), a pure function of (seed, split, index):
    {"image": uint8 [75, 75, 3], "objects": dict, "caption": str, "questions": list of 20 dicts with keys
       question, question_code, answer, family, subtype}.
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    objects = sample_objects(rng)
    questions = []
    for family in (0, 1):
        for _ in range(QUESTIONS_PER_FAMILY):
            color, sub = int(rng.integers(NUM_OBJECTS)), int(rng.integers(3))
            q = dict(question=question_text(color, family, sub), question_code=question_code(color, family, sub))
            q.update(answer=answer(objects, color, family, sub), family=family, subtype=family * 3 + sub)
            questions.append(q)
    return {"image": render(objects), "objects": objects, "caption": caption(objects), "questions": questions}


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding with PIL (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass(eq=False)
class SortOfClevrConfig(tfds.core.BuilderConfig):
    """Sizes (in images; 20 questions each) and generator seed. A different seed gives fresh images."""

    num_train: int = 9800
    num_validation: int = 200
    num_test: int = 200
    seed: int = 0


def config_from_kwargs(num_train=9800, num_validation=200, num_test=200, seed=0) -> SortOfClevrConfig:
    """A named config for the given sizes/seed ("default" for the paper's 9,800/200/200 with seed 0)."""
    sizes = dict(num_train=num_train, num_validation=num_validation, num_test=num_test, seed=seed)
    name = f"s{seed}_tr{num_train}_va{num_validation}_te{num_test}"
    return SortOfClevrConfig(name="default" if tuple(sizes.values()) == (9800, 200, 200, 0) else name, **sizes)


class SortOfClevr(tfds.core.GeneratorBasedBuilder):
    """Sort-of-CLEVR: one example per (image, question); 20 questions per image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Generator after Santoro et al. 2017 / kimhc6028; ambiguous scenes resampled."}
    BUILDER_CONFIGS = [config_from_kwargs()]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        f, n = tfds.features, NUM_OBJECTS
        features = dict(image=f.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)), image_id=np.int32, question=f.Text())
        features["question_code"] = f.Tensor(shape=(CODE_SIZE,), dtype=np.float32)
        labels = dict(answer=ANSWERS, family=FAMILIES, subtype=SUBTYPES)
        features.update({k: f.ClassLabel(names=list(v)) for k, v in labels.items()})
        objects = {k: f.Tensor(shape=(n,), dtype=np.int32) for k in ("color", "shape", "x", "y")}
        features["objects"] = f.FeaturesDict(objects)
        features = f.FeaturesDict(dict(features, caption=f.Text()))
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features, homepage=HOMEPAGE)

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split, num_images):
        seed = self.builder_config.seed
        for index in range(num_images):
            g = generate_image(seed, split, index)
            png = png_bytes(g["image"])
            for q, question in enumerate(g["questions"]):
                example = dict(image=png, image_id=index, objects=g["objects"], caption=g["caption"])
                yield f"{index}_{q}", dict(example, **question)
