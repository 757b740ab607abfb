"""Evaluation and single-example prediction from a training workdir (the library behind eval.py / predict.py).

workdir/config.json + checkpoints/<best|latest|step> ─► model + params
  ─► evaluate_split: workdir/eval/<split>/{metrics.json, predictions.jsonl, confusion_matrix.png, attention_*.png}
  ─► predict:        answer + top-5 probabilities (+ attention-map PNG) for one image and question
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from vtfusion_jax import checkpoint as ckpt_lib
from vtfusion_jax import metrics as metrics_lib
from vtfusion_jax import models, optim, pretrained_init, sharding, train_lib, viz
from vtfusion_jax.data import manifest, pipeline
from vtfusion_jax.models import vision
from vtfusion_jax.models.vtfusion import shared_settings

# predict() must feed what the pipeline feeds: (x / 255 - mean) / std with the model's image_normalization
# (pretrained_init: the pipeline's defaults, or a pretrained image tower's statistics).


class PredictError(ValueError):
    """A bad input to predict() (unreadable image, empty question): reported in one line, without a traceback."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in ``workdir/config.json`` (locked)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path) as f:
        c = ml_collections.ConfigDict(json.load(f))
    if "mesh_shape" in c:
        c.mesh_shape = tuple(c.mesh_shape)
    c.lock()
    return c


class Restored:
    """A trained model ready for inference: model (with attention maps sown), params, metadata, tokenizer."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, checkpoint: str | int | None = "best"):
        self.config = config
        self.mesh = sharding.make_mesh(config.mesh_shape)
        self.meta = train_lib.get_meta(config)
        self.tokenizer = train_lib.make_tokenizer(config)
        nc, vocab = self.meta["num_classes"], self.tokenizer.vocab_size
        self.model = train_lib.build_model(config, nc, vocab)
        self.sow_model = train_lib.build_model(config, nc, vocab, sow_weights=True)
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), best_metric="accuracy", read_only=True)
        self.step = ckpt_lib.resolve_step(ckpt, checkpoint)
        total = train_lib.num_train_steps(config, self.meta)
        tx, _ = optim.make_optimizer(config.optim, total // config.optim.accum_steps, optim.frozen_towers(config.model))
        target, self.state_shardings = train_lib.state_layout(config, self.model, tx, self.meta, self.mesh)
        state, _ = ckpt.restore(self.step, target)
        ckpt.close()
        self.params = state.params
        self.image_size = train_lib.image_size(config, self.meta)
        self.image_norm = pretrained_init.image_normalization(self.model.model_config)  # {image_mean, image_std}

    def attention(self, batch: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """(probs [B, C], image attention [B, N] or None) for a host batch of image / text_ids / text_mask."""
        probs, views = self.attention_views(batch)
        return probs, views.text_to_image

    def attention_views(self, batch: dict) -> tuple[np.ndarray, viz.AttentionViews]:
        """(probs [B, C], viz.AttentionViews: every map the fusion variant offers) for a host batch."""
        if getattr(self, "_sow_apply", None) is None:  # one compile per Restored (per input shape)
            self._sow_apply = jax.jit(
                lambda p, b: self.sow_model.apply({"params": p}, b, train=False, mutable=["intermediates"])
            )
        out, variables = self._sow_apply(self.params, batch)
        probs = np.asarray(jax.nn.softmax(out["logits"]))
        n = _num_image_tokens(self.sow_model, self.params, batch)
        views = viz.attention_views(jax.device_get(variables.get("intermediates", {})), batch["text_mask"], n)
        return probs, views

    def token_grids(self) -> list[tuple[int, int]]:
        """(h, w) of each scale's image-token grid, in token order (one entry unless image_encoder.scales)."""
        spec = self.model.model_config
        encoder = models.get_image_encoder(spec["image_encoder"], shared_settings(spec))
        return [tuple(g) for g in vision.token_grids(encoder, (self.image_size, self.image_size))]


def _num_image_tokens(model, params, batch) -> int:
    tokens = jax.eval_shape(
        lambda p, b: model.apply({"params": p}, b, method=lambda m, b: m.image_encoder(b["image"])[0]),
        params,
        {"image": batch["image"]},
    )
    return int(tokens.shape[1])


def _normalise(images_uint8: np.ndarray, norm: dict) -> np.ndarray:
    mean, std = (np.asarray(norm[k], np.float32) for k in ("image_mean", "image_std"))
    return ((images_uint8.astype(np.float32) / 255.0) - mean) / std


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def evaluate_split(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str,
    checkpoint: str | int | None = "best",
    num_attention_maps: int = 8,
) -> dict:
    """Evaluates a checkpoint on ``split`` and writes ``workdir/eval/<split>/`` (see the module docstring).

    Returns:
      The metrics.json content: {"accuracy", "num_examples", "checkpoint_step", "per_type", "loss", "split",
      "label_names", "confusion_matrix", "wall_seconds"}.
    """
    started = time.time()
    r = Restored(config, workdir, checkpoint)
    meta, t, d = r.meta, config.train, config.dataset
    batches = pipeline.make_eval_iterator(
        dataset=d.name,
        split=split,
        global_batch_size=t.eval_batch_size,
        mesh=r.mesh,
        tokenizer=r.tokenizer,
        image_size=d.image_size,
        data_dir=d.data_dir,
        builder_kwargs=d.builder_kwargs.to_dict(),
        **r.image_norm,
    )
    predict_fn = train_lib.make_predict_fn(r.model, r.mesh, r.state_shardings.params)
    summary, rows = train_lib.evaluate(predict_fn, r.params, batches, meta, r.mesh)
    names = meta["label_names"]
    seen = rows["label"] >= 0  # label -1: unseen in training (manifest datasets), counted wrong above
    cm = metrics_lib.confusion_matrix(rows["pred"], rows["label"], len(names), valid=seen)
    result = {
        "accuracy": summary["accuracy"],
        "num_examples": summary["num_examples"],
        "checkpoint_step": int(r.step),
        "per_type": summary["per_type"],
        "loss": summary["loss"],
        "split": split,
        "label_names": names,
        "confusion_matrix": cm.tolist(),
        "num_unseen_label": int((~seen).sum()),
    }
    if jax.process_index() != 0:
        return result
    out_dir = os.path.join(workdir, "eval", _safe(split))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    source = pipeline.get_data_source(d.name, split, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict())
    text_key, type_names = meta["text_key"], meta["type_names"]
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for i in range(len(rows["index"])):
            idx = int(rows["index"][i])
            f.write(
                json.dumps(
                    {
                        "index": idx,
                        "question": _text(source[idx][text_key]),
                        "answer": names[int(rows["label"][i])] if rows["label"][i] >= 0 else None,  # None: unseen
                        "prediction": names[int(rows["pred"][i])],
                        "correct": bool(rows["pred"][i] == rows["label"][i]),
                        "question_type": type_names[int(rows["question_type"][i])],
                        "top5": [
                            [names[int(k)], round(float(p), 5)]
                            for k, p in zip(rows["top_ids"][i], rows["top_probs"][i], strict=True)
                        ],
                    }
                )
                + "\n"
            )
    viz.save_confusion_matrix(
        os.path.join(out_dir, "confusion_matrix.png"),
        cm,
        names,
        f"{d.name} {split}: accuracy {summary['accuracy']:.4f} (step {r.step})",
    )
    _attention_maps(r, source, text_key, out_dir, min(num_attention_maps, len(source)))
    result["wall_seconds"] = time.time() - started
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def _attention_maps(r: Restored, source, text_key: str, out_dir: str, n: int) -> None:
    """attention_XX.png for the first ``n`` examples (what each variant's attention shows: viz.attention_views) and
    attention_maps.json: per PNG the question, the prediction, the panels drawn and the gated_cross gate values."""
    if n <= 0:
        return
    records = [source[i] for i in range(n)]
    images = np.stack([_resize(np.asarray(rec["image"]), r.image_size) for rec in records])
    questions = [_text(rec[text_key]) for rec in records]
    batch = {"image": _normalise(images, r.image_norm), **r.tokenizer(questions)}
    probs, views = r.attention_views(batch)
    fusion = r.config.model.fusion.name
    if views.text_to_image is None:
        print(f"fusion {fusion!r} has no question-to-image attention: no attention maps")
        return
    grids = r.token_grids()
    gates = viz.gate_values(r.params.get("fusion", {})) if fusion == "gated_cross" else []
    gate_note = f"\ngates tanh(alpha) per layer: {', '.join(f'{g:+.3f}' for g in gates)}" if gates else ""
    names, index = r.meta["label_names"], {}
    for i in range(n):
        ids = batch["text_ids"][i][batch["text_mask"][i]]
        tokens = [r.tokenizer.decode([t]) or "[special]" for t in ids]  # [CLS] / [SEP] decode to ""
        pred = names[int(np.argmax(probs[i]))]
        title = f"{fusion}: Q: {questions[i]}\npredicted: {pred}{gate_note}"
        png = f"attention_{i:02d}.png"
        panels = viz.save_attention_figure(os.path.join(out_dir, png), images[i], views, i, grids, tokens, title)
        index[png] = {"question": questions[i], "prediction": pred, "fusion": fusion, "panels": panels}
        index[png].update({"gates": gates} if gates else {})
    with open(os.path.join(out_dir, "attention_maps.json"), "w") as f:
        json.dump(index, f, indent=2)


def predict(
    workdir: str,
    image_path: str,
    question: str,
    attention_map: str | None = None,
    checkpoint: str | int | None = "best",
    top_k: int = 5,
) -> dict:
    """Answers ``question`` about the image at ``image_path``.

    Args:
      workdir: training workdir (config.json + checkpoints).
      image_path: any image PIL reads (converted to RGB, resized to the model's input size).
      question: non-empty question.
      attention_map: optional output PNG of the question's attention over the image.
      checkpoint: "best", "latest" or a step.
      top_k: number of ranked answers returned.

    Returns:
      {"answer": str, "top": [(answer, probability), ...], "checkpoint_step": int}.

    Raises:
      PredictError: unreadable image or empty question.
    """
    if not question or not question.strip():
        raise PredictError("the question is empty")
    try:  # the manifest builder's decoder: 16-bit, CMYK, alpha handled; 0-pixel and oversized images refused
        img = np.asarray(manifest.decode_image(image_path))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise PredictError(f"cannot read image {image_path!r}: {type(e).__name__}: {e}") from None
    r = Restored(load_config(workdir), workdir, checkpoint)
    img = _resize(img, r.image_size)
    batch = {"image": _normalise(img[None], r.image_norm), **r.tokenizer([question.strip()])}
    probs, att = r.attention(batch)
    names = r.meta["label_names"]
    order = np.argsort(-probs[0])[:top_k]
    if attention_map:
        if att is None:
            raise PredictError(f"fusion {r.config.model.fusion.name!r} has no question-to-image attention to draw")
        q = question.strip()
        q = q if len(q) <= 200 else q[:200] + "..."  # a title, not the 100,000-character question
        viz.save_attention_map(attention_map, img, att[0], f"Q: {q}\nA: {names[int(order[0])]}", r.token_grids())
    return {
        "answer": names[int(order[0])],
        "top": [(names[int(k)], float(probs[0, k])) for k in order],
        "checkpoint_step": int(r.step),
    }


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _safe(split: str) -> str:
    """A folder name for a split spec like "validation[:256]"."""
    return re.sub(r"[^0-9A-Za-z.-]+", "_", split).strip("_")  # "test[:600]" -> "test_600"
