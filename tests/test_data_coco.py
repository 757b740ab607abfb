"""COCO captions in Karpathy's splits (vtfusion_jax/data/coco.py) and the two COCO configs, offline: the declared
split sizes at Karpathy's scale, a build from a tiny dataset_coco.json in Karpathy's schema with generated JPEGs
(restval in train, 5 captions per image grouped by image, pixels), clear errors, and configs/coco_retrieval.py /
configs/coco_caption.py training 3 steps and evaluating on that fixture."""

import json
import os

import numpy as np
import pytest
import train_testutil
from PIL import Image

from vtfusion_jax import eval_lib, train_lib
from vtfusion_jax.data import coco, datasets
from vtfusion_jax.data.captions import CaptionIndex

# (Karpathy split, image folder, number of captions) per fixture image; cocoid = 100 + position
FIXTURE = [("train", "train2014", 5)] * 4 + [("restval", "val2014", 6)] * 4 + [("val", "val2014", 5)] * 2
FIXTURE += [("test", "val2014", 5), ("test", "val2014", 7), ("test", "val2014", 5)]


def _colour(cocoid):
    return (cocoid * 37 % 256, cocoid * 91 % 256, cocoid * 53 % 256)


def _entry(n, split, folder, num_captions):
    cocoid = 100 + n
    raws = [f"A  photo {cocoid} number {k}.\n" for k in range(num_captions)]  # whitespace normalised when built
    sentences = [{"raw": r, "tokens": r.lower().split(), "imgid": n, "sentid": 10 * n + k} for k, r in enumerate(raws)]
    name = f"COCO_{folder}_{cocoid:012d}.jpg"
    return dict(filepath=folder, filename=name, split=split, cocoid=cocoid, imgid=n, sentences=sentences)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """A COCO folder: dataset_coco.json in Karpathy's schema + train2014/ and val2014/ JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("coco")
    images = [_entry(n, *spec) for n, spec in enumerate(FIXTURE)]
    for img in images:
        os.makedirs(root / img["filepath"], exist_ok=True)
        size = (40 + img["cocoid"] % 3 * 8, 30)
        Image.new("RGB", size, _colour(img["cocoid"])).save(root / img["filepath"] / img["filename"], quality=95)
    (root / coco.JSON_NAME).write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(root)


def test_declared_split_sizes_are_karpathys_and_checked():
    """At Karpathy's scale: train = 82,783 train + 30,504 restval = 113,287 images, validation and test 5,000 each;
    one image fewer fails naming the file and the counts."""
    assert coco.SPLIT_IMAGES == {"train": 113_287, "validation": 5_000, "test": 5_000}
    counts = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
    sentences = [{"raw": f"caption {k}", "tokens": ["caption", str(k)]} for k in range(5)]
    images = [
        dict(filepath="val2014", filename="x.jpg", split=split, cocoid=len(counts) * i + j, sentences=sentences)
        for j, (split, n) in enumerate(counts.items())
        for i in range(n)
    ]
    splits = coco.split_images(images, "/data/coco/dataset_coco.json")
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 113_287, "validation": 5_000, "test": 5_000}
    restval = {img["cocoid"] for img in images if img["split"] == "restval"}
    assert len(restval & {r["image_id"] for r in splits["train"]}) == 30_504  # restval goes to train
    with pytest.raises(coco.CocoError, match=r"/data/coco/dataset_coco.json: images per Karpathy split.*'test': 4999"):
        coco.split_images(images[:-1], "/data/coco/dataset_coco.json")
    assert len(coco.split_images(images[:-1], "f", max_images=3)["test"]) == 3  # a debugging subset: no check


def test_bad_entries_name_the_file_and_image():
    good = _entry(0, "test", "val2014", 5)
    with pytest.raises(coco.CocoError, match=r"f.json: images\[0\] \(cocoid 100\) has < 5 captions"):
        coco.split_images([dict(good, sentences=good["sentences"][:4])], "f.json", max_images=1)
    with pytest.raises(coco.CocoError, match=r"f.json: images\[0\] is not a Karpathy entry.*split"):
        coco.split_images([{k: v for k, v in good.items() if k != "split"}], "f.json", max_images=1)


def test_build_groups_five_captions_per_image(coco_dir, tmp_path):
    """Each split holds its images once (train = train + restval), each with its first 5 captions in order and its
    pixels resized to the stored square size."""
    kw = dict(path=coco_dir, image_size=16, max_images=100)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(coco.CocoError, match=f"{coco_dir}/dataset_coco.json: images per Karpathy split"):
        datasets.get_builder("coco", data_dir=data_dir, builder_kwargs=dict(kw, max_images=0))
    by_id = {100 + n: (split, num) for n, (split, _, num) in enumerate(FIXTURE)}
    expected = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}
    for split, theirs in expected.items():
        src = datasets.get_data_source("coco", split, data_dir=data_dir, builder_kwargs=kw)
        index = CaptionIndex(src, split)
        ids = [int(src[int(r)]["image_id"]) for r in index.records]
        assert sorted(ids) == sorted(i for i, (s, _) in by_id.items() if s in theirs)
        for i, caps, rec in zip(ids, index.captions, index.records, strict=True):
            assert caps == [f"A photo {i} number {k}." for k in range(5)]  # the first 5 of 5-7, in order
            image = src[int(rec)]["image"]
            assert image.shape == (16, 16, 3)
            assert np.abs(image.astype(int) - _colour(i)).max() <= 8  # JPEG, twice
        assert len(index.pair_text) == 5 * len(ids) and np.bincount(index.pair_image).tolist() == [5] * len(ids)


def test_missing_image_names_the_file(coco_dir, tmp_path):
    root = tmp_path / "coco"
    os.makedirs(root)
    images = [_entry(0, "test", "val2014", 5)]
    (root / coco.JSON_NAME).write_text(json.dumps({"images": images}))
    with pytest.raises(coco.CocoError, match=r"cannot read image .*val2014/COCO_val2014_000000000100.jpg"):
        datasets.get_builder("coco", data_dir=str(tmp_path / "tfds"), builder_kwargs=dict(path=str(root), max_images=1))


def _tiny(name, coco_dir):
    c = train_testutil.load_config(name, f"coco={coco_dir}")
    c.dataset.builder_kwargs.update(image_size=16, max_images=100)
    c.model.width = 16
    c.model.image_encoder = dict(c.model.image_encoder, patch_size=8, depth=1, num_heads=2, mlp_dim=32)
    if c.task == "retrieval":
        c.model.text_encoder = dict(c.model.text_encoder, depth=1, num_heads=2, mlp_dim=32)
        c.model.fusion = dict(c.model.fusion, num_layers=1, num_heads=2, mlp_dim=32)
        c.model.head = dict(c.model.head, embed_dim=8)
        c.eval.rerank_k = 2
    else:
        c.model.head = dict(c.model.head, num_layers=1, num_heads=2, mlp_dim=32)
        c.eval.beam_size = 2
    c.train.update(global_batch_size=8, num_steps=3, log_every_steps=1, eval_every_steps=3, eval_batch_size=8)
    c.train.checkpoint_every_steps = 3
    return c


def test_init_argument_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown init 'imagenet'; valid"):
        train_testutil.load_config("coco_retrieval", "init=imagenet")


# the retrieval run (16 s: ITC + ITM + re-ranking compile) is in the slow tier; the caption run (10 s) is not
@pytest.mark.parametrize("name", [pytest.param("coco_retrieval", marks=pytest.mark.slow), "coco_caption"])
def test_config_trains_3_steps_and_evaluates(name, coco_dir, tmp_path):
    """The config (shrunk by overrides) trains 3 steps and evaluates the test split: R@1/5/10 both ways on 3 images x
    15 captions; greedy and beam BLEU-4 / CIDEr-D against 5 references per image."""
    c = _tiny(name, coco_dir)
    wd = str(tmp_path / "run")
    assert train_lib.train_and_evaluate(c, wd)["step"] == 3
    m = eval_lib.evaluate_split(c, wd, "test", "latest")
    assert m["num_images"] == 3 and m["checkpoint_step"] == 3
    if name == "coco_retrieval":  # 3 test images x 15 captions, R@K both directions
        assert m["num_texts"] == 15
        for prefix in ("itc_i2t", "itc_t2i", "rerank_i2t", "rerank_t2i"):
            recalls = [m[f"{prefix}_R@{k}"] for k in (1, 5, 10)]
            assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] == 1.0, (prefix, recalls)  # 3 images: R@5 = 1
    else:
        assert all(np.isfinite(m[f"{method}_{k}"]) for method in ("greedy", "beam") for k in ("bleu4", "cider_d"))
        lines = train_testutil.read_jsonl(os.path.join(wd, "eval", "test", "captions.jsonl"))
        assert sorted(len(r["references"]) for r in lines) == [5, 5, 5]
