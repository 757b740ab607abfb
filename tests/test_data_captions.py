"""Retrieval and captioning on a user manifest (configs/sort_of_clevr_{retrieval,caption}.py:manifest=PATH): rows are
grouped by image (an image on several rows, or a list of captions, gives one image with several captions -- the
retrieval protocol's form); a row without a caption or with an unreadable image fails naming the manifest file and
line; a tiny generated dataset trains two steps of each task and evaluates."""

import json
import os

import numpy as np
import pytest
import train_testutil
from PIL import Image

from vtfusion_jax import eval_lib, train_lib
from vtfusion_jax.data import pipeline
from vtfusion_jax.data.captions import CaptionIndex
from vtfusion_jax.data.manifest import ManifestError

SIZE = 16
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def _write(folder, name, rows):
    with open(folder / name, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _dataset(folder):
    """Images of four colours; train has an image on two rows and a row with a list of captions."""
    (folder / "img").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        pixels = np.zeros((24, 24, 3), np.uint8) + np.asarray(rgb, np.uint8)
        pixels[8:16, 8:16] = 128  # a grey square in the middle
        Image.fromarray(pixels).save(folder / "img" / f"{name}.png")
    _write(
        folder,
        "train.jsonl",
        [
            {"image": "img/red.png", "caption": "a red picture"},
            {"image": "img/green.png", "caption": ["a green picture", "green all around"]},
            {"image": "./img/red.png", "caption": "red with a grey square"},  # same image, another spelling
            {"image": "img/blue.png", "caption": "a blue picture", "text": "unused", "label": "unused"},
            {"image": "img/white.png", "caption": "a white picture"},
        ],
    )
    pairs = [{"image": f"img/{c}.png", "caption": [f"a {c} picture", f"{c} everywhere"]} for c in COLOURS]
    _write(folder, "validation.jsonl", pairs[:2])
    _write(folder, "test.jsonl", pairs[1:])
    return folder


def _config(name, folder, **kw):
    c = train_testutil.load_config(f"sort_of_clevr_{name}", f"manifest={folder}")
    c.dataset.builder_kwargs.image_size = SIZE
    c.mesh_shape = (1, 1, 1)
    c.model.width = 16
    if name == "retrieval":  # ViT tower, 16 px / 4 = 4x4 tokens
        c.model.image_encoder = dict(c.model.image_encoder, patch_size=4, depth=1, mlp_dim=32, num_heads=2)
        c.model.text_encoder = dict(c.model.text_encoder, depth=1, mlp_dim=32, num_heads=2)
        c.model.fusion = dict(c.model.fusion, num_layers=1, mlp_dim=32, num_heads=2)
        c.model.head = dict(c.model.head, embed_dim=8)
        c.eval.rerank_k = 2
    else:
        c.model.image_encoder = dict(c.model.image_encoder, channels=(4, 8), strides=(2, 2))  # 16 px -> 16 tokens
        c.model.head = dict(c.model.head, num_layers=1, mlp_dim=32, num_heads=2)
        c.eval.beam_size = 2
        c.eval.measure_cache_speedup = False
    c.dataset.max_len = 8
    c.train.global_batch_size = 4
    c.train.num_steps = 2
    c.train.log_every_steps = 1
    c.train.eval_every_steps = 0
    c.train.checkpoint_every_steps = 100
    c.train.eval_batch_size = 4
    for k, v in kw.items():
        c.dataset.builder_kwargs[k] = v
    return c


def _index(config, split):
    d = config.dataset
    src = pipeline.get_data_source(d.name, split, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict())
    return src, CaptionIndex(src, split)


def test_manifest_split_groups_captions_by_image(tmp_path):
    folder = _dataset(tmp_path / "data")
    src, train = _index(_config("caption", folder), "train")
    assert train.captions == [
        ["a red picture", "red with a grey square"],
        ["a green picture", "green all around"],
        ["a blue picture"],
        ["a white picture"],
    ]
    for r, rgb in zip(train.records, COLOURS.values(), strict=True):  # resized to 16 px, grey centre kept
        img = src[int(r)]["image"]
        assert img.shape == (SIZE, SIZE, 3) and (img[0, 0] == rgb).all() and (img[SIZE // 2, SIZE // 2] == 128).all()
    assert list(train.pair_image) == [0, 0, 1, 1, 2, 3] and len(train.pair_text) == 6  # every caption with its image


@pytest.mark.parametrize(
    "row,message",
    [
        ({"image": "img/red.png", "text": "a question", "label": "x"}, r"missing field 'caption'"),
        ({"image": "img/red.png", "caption": ["fine", " "]}, r"empty caption"),
        ({"image": "img/broken.png", "caption": "unreadable"}, r"cannot decode image file .*img/broken\.png"),
    ],
)
def test_bad_caption_rows_name_the_file_and_line(tmp_path, row, message):
    folder = _dataset(tmp_path / "data")
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _write(folder, "train.jsonl", [{"image": "img/red.png", "caption": "ok"}, row])
    with pytest.raises(ManifestError, match=rf"{folder}/train\.jsonl:2: {message}"):
        _index(_config("caption", folder), "train")
    # skip_bad_rows: the row is dropped (and counted by the builder), the rest loads
    assert _index(_config("caption", folder, skip_bad_rows=True), "train")[1].captions == [["ok"]]


def test_missing_split_names_the_manifest(tmp_path):
    folder = _dataset(tmp_path / "data")
    os.remove(folder / "test.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no 'test' split .*add test\.jsonl"):
        _index(_config("caption", folder), "test")


def test_retrieval_trains_and_evaluates_on_a_manifest(tmp_path):
    c = _config("retrieval", _dataset(tmp_path / "data"))
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)  # train.py's dispatch to the task loop
    assert result["step"] == 2 and result["stop_reason"] == "num_steps"
    m = eval_lib.evaluate_split(c, wd, "test", "latest")
    # 3 test images with 2 captions each: image queries count a hit for either caption, text queries their image
    assert (m["num_images"], m["num_texts"], m["num_examples"]) == (3, 6, 3)
    for prefix in ("itc_i2t", "itc_t2i", "rerank_i2t", "rerank_t2i"):
        recalls = [m[f"{prefix}_R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] == 1.0, (prefix, recalls)  # 3 images: all in top 10
    with open(os.path.join(wd, "vocab.json")) as f:
        assert {"red", "grey", "green", "around"} <= set(json.load(f)["words"])  # from every grouped caption


def test_caption_trains_and_evaluates_on_a_manifest(tmp_path):
    c = _config("caption", _dataset(tmp_path / "data"))
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)
    assert result["step"] == 2 and np.isfinite(result["best_val"])
    m = eval_lib.evaluate_split(c, wd, "test", "latest")
    assert m["num_images"] == 3 and all(np.isfinite(m[f"{k}_bleu4"]) for k in ("greedy", "beam"))
    lines = train_testutil.read_jsonl(os.path.join(wd, "eval", "test", "captions.jsonl"))
    expected = [[f"a {c} picture", f"{c} everywhere"] for c in ("green", "blue", "white")]  # grouped, manifest order
    assert [r["references"] for r in lines] == expected
    assert all(isinstance(r["greedy"], str) and isinstance(r["beam"], str) for r in lines)
