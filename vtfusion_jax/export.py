"""A trained VQA / classification model as a self-contained folder (``jax.export``) that predict.py answers from
without the config or the model code.

``export_model`` (eval.py --export=DIR) restores a checkpoint and exports

    serve(params, image uint8 [B, S, S, 3], text_ids int32 [B, L], text_mask bool [B, L]) -> probs float32 [B, C]

with a symbolic batch B (one artifact, any batch size) and the image normalisation inside, lowered for the current
backend or for a list of platforms (("cpu", "cuda", "tpu") all lower on a CPU host). The folder holds:

    model.jax       the serialized jax.export.Exported (StableHLO + calling convention)
    params.msgpack  its first argument, the parameters (flax.serialization: any dtype, bfloat16 too). Kept out of
                    the module: baked in as constants, a ViT-B's weights would make a module of hundreds of MB that
                    XLA folds and copies at every compile, and the weights could not be read or swapped
    tokenizer.json  the run's tokenizer (HF tokenizers format, lower-casing and specials included)
    export.json     what predict needs: task, image_size, max_len, label_names, checkpoint_step, platforms (and
                    image_mean / image_std, applied inside the function, for reference)

``ExportedModel`` (load) needs only jax, flax and tokenizers: no TFDS, no config, no model code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import serialization

from vtfusion_jax import preflight
from vtfusion_jax.data.tokenizer import Tokenizer

__all__ = ["ExportError", "ExportedModel", "export_model", "predict"]

MODEL, PARAMS, TOKENIZER, META = "model.jax", "params.msgpack", "tokenizer.json", "export.json"


class ExportError(ValueError):
    """A run that cannot be exported (its task), or an artifact this machine cannot run (its platforms)."""


FORMAT = 1  # export.json "format": bumped when the folder's layout or the function's signature changes


def export_model(config, workdir: str, out_dir: str, checkpoint="best", platforms: Sequence[str] | None = None):
    """Exports ``workdir``'s checkpoint to ``out_dir`` (see the module docstring).

    Args:
      config: the run's config (eval_lib.load_config(workdir)).
      workdir, checkpoint: the run and its checkpoint ("best" | "latest" | a step).
      out_dir: the artifact folder (created; any epath).
      platforms: e.g. ("cpu", "cuda", "tpu"); None = the current backend. attention_impl "auto" resolves for the
        exporting host's backend (a GPU picks cuDNN for bf16, which lowers for CUDA only): export portable
        artifacts with model.attention_impl="xla".

    Returns:
      The export.json content.

    Raises:
      ExportError: a task other than "vqa" (retrieval ranks captions with two heads and captioning runs a
        beam search: neither is one fixed function of a batch).
    """
    from vtfusion_jax import train_lib  # exporting needs the model code; loading does not

    if config.task != "vqa":
        raise ExportError(f"export supports task 'vqa' (VQA / classification), not {config.task!r}")
    task, params, step = train_lib.restore(config, workdir, checkpoint)
    params = jax.device_get(params)  # host arrays: the artifact runs on one device, not the training mesh

    def serve(params, image, text_ids, text_mask):
        batch = {"image": task.normalize(image), "text_ids": text_ids, "text_mask": text_mask}
        return jax.nn.softmax(task.model.apply({"params": params}, batch, train=False)["logits"].astype(jnp.float32))

    (b,) = jax.export.symbolic_shape("batch")
    s, length = task.image_size, int(config.dataset.max_len)
    spec = jax.ShapeDtypeStruct
    args = (jax.tree.map(lambda x: spec(x.shape, x.dtype), params), spec((b, s, s, 3), jnp.uint8),
            spec((b, length), jnp.int32), spec((b, length), jnp.bool_))  # fmt: skip
    exported = jax.export.export(jax.jit(serve), platforms=platforms)(*args)
    meta = dict(format=FORMAT, task="vqa", checkpoint_step=int(step), platforms=list(exported.platforms),
                image_size=s, max_len=length, **{k: list(v) for k, v in task.image_norm.items()},
                label_names=list(task.meta["label_names"]), dataset=config.dataset.name,
                fusion=config.model.fusion.name, jax_version=jax.__version__)  # fmt: skip
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL).write_bytes(exported.serialize())
    (out / PARAMS).write_bytes(serialization.msgpack_serialize(params))
    (out / TOKENIZER).write_text(task.tokenizer.to_json())  # the loaded tokenizer, whatever file it came from
    (out / META).write_text(json.dumps(meta, indent=1))
    return meta


class ExportedModel:
    """An export_model folder, loaded: ``probs(images, questions)`` for batches, ``meta`` its export.json.

    Raises:
      FileNotFoundError: ``directory`` lacks one of the four files.
      CorruptFileError: an unreadable export.json, or one of another format or task.
      ExportError: not exported for this machine's platform.
    """

    def __init__(self, directory: str):
        d = epath.Path(directory)
        for name in (META, MODEL, PARAMS, TOKENIZER):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d / name} not found: is {directory} a folder written by eval.py --export?")
        meta = preflight.read_json(d / META)
        kind = (meta.get("format"), meta.get("task")) if isinstance(meta, dict) else (None, None)
        if kind != (FORMAT, "vqa"):
            raise preflight.CorruptFileError(f"{d / META}: format / task {kind}, this code reads ({FORMAT}, 'vqa')")
        self.meta = meta
        self.exported = jax.export.deserialize(bytearray((d / MODEL).read_bytes()))
        here = jax.export.default_export_platform()  # "cuda", not jax's "gpu": the names export uses
        if here not in self.exported.platforms:
            raise ExportError(f"{d / MODEL} was exported for {list(self.exported.platforms)}, this machine "
                                      f"runs {here}: export it again with --export_platforms=...,{here}")  # fmt: skip
        self.params = jax.device_put(serialization.msgpack_restore((d / PARAMS).read_bytes()))
        self.tokenizer = Tokenizer(str(d / TOKENIZER), max_len=int(self.meta["max_len"]))
        self.image_size, self.label_names = int(self.meta["image_size"]), list(self.meta["label_names"])

    def probs(self, images_uint8: np.ndarray, questions: Sequence[str]) -> np.ndarray:
        """Answer probabilities float32 [B, C] of uint8 images [B, S, S, 3] (S = ``image_size``) and B questions."""
        t = self.tokenizer(questions)
        out = self.exported.call(self.params, np.asarray(images_uint8, np.uint8), t["text_ids"], t["text_mask"])
        return np.asarray(out)


def predict(directory: str, image_path: str, question: str | None, top_k: int = 5) -> dict:
    """eval_lib.predict's answer from an exported folder: {"answer", "top": [(answer, probability)],
    "checkpoint_step"}.

    Raises:
      PredictError: unreadable image, missing or empty question.
    """
    from vtfusion_jax import eval_lib  # the training images' decoder and resize (TFDS-free callers feed
    from vtfusion_jax.data import reader  # ExportedModel.probs arrays)

    if question is None or not question.strip():
        raise eval_lib.PredictError("an exported VQA model answers a question: give a non-empty --question")
    img = eval_lib.read_image(image_path)
    model = ExportedModel(directory)
    probs = model.probs(reader.resize(img, model.image_size)[None], [question.strip()])[0]
    order = np.argsort(-probs)[:top_k]
    top = [(model.label_names[int(k)], float(probs[k])) for k in order]
    return {"answer": top[0][0], "top": top, "checkpoint_step": int(model.meta["checkpoint_step"])}
