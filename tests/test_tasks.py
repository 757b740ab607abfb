"""Retrieval and captioning end to end on a tiny Sort-of-CLEVR: train (through train_lib's task dispatch), evaluate
(metrics.json with the documented keys), predict (--retrieve ranks captions, --caption returns one)."""

import json
import os

import numpy as np
import train_testutil
from PIL import Image

from vtfusion_jax import tasks, train_lib
from vtfusion_jax.tasks import data as data_lib


def _config(name):
    c = train_testutil.load_config(name)
    c.dataset.builder_kwargs = dict(num_train=32, num_validation=8, num_test=8, seed=0)
    c.model.width = 16
    if c.task == "retrieval":  # ViT tower: 75 px / 15 = 5x5 tokens
        c.model.image_encoder = dict(c.model.image_encoder, depth=1, mlp_dim=32, num_heads=2)
        c.model.text_encoder = dict(c.model.text_encoder, depth=1, mlp_dim=32, num_heads=2)
        c.model.fusion = dict(c.model.fusion, num_layers=1, mlp_dim=32, num_heads=2)
        c.model.head = dict(c.model.head, embed_dim=8)
        c.eval.rerank_k = 4
    else:  # one device: the cross-device part (global-batch ITC) is the retrieval test's
        c.model.image_encoder = dict(c.model.image_encoder, channels=(4, 8, 8))
        c.mesh_shape = (1, 1, 1)
        c.model.head = dict(c.model.head, num_layers=1, mlp_dim=32, num_heads=2)
        c.eval.beam_size = 2
        c.eval.measure_cache_speedup = True
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.log_every_steps = 1
    c.train.eval_every_steps = 2
    c.train.checkpoint_every_steps = 2
    c.train.eval_batch_size = 8
    return c


def _scene_png(config, tmp_path):
    d = data_lib.load_split(config, "test")
    path = os.path.join(tmp_path, "scene.png")
    Image.fromarray(d["image"][0]).save(path)
    return path, d["captions"]


def test_retrieval_end_to_end(tmp_path):
    c = _config("sort_of_clevr_retrieval")
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)
    assert result["step"] == 2 and "accuracy" in result["val"]
    rows = train_testutil.read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert all(np.isfinite(r["train/itc_loss"]) for r in rows if "train/itc_loss" in r)
    m = tasks.evaluate_split(c, wd, "test", "latest")
    with open(os.path.join(wd, "eval", "test", "metrics.json")) as f:
        assert json.load(f)["rerank_t2i_R@1"] == m["rerank_t2i_R@1"]
    for prefix in ("itc_i2t", "itc_t2i", "rerank_i2t", "rerank_t2i"):
        recalls = [m[f"{prefix}_R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1.0, (prefix, recalls)  # R@K grows with K
    # Text -> image over 8 test images: the matching image is always within the top 10, even when the untrained
    # scores tie (ties rank pessimistically), with ITC alone and after ITM re-ranking of the top 4.
    assert m["itc_t2i_R@10"] == m["rerank_t2i_R@10"] == 1.0
    assert m["num_images"] == 8 and m["rerank_k"] == 4 and "protocol" in m
    png, captions = _scene_png(c, tmp_path)
    ranked = tasks.rank_captions(c, wd, png, [captions[0][0], captions[1][0], "a red circle"], "latest")
    assert len(ranked) == 3 and ranked[0]["itm"] >= ranked[-1]["itm"]


def test_caption_end_to_end(tmp_path):
    c = _config("sort_of_clevr_caption")
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)
    assert result["step"] == 2
    m = tasks.evaluate_split(c, wd, "test", "latest")
    for method in ("greedy", "beam"):
        for k in ("bleu4", "cider_d", "exact_match"):
            assert np.isfinite(m[f"{method}_{k}"])
    assert m["kv_cache_same_captions"] == 1.0 and m["kv_cache_speedup"] > 0
    lines = train_testutil.read_jsonl(os.path.join(wd, "eval", "test", "captions.jsonl"))
    assert len(lines) == 8 and {"greedy", "beam", "references"} <= set(lines[0])
    png, _ = _scene_png(c, tmp_path)
    out = tasks.caption_image(c, wd, png, "latest")
    assert isinstance(out["caption"], str) and np.isfinite(out["score"])
