"""The tasks (vtfusion_jax/tasks) through the one loop: retrieval and captioning end to end on a tiny Sort-of-CLEVR
(train with train_lib, evaluate with eval_lib: metrics.json with the documented keys, predict: ranked captions /
one caption), the caption data (data/captions.py: vocabulary, grouping of captions by image, exact-resume batches),
and the task registry."""

import os
import types

import numpy as np
import pytest
import train_testutil
from PIL import Image

from vtfusion_jax import eval_lib, tasks, train_lib
from vtfusion_jax.data import captions, pipeline


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


def _scene_png(config, workdir, tmp_path):
    task, _, _ = train_lib.restore(config, workdir, "latest")
    index = task.split_index("test")
    src = pipeline.get_data_source("sort_of_clevr", "test", data_dir=config.dataset.data_dir,
                                   builder_kwargs=config.dataset.builder_kwargs.to_dict())  # fmt: skip
    path = os.path.join(tmp_path, "scene.png")
    Image.fromarray(src[int(index.records[0])]["image"]).save(path)
    return path, index.captions


def test_retrieval_end_to_end(tmp_path):
    c = _config("sort_of_clevr_retrieval")
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)
    assert result["step"] == 2 and "rerank_mean_R@1" in result["val"]
    rows = train_testutil.read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert all(np.isfinite(r["train/itc_loss"]) for r in rows if "train/itc_loss" in r)
    m = eval_lib.evaluate_split(c, wd, "test", "latest")
    for prefix in ("itc_i2t", "itc_t2i", "rerank_i2t", "rerank_t2i"):
        recalls = [m[f"{prefix}_R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1.0, (prefix, recalls)  # R@K grows with K
    assert m["num_images"] == 8 and m["rerank_k"] == 4 and m["checkpoint_step"] == 2
    _check_known_ranks(c, wd)
    png, caps = _scene_png(c, wd, tmp_path)
    ranked = eval_lib.predict(wd, png, captions=[caps[0][0], caps[1][0], "a red circle"], checkpoint="latest")["ranked"]
    assert len(ranked) == 3 and ranked[0]["itm"] >= ranked[-1]["itm"]


def _check_known_ranks(config, workdir):
    """RetrievalTask.evaluate (its ranking, ITM re-ranking and recall) on constructed scores with known ranks: 12
    images (more than the largest K = 10) with two captions each; text t describes image t // 2, at ITC rank t // 2
    (even t) or t // 6 (odd t: ranks 0-3, three texts each). An ITM head that scores only matching pairs high lifts
    the answer of every query whose ITC rank is < rerank_k = 4 to rank 0 and leaves the other queries' ranks alone."""
    task, params, _ = train_lib.restore(config, workdir, "latest")
    n_img, n_txt = 12, 24
    text_image = np.arange(n_txt) // 2
    scores = np.zeros((n_txt, n_img))  # scores[t, i] = ITC score of text t with image i
    for t in range(n_txt):
        order = [i for i in range(n_img) if i != text_image[t]]
        order.insert(t // 2 if t % 2 == 0 else t // 6, text_image[t])
        scores[t, order] = -np.arange(n_img) - 1e-3 * t  # no ties, in rows or columns
    index = types.SimpleNamespace(pair_image=text_image, pair_text=[str(t) for t in range(n_txt)])
    task.split_index = lambda split: index
    task.map_images = lambda fn, p, split: (np.arange(n_img), None, np.eye(n_img))  # image i's embedding: e_i
    task.encode_texts = lambda p, texts: (text_image, None, scores)  # text t's embedding: row t
    task.itm_scores = lambda p, im, imm, tx, txm, img_idx, txt_idx: 10.0 * (im[img_idx] == tx[txt_idx])
    task.config.eval.rerank_score = "itm"
    m = task.evaluate(params, "test")

    # Ranks counted here independently of metrics_caption.retrieval_recall (ties would count against the query).
    t2i = [sum(scores[t, j] > scores[t, text_image[t]] for j in range(n_img)) for t in range(n_txt)]
    i2t = []
    for i in range(n_img):
        best = max(scores[t, i] for t in range(n_txt) if text_image[t] == i)
        i2t.append(sum(scores[t, i] > best for t in range(n_txt) if text_image[t] != i))
    assert t2i == [t // 2 if t % 2 == 0 else t // 6 for t in range(n_txt)]
    ranks = dict(itc_t2i=t2i, itc_i2t=i2t)
    ranks.update({f"rerank_{d}": [0 if r < 4 else r for r in ranks[f"itc_{d}"]] for d in ("t2i", "i2t")})
    for name, rk in ranks.items():
        for k in (1, 5, 10):
            assert m[f"{name}_R@{k}"] == pytest.approx(np.mean(np.array(rk) < k)), (name, k)
    assert m["itc_t2i_R@1"] == pytest.approx(4 / 24) and m["rerank_t2i_R@1"] == pytest.approx(16 / 24)


def test_caption_end_to_end(tmp_path):
    c = _config("sort_of_clevr_caption")
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)
    assert result["step"] == 2
    m = eval_lib.evaluate_split(c, wd, "test", "latest")
    for method in ("greedy", "beam"):
        for k in ("bleu4", "cider_d", "exact_match"):
            assert np.isfinite(m[f"{method}_{k}"])
    assert m["kv_cache_same_captions"] == 1.0 and m["kv_cache_speedup"] > 0
    lines = train_testutil.read_jsonl(os.path.join(wd, "eval", "test", "captions.jsonl"))
    assert len(lines) == 8 and {"greedy", "beam", "references"} <= set(lines[0])
    png, _ = _scene_png(c, wd, tmp_path)
    out = eval_lib.predict(wd, png, checkpoint="latest")
    assert isinstance(out["caption"], str) and np.isfinite(out["score"])


def test_unknown_task_lists_the_valid_ones():
    c = train_testutil.load_config("tiny")
    c.task = "segmentation"
    with pytest.raises(ValueError, match="caption.*retrieval.*vqa"):
        tasks.make_task(c)


def test_vocab_round_trip_and_truncation(tmp_path):
    v = captions.WordVocab.build(["a red circle", "a blue square, a red square"], max_len=5)
    assert v.words[4] == "a"  # the most frequent word first
    path = str(tmp_path / "vocab.json")
    v.save(path)
    w = captions.WordVocab.load(path, max_len=5)
    ids = w.encode("a red circle is here")  # [BOS] a red circle [EOS]: truncated, EOS kept last
    assert list(ids) == [w.bos_id, w.index["a"], w.index["red"], w.index["circle"], w.eos_id]
    assert w.decode(ids) == "a red circle" and w.decode([w.bos_id, w.unk_id, w.eos_id, w.index["a"]]) == "[UNK]"
    batch = w(["a", "red circle"])
    assert batch["text_ids"].shape == (2, 5) and batch["text_mask"].sum(1).tolist() == [3, 4]


def test_caption_batches_are_exact_pairs_and_resume(tmp_path):
    """Training batches pair each image with its own caption, cover every pair once per epoch, and the batch at step
    s is the same whether the iterator started at 0 or at s (exact resume)."""
    c = _config("sort_of_clevr_caption")
    c.mesh_shape = (-1, 1, 1)
    task = tasks.make_task(c)
    index = task.split_index("train")
    assert len(index.records) == 32 and all(len(cs) == 1 for cs in index.captions)  # 20 questions, one caption
    it = task.train_iter(0)
    ids = [np.asarray(next(it)["image_id"]) for _ in range(4)]  # one epoch: 32 pairs / 8
    it.close()
    assert sorted(np.concatenate(ids).tolist()) == list(range(32))
    later = task.train_iter(3)
    assert np.array_equal(np.asarray(next(later)["image_id"]), ids[3])
    later.close()
