"""easy-VQA: exact split sizes, image-disjoint validation, derived question types, stored images = package files."""

import collections
import os

import numpy as np
import pytest
from PIL import Image

from vtfusion_jax.data import datasets
from vtfusion_jax.data import easy_vqa as ev


def test_split_logic_on_package_files():
    splits = ev.split_questions()
    train, val, test = splits["train"], splits["validation"], splits["test"]
    assert len(train) + len(val) == 38575 and len(test) == 9673
    train_imgs, val_imgs = {q[2] for q in train}, {q[2] for q in val}
    assert not train_imgs & val_imgs
    assert len(train_imgs | val_imgs) == 4000 and len(val_imgs) == 400  # 10 % of the train images
    # Every question of a held-out image went to validation, in the package's order.
    package = ev.read_questions("train")
    assert [q for q in package if q[2] in val_imgs] == val
    assert sorted(package) == sorted(train + val)


def test_validation_choice_is_fixed():
    ids = range(4000)
    a = ev.validation_image_ids(ids)
    assert a == ev.validation_image_ids(reversed(list(ids)))  # order-independent
    assert a != set(range(400))  # not simply the first ids: spread over the split
    assert 0.05 < np.mean([i < 2000 for i in a]) < 0.95


def test_question_type_from_answer():
    answers = ev.read_answers()
    assert len(answers) == 13 and answers == [a.strip() for a in answers]
    types = collections.Counter(ev.question_type(a) for a in answers)
    assert types == {"yes_no": 2, "shape": 3, "color": 8}
    assert ev.question_type("yes") == "yes_no" and ev.question_type("triangle") == "shape"
    assert ev.question_type("teal") == "color"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # The real dataset (48k questions) builds in ~6 s; built once for this module.
    d = str(tmp_path_factory.mktemp("easy_vqa"))
    datasets.get_builder("easy_vqa", data_dir=d)
    return d


def test_built_split_sizes_and_meta(data_dir):
    meta = datasets.dataset_meta("easy_vqa", data_dir=data_dir)
    expected = {k: len(v) for k, v in ev.split_questions().items()}
    assert meta["num_examples"] == expected
    assert meta["num_examples"]["train"] + meta["num_examples"]["validation"] == 38575
    assert meta["num_examples"]["test"] == 9673
    assert meta["num_classes"] == 13 and meta["label_names"] == ev.read_answers()
    assert meta["type_names"] == ["yes_no", "color", "shape"] and meta["type_key"] == "question_type"
    assert meta["image_shape"] == (64, 64, 3)


def test_built_examples_match_package(data_dir):
    val_ids = ev.validation_image_ids(q[2] for q in ev.read_questions("train"))
    answers = ev.read_answers()
    root = ev.package_data_dir()
    for split in ("train", "validation", "test"):
        src = datasets.get_data_source("easy_vqa", split, data_dir=data_dir)
        package = collections.Counter(
            (q, a, i) for q, a, i in ev.read_questions("test" if split == "test" else "train")
        )
        rng = np.random.default_rng(0)
        for idx in rng.choice(len(src), size=60, replace=False):
            ex = src[int(idx)]
            key = (ex["question"].decode(), answers[ex["answer"]], ex["image_id"])
            assert package[key] > 0, key
            assert ["yes_no", "color", "shape"][ex["question_type"]] == ev.question_type(key[1])
            if split != "test":
                assert (ex["image_id"] in val_ids) == (split == "validation")
            folder = "test" if split == "test" else "train"
            with Image.open(os.path.join(root, folder, "images", f"{ex['image_id']}.png")) as im:
                np.testing.assert_array_equal(ex["image"], np.asarray(im.convert("RGB")))
