"""Evaluation and prediction from a training workdir, for every task (the library behind eval.py / predict.py).

workdir/config.json + checkpoints/<best|latest|step> ─► train_lib.restore ─► (task, params)
  ─► evaluate_split: task.evaluate ─► workdir/eval/<split>/metrics.json (+ the task's files: VQA predictions.jsonl,
     confusion_matrix.png, attention_*.png; captioning captions.jsonl; its PNGs also as TensorBoard images there)
  ─► predict / caption / rank_captions: one image (+ question / captions)
"""

from __future__ import annotations

import json
import re
import time

import jax
import ml_collections
from etils import epath

from vtfusion_jax import metrics, preflight, train_lib
from vtfusion_jax.data import reader
from vtfusion_jax.tasks import PredictError
from vtfusion_jax.tasks.vqa import read_image  # public here too: export.predict decodes through it

__all__ = ["PredictError", "evaluate_split", "load_config", "predict", "read_image", "upgrade_config"]

# Fields added since older runs wrote their config.json, with the value that reproduces how those runs behaved.
# The one place where a missing field gets a default (library code reads every field directly).
UPGRADES = {
    "task": "vqa",
    "train.images_per_batch": 0,
    "train.nan_policy": "stop",
    "train.time_limit_seconds": 0,
    "train.steps_per_run": 0,
    "train.early_stopping_patience": 0,
    "train.prefetch": 2,
    "train.data_workers": 0,
    "train.progress_bar": False,
    "dataset.augment": False,
    "eval.num_attention_maps": 0,
    "train.compilation_cache_dir": "",
    "train.profile_steps": (0, 0),
}


def upgrade_config(raw: dict) -> dict:
    """A config.json dict with the fields older runs lack (UPGRADES) filled in."""
    raw = json.loads(json.dumps(raw))
    for key, value in UPGRADES.items():
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node.setdefault(leaf, value)
    return raw


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in ``workdir/config.json`` (upgraded, locked)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    hint = "; restore it from a copy of the run, or pass --config"
    raw = preflight.read_json(path, hint)
    try:
        c = ml_collections.ConfigDict(upgrade_config(raw))
        c.mesh_shape = tuple(c.mesh_shape)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # valid JSON, but not a run's config
        raise preflight.CorruptFileError(f"{path} is not a run config ({preflight.first_line(e)}){hint}") from None
    c.lock()
    return c


def _safe(split: str) -> str:
    """A folder name for a split spec like "validation[:256]"."""
    return re.sub(r"[^0-9A-Za-z.-]+", "_", split).strip("_")  # "test[:600]" -> "test_600"


def evaluate_split(config: ml_collections.ConfigDict, workdir: str, split: str, checkpoint="best") -> dict:
    """Evaluates a checkpoint on ``split`` and writes ``workdir/eval/<split>/metrics.json`` (+ the task's files).

    Returns:
      The metrics.json content: the task's metrics (VQA: "accuracy", "per_type", "loss", "confusion_matrix", ...)
      plus "task", "split", "num_examples", "checkpoint_step", "wall_seconds".
    """
    started = time.time()
    task, params, step = train_lib.restore(config, workdir, checkpoint)
    out_dir = f"{workdir}/eval/{_safe(split)}"
    out = epath.Path(out_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    pngs = lambda: {p.name: (p.stat().mtime, p.stat().length) for p in out.glob("*.png")}  # name -> (mtime, size)
    before = pngs()
    result = task.evaluate(params, split, out_dir)
    result.setdefault("num_examples", result.get("num_images"))  # retrieval / captioning: images
    result.update(task=config.task, split=split, checkpoint_step=int(step), wall_seconds=time.time() - started)
    if jax.process_index() == 0:
        (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        # The figures this evaluation wrote (not an earlier one's leftovers), as TensorBoard images in a run of
        # their own: a second writer in the training run's folder could hide the training events from TensorBoard.
        figures = sorted(name for name, stat in pngs().items() if before.get(name) != stat)
        if figures:
            writer = metrics.TensorBoardWriter(out_dir)
            writer.write_images(step, {f"eval/{split}/{n[:-4]}": (out / n).read_bytes() for n in figures})
            writer.close()
    return result


def predict(workdir: str, image_path: str, *, question: str | None = None, captions: list[str] | None = None,
            attention_map: str | None = None, checkpoint="best") -> dict:  # fmt: skip
    """One image through a trained model of any task.

    Args:
      workdir: training workdir (config.json + checkpoints).
      image_path: any image PIL reads.
      question: VQA: the question (returns {"answer", "top": [(answer, probability)]}).
      captions: retrieval: candidate captions (returns {"ranked": [{"caption", "itc", "itm"}]}, best first).
      attention_map: VQA: optional output PNG of the question's attention over the image.
      checkpoint: "best", "latest" or a step.

    Returns:
      The task's answer plus "checkpoint_step"; a caption run returns {"caption", "score"} (beam search).

    Raises:
      PredictError: unreadable image, empty question, or inputs the run's task does not take.
    """
    if question is not None and not question.strip():
        raise PredictError("the question is empty")
    image = read_image(image_path)
    config = load_config(workdir)
    if config.task == "vqa" and question is None:
        raise PredictError("a VQA run answers a question: give --question")
    if config.task == "retrieval" and not captions:
        raise PredictError("a retrieval run ranks captions: give --retrieve")
    task, params, step = train_lib.restore(config, workdir, checkpoint)
    if config.task == "vqa":
        out = task.predict(params, image_path, question, attention_map)
    elif config.task == "retrieval":
        out = {"ranked": task.rank_captions(params, reader.resize(image, task.image_size), captions)}
    else:
        out = task.caption_image(params, reader.resize(image, task.image_size))
    return dict(out, checkpoint_step=int(step))
