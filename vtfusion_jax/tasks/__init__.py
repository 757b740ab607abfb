"""Non-classification tasks, chosen by ``config.task``: "vqa" (train_lib / eval_lib), "retrieval", "caption".

train_and_evaluate(config, workdir)          train.py (via train_lib) for task != "vqa"
evaluate_split(config, workdir, split, ckpt) eval.py: writes workdir/eval/<split>/metrics.json (+ captions.jsonl)
caption_image / rank_captions                predict.py --caption / --retrieve
"""

from __future__ import annotations

import json
import os

import numpy as np

TASKS = ("vqa", "retrieval", "caption")


def task_name(config) -> str:
    """``config.task``; configs written before the field existed are "vqa"."""
    name = config.task if "task" in config else "vqa"
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {list(TASKS)}")
    return name


def make_task(config, workdir: str | None = None):
    from vtfusion_jax.tasks.caption import CaptionTask
    from vtfusion_jax.tasks.retrieval import RetrievalTask

    cls = {"retrieval": RetrievalTask, "caption": CaptionTask}[task_name(config)]
    return cls(config, workdir)


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains a retrieval / caption config in ``workdir`` (see tasks/loop.py)."""
    from vtfusion_jax.tasks import loop

    return loop.train(config, workdir, make_task(config))


def _load(config, workdir: str, checkpoint):
    from vtfusion_jax.tasks import loop

    task = make_task(config, workdir)
    params, step = loop.restore_params(config, task.model, task.init_batch, workdir, checkpoint, task.mesh)
    return task, params, step


def evaluate_split(config, workdir: str, split: str, checkpoint="best") -> dict:
    """Evaluates a saved checkpoint on ``split``; writes and returns workdir/eval/<split>/metrics.json."""
    from vtfusion_jax.tasks import data as data_lib

    task, params, step = _load(config, workdir, checkpoint)
    split_data = data_lib.load_split(config, split)
    name = task_name(config)
    if name == "caption":
        result = task.evaluate(params, split_data, ("greedy", "beam"), timing=bool(config.eval.measure_cache_speedup))
        result["beam_size"], result["length_penalty"] = int(config.eval.beam_size), float(config.eval.length_penalty)
        result["protocol"] = (
            "captions tokenised lowercase without punctuation; BLEU-4 corpus-level (closest reference length), "
            "CIDEr-D (coco-caption, sigma 6, idf from this split's references), exact match = equal to a reference"
        )
    else:
        result = task.evaluate(params, split_data)
        rule = config.eval.get("rerank_score", "itm")
        result["rerank_score"] = rule
        result["protocol"] = (
            "ITC score = cosine(text, image); ITM re-rank: the ITC top-k candidates of each query scored by "
            "logit(match) - logit(no match)"
            + (" + cosine(text, image) / temperature (the pair's ITC logit, as in BLIP)" if rule == "itm+itc" else "")
            + ", ranked above the rest (rerank_itm_only_*: the ITM log-odds alone); i2t hit when any caption of the "
            "image is in the top K, t2i hit when the caption's image is; ties count against the query"
        )
    result.update(task=name, split=split, checkpoint_step=int(step), num_examples=len(split_data["captions"]))
    out_dir = os.path.join(workdir, "eval", split)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    if name == "caption":
        with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
            for i, refs in enumerate(split_data["captions"]):
                row = {"index": i, "references": refs, **{m: c[i] for m, c in task.last_captions.items()}}
                f.write(json.dumps(row) + "\n")
    return result


def _read_image(task, path: str) -> np.ndarray:
    """uint8 [1, S, S, 3], decoded and resized like the manifest builder's training images."""
    from vtfusion_jax.data import manifest

    size = task.init_batch["image"].shape[1]
    return np.asarray(manifest.load_image(path, size), np.uint8)[None]


def caption_image(config, workdir: str, image_path: str, checkpoint="best", method: str = "beam") -> dict:
    """{"caption", "score"} for one image."""
    task, params, _ = _load(config, workdir, checkpoint)
    caps, scores = task.decode(params, _read_image(task, image_path), method)
    return {"caption": caps[0], "score": float(scores[0])}


def rank_captions(config, workdir: str, image_path: str, captions: list[str], checkpoint="best") -> list[dict]:
    """The captions ranked for one image: [{"caption", "itc", "itm"}], best ITM log-odds first."""
    import jax

    task, params, _ = _load(config, workdir, checkpoint)
    text_ids = np.stack([task.vocab.encode(t, config.dataset.max_len) for t in captions])
    with jax.set_mesh(task.mesh):
        image, image_mask, img_emb, text, text_mask, txt_emb = task._encode(
            params, _read_image(task, image_path), text_ids
        )
        n = len(captions)
        itm = task._itm_scores(params, image, image_mask, text, text_mask, np.zeros(n, int), np.arange(n))
    itc = (txt_emb @ img_emb.T)[:, 0]
    rows = [{"caption": c, "itc": float(a), "itm": float(b)} for c, a, b in zip(captions, itc, itm, strict=True)]
    return sorted(rows, key=lambda r: -r["itm"])
