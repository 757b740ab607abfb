"""Sort-of-CLEVR: answers recomputed independently from `objects`, pixels, geometry, codes, determinism, builder."""

import hashlib
import math
import pathlib

import numpy as np
import pytest

from vtfusion_jax.data import datasets
from vtfusion_jax.data import sort_of_clevr as soc

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "orange": (255, 156, 0),
          "gray": (128, 128, 128), "yellow": (255, 255, 0)}  # fmt: skip
ANSWERS = ["yes", "no", "square", "circle", "0", "1", "2", "3", "4", "5"]
KWARGS = dict(num_train=6, num_validation=2, num_test=3, seed=7)


def reference_answer(objs, code):
    """Independent re-implementation from the spec: decode the 11-bit code, answer from the object list."""
    assert code.shape == (11,) and set(np.unique(code)) <= {0.0, 1.0}
    assert code[:6].sum() == 1 and code[6:8].sum() == 1 and code[8:].sum() == 1
    colour, relational, sub = int(np.argmax(code[:6])), bool(code[7]), int(np.argmax(code[8:]))
    me = next(o for o in objs if o["color"] == colour)
    shape = lambda o: "square" if o["shape"] == 0 else "circle"
    if not relational:
        if sub == 0:
            return shape(me)
        coord = me["x"] if sub == 1 else me["y"]
        return "yes" if coord < 37.5 else "no"
    others = [o for o in objs if o is not me]
    if sub == 2:
        return str(sum(shape(o) == shape(me) for o in others))
    dist = lambda o: math.hypot(o["x"] - me["x"], o["y"] - me["y"])
    pick = min(others, key=dist) if sub == 0 else max(others, key=dist)
    return shape(pick)


def as_list(objects):
    return [{k: int(objects[k][i]) for k in ("color", "shape", "x", "y")} for i in range(len(objects["color"]))]


def reference_render(objs):
    """Independent drawing from the spec: white canvas, squares [c-5, c+5], discs dx^2+dy^2 <= 30, colour order."""
    img = np.full((75, 75, 3), 255, np.uint8)
    for o in sorted(objs, key=lambda o: o["color"]):
        rgb = COLORS[soc.COLOR_NAMES[o["color"]]]
        for y in range(75):
            for x in range(75):
                dx, dy = x - o["x"], y - o["y"]
                inside = max(abs(dx), abs(dy)) <= 5 if o["shape"] == 0 else dx * dx + dy * dy <= 30
                if inside:
                    img[y, x] = rgb
    return img


def check_scene(image, objects, full=False):
    objs = as_list(objects)
    assert image.shape == (75, 75, 3) and image.dtype == np.uint8
    assert sorted(o["color"] for o in objs) == list(range(6))
    for o in objs:
        assert 5 <= o["x"] < 70 and 5 <= o["y"] < 70
        name = soc.COLOR_NAMES[o["color"]]
        assert tuple(image[o["y"], o["x"]]) == COLORS[name], name  # row = y, column = x
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= 10
    if full:  # slow pure-Python raster: only on a few scenes
        np.testing.assert_array_equal(image, reference_render(objs))


def test_generated_images_answers_and_geometry():
    fam_counts = np.zeros(2, int)
    for index in range(150):
        g = soc.generate_image(seed=3, split="train", index=index)
        check_scene(g["image"], g["objects"], full=index < 3)
        assert len(g["questions"]) == 20
        for q in g["questions"]:
            assert ANSWERS[q["answer"]] == reference_answer(as_list(g["objects"]), q["question_code"])
            assert q["family"] == int(q["question_code"][7])
            assert q["subtype"] == 3 * q["family"] + int(np.argmax(q["question_code"][8:]))
            colour = soc.COLOR_NAMES[int(np.argmax(q["question_code"][:6]))]
            assert f" {colour} object" in q["question"]
            fam_counts[q["family"]] += 1
    assert fam_counts.tolist() == [1500, 1500]  # 10 non-relational + 10 relational per image


def test_answer_distribution_covers_vocabulary():
    seen = {q["answer"] for i in range(100) for q in soc.generate_image(0, "train", i)["questions"]}
    assert seen == set(range(10))


def test_caption_names_every_object():
    g = soc.generate_image(0, "test", 5)
    for o in as_list(g["objects"]):
        assert f"{soc.COLOR_NAMES[o['color']]} {soc.SHAPE_NAMES[o['shape']]} at the " in g["caption"]
    assert soc.generate_image(0, "test", 5)["caption"] == g["caption"]


def test_seed_determinism_at_generator_level():
    a = soc.png_bytes(soc.generate_image(11, "train", 4)["image"])
    assert a == soc.png_bytes(soc.generate_image(11, "train", 4)["image"])
    assert a != soc.png_bytes(soc.generate_image(12, "train", 4)["image"])
    assert a != soc.png_bytes(soc.generate_image(11, "test", 4)["image"])  # splits are disjoint streams


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("soc")
    dirs = [root / "a", root / "b", root / "c"]
    datasets.get_builder("sort_of_clevr", data_dir=str(dirs[0]), builder_kwargs=KWARGS)
    datasets.get_builder("sort_of_clevr", data_dir=str(dirs[1]), builder_kwargs=KWARGS)
    datasets.get_builder("sort_of_clevr", data_dir=str(dirs[2]), builder_kwargs=dict(KWARGS, seed=8))
    return dirs


def _file_digests(data_dir):
    files = sorted(pathlib.Path(data_dir).rglob("*.array_record*"))
    assert files
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_builder_splits_and_stored_answers(built):
    meta = datasets.dataset_meta("sort_of_clevr", data_dir=str(built[0]), builder_kwargs=KWARGS)
    assert meta["num_examples"] == {"train": 120, "validation": 40, "test": 60}
    assert meta["label_names"] == ANSWERS and meta["type_key"] == "subtype"
    assert meta["image_shape"] == (75, 75, 3) and meta["family_names"] == ["non_relational", "relational"]
    src = datasets.get_data_source("sort_of_clevr", "train", data_dir=str(built[0]), builder_kwargs=KWARGS)
    per_image = {}
    for i in range(len(src)):
        ex = src[i]
        assert ANSWERS[ex["answer"]] == reference_answer(as_list(ex["objects"]), ex["question_code"])
        per_image.setdefault(ex["image_id"], []).append(ex["family"])
        check_scene(ex["image"], ex["objects"], full=i < 2)
        assert ex["caption"].decode().count(" at the ") == 6
    assert sorted(per_image) == list(range(6)) and all(sorted(f) == [0] * 10 + [1] * 10 for f in per_image.values())


def test_same_seed_identical_bytes_other_seed_differs(built):
    a, b, c = (_file_digests(d) for d in built)
    assert a == b
    assert set(a) == set(c) and all(a[k] != c[k] for k in a)
    src_a = datasets.get_data_source("sort_of_clevr", "test", data_dir=str(built[0]), builder_kwargs=KWARGS)
    kw_c = dict(KWARGS, seed=8)
    src_c = datasets.get_data_source("sort_of_clevr", "test", data_dir=str(built[2]), builder_kwargs=kw_c)
    imgs_a = {ex["image"].tobytes() for ex in src_a.__getitems__(list(range(len(src_a))))}
    imgs_c = {ex["image"].tobytes() for ex in src_c.__getitems__(list(range(len(src_c))))}
    assert len(imgs_a) == 3 and not imgs_a & imgs_c  # a fresh held-out set


def test_held_out_splits_do_not_share_images(built):
    kw = dict(data_dir=str(built[0]), builder_kwargs=KWARGS)
    images = {}
    for split in ("train", "validation", "test"):
        src = datasets.get_data_source("sort_of_clevr", split, **kw)
        images[split] = {ex["image"].tobytes() for ex in src.__getitems__(list(range(len(src))))}
    assert not images["train"] & images["validation"] and not images["train"] & images["test"]
    assert not images["validation"] & images["test"]
