"""VQA / multimodal classification: a VisionTextModel answering a question (or labelling a text) about an image.

Loss: (label-smoothed / focal) cross-entropy over the answer vocabulary (losses.classification_loss).
Evaluation: accuracy overall, per question type (and per family, Sort-of-CLEVR), the loss; with an output folder
also predictions.jsonl (question, answer, prediction, top 5), confusion_matrix.png and attention-map PNGs
(viz.py: what each fusion variant's attention shows, attention_maps.json indexes them).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from vtfusion_jax import losses, models, pretrained_init, sharding, viz
from vtfusion_jax import metrics as metrics_lib
from vtfusion_jax.data import manifest, pipeline, reader
from vtfusion_jax.data.tokenizer import Tokenizer
from vtfusion_jax.models import vision
from vtfusion_jax.models.vtfusion import VisionTextModel, shared_settings
from vtfusion_jax.tasks.base import Task


class PredictError(ValueError):
    """A bad input to predict (unreadable image, empty question): reported in one line, without a traceback."""


def predict_step(params, batch: dict, *, model, top_k: int = 5) -> dict:
    """Eval forward pass. Returns per-example {pred [B], loss [B], top_ids [B, k], top_probs [B, k]}."""
    logits = model.apply({"params": params}, batch, train=False)["logits"].astype(jnp.float32)
    k = min(top_k, logits.shape[-1])
    top_probs, top_ids = jax.lax.top_k(jax.nn.softmax(logits), k)
    # Label -1 (a validation / test label never seen in training): counted wrong, left out of the loss.
    label = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0))
    loss = jnp.where(label >= 0, loss, jnp.nan)
    return {"pred": jnp.argmax(logits, -1), "loss": loss, "top_ids": top_ids, "top_probs": top_probs}


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of any image PIL reads; PredictError (one line) for anything else."""
    try:  # the manifest builder's decoder: 16-bit, CMYK, alpha handled; 0-pixel and oversized images refused
        return np.asarray(manifest.decode_image(path))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise PredictError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None


class VqaTask(Task):
    main_metric = "accuracy"

    def __init__(self, config, mesh=None, workdir=None):
        super().__init__(config, mesh, workdir)
        d = config.dataset
        self.meta = pipeline.dataset_meta(d.name, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict())
        self.tokenizer = Tokenizer(d.tokenizer_path, max_len=d.max_len)
        self.model = self.build_model()

    def build_model(self, sow_weights: bool = False) -> VisionTextModel:
        spec = self.config.model.to_dict()
        spec["text_encoder"] = dict(spec["text_encoder"], vocab_size=int(self.tokenizer.vocab_size))
        if sow_weights:
            spec["fusion"] = dict(spec["fusion"], sow_weights=True)
        # towers with init_from take their architecture from the checkpoint
        return VisionTextModel(pretrained_init.resolve_model_spec(spec), int(self.meta["num_classes"]))

    def init_batch(self) -> dict:
        s, length = int(self.config.dataset.image_size or self.meta["image_shape"][0]), self.config.dataset.max_len
        return {"image": jnp.zeros((1, s, s, 3), jnp.float32), "text_ids": jnp.zeros((1, length), jnp.int32),
                "text_mask": jnp.ones((1, length), bool)}  # fmt: skip

    def loss(self, params, batch, rng):
        t = self.config.train
        return losses.classification_loss(
            self.model, params, batch, rng, label_smoothing=t.label_smoothing, focal_gamma=t.focal_gamma
        )

    def num_train_steps(self) -> int:
        """``train.num_steps`` if > 0, else ``num_epochs`` over the train split, rounded up to whole updates."""
        t, d = self.config.train, self.config.dataset
        accum = int(self.config.optim.accum_steps)
        if t.num_steps > 0:
            steps = int(t.num_steps)
        elif t.images_per_batch > 0:  # image-grouped batches: epochs come from the packing plan
            steps = self.group_plan().steps_for_epochs(t.num_epochs)
        else:
            n = self.meta["num_examples"][d.train_split.split("[")[0]]
            steps = math.ceil(t.num_epochs * n / t.global_batch_size)
        return int(math.ceil(steps / accum) * accum)

    def group_plan(self):
        """The train split's image-grouped batch plan, built once (it reads every record's image id)."""
        if "plan" not in self._eval_cache:
            t, d = self.config.train, self.config.dataset
            self._eval_cache["plan"] = pipeline.group_plan(
                dataset=d.name, split=d.train_split, seed=self.config.seed, global_batch_size=t.global_batch_size,
                images_per_batch=t.images_per_batch, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict(),
            )  # fmt: skip
        return self._eval_cache["plan"]

    def data_kwargs(self, split: str) -> dict:
        plan = split == self.config.dataset.train_split and self.config.train.images_per_batch > 0
        return dict(super().data_kwargs(split), **({"plan": self.group_plan()} if plan else {}))

    def eval_batches(self, split: str):
        """Every question of ``split`` once, the last batch padded; ``train.eval_images_per_batch`` > 0: in
        image-grouped batches (the split's own plan), each image encoded once."""
        t = self.config.train
        if t.eval_images_per_batch <= 0:
            return super().eval_batches(split)
        return pipeline.make_eval_iterator(
            global_batch_size=t.eval_batch_size, images_per_batch=t.eval_images_per_batch,
            **super().data_kwargs(split),  # never the training plan: the reader plans eval batches of this size
        )  # fmt: skip

    def predictions(self, params, split: str) -> tuple[dict, dict]:
        """Runs the model over ``split``.

        Returns:
          (summary {"accuracy", "loss", "num_examples", "per_type"}, per-example numpy arrays {"index", "label",
          "question_type", "pred", "top_ids", "top_probs"} over the valid rows, in record order). per_type holds the
          accuracy of each question type and, for datasets with question families (Sort-of-CLEVR), of each family.
        """
        if split not in self._eval_cache:
            replicated = sharding.replicated(self.mesh)
            fn = jax.jit(lambda p, b: predict_step(p, b, model=self.model), out_shardings=replicated)
            self._eval_cache[split] = (self.eval_batches(split), fn)
        batches, fn = self._eval_cache[split]
        keep = ("index", "label", "question_type", "family", "valid")
        rows: dict[str, list] = {k: [] for k in (*keep, "pred", "loss", "top_ids", "top_probs")}
        gather = jax.jit(lambda b: b, out_shardings=sharding.replicated(self.mesh))  # every process reads every row
        with jax.set_mesh(self.mesh), sharding.activation_rules():
            for batch in batches:
                host = gather({k: batch[k] for k in keep if k in batch})
                for k, v in {**jax.device_get(host), **jax.device_get(fn(params, batch))}.items():
                    rows[k].append(np.asarray(v))
        cat = {k: np.concatenate(v) for k, v in rows.items() if v}
        valid = cat.pop("valid").astype(bool)
        cat = {k: v[valid] for k, v in cat.items()}
        order = np.argsort(cat["index"], kind="stable")  # record order (image-grouped batches come by image)
        cat = {k: v[order] for k, v in cat.items()}
        per_type = lambda key, names: metrics_lib.per_type_accuracy(cat["pred"], cat["label"], cat[key], names)  # noqa: E731
        summary = {
            "accuracy": metrics_lib.accuracy(cat["pred"], cat["label"]),
            "loss": float(np.nanmean(cat["loss"])) if np.isfinite(cat["loss"]).any() else float("nan"),
            "num_examples": int(valid.sum()),
            "per_type": per_type("question_type", self.meta["type_names"]),
        }
        if "family" in cat and "family_names" in self.meta:
            summary["per_type"].update(per_type("family", self.meta["family_names"]))
        return summary, cat

    def evaluate(self, params, split: str, out_dir: str | None = None) -> dict:
        summary, rows = self.predictions(params, split)
        names = self.meta["label_names"]
        seen = rows["label"] >= 0  # label -1: unseen in training (manifest datasets), counted wrong above
        cm = metrics_lib.confusion_matrix(rows["pred"], rows["label"], len(names), valid=seen)
        summary.update(label_names=names, confusion_matrix=cm.tolist(), num_unseen_label=int((~seen).sum()))
        if out_dir is None or jax.process_index() != 0:
            return summary
        d = self.config.dataset
        source = pipeline.get_data_source(d.name, split, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict())
        text_key, type_names = self.meta["text_key"], self.meta["type_names"]
        decode = reader.RecordDecoder(source.dataset_info.features, [text_key])  # the question only, not the image
        raw = source.data_source.__getitems__([int(i) for i in rows["index"]])
        with (epath.Path(out_dir) / "predictions.jsonl").open("w") as f:
            for i, (idx, label, pred) in enumerate(zip(rows["index"], rows["label"], rows["pred"], strict=True)):
                top = zip(rows["top_ids"][i], rows["top_probs"][i], strict=True)
                row = {
                    "index": int(idx),
                    "question": reader._text(decode(raw[i])[text_key]),
                    "answer": names[label] if label >= 0 else None,  # None: unseen in training
                    "prediction": names[pred],
                    "correct": bool(pred == label),
                    "question_type": type_names[int(rows["question_type"][i])],
                    "top5": [[names[k], round(float(p), 5)] for k, p in top],
                }
                f.write(json.dumps(row) + "\n")
        title = f"{d.name} {split}: accuracy {summary['accuracy']:.4f}"
        with (epath.Path(out_dir) / "confusion_matrix.png").open("wb") as f:  # a file object: any epath workdir
            viz.save_confusion_matrix(f, cm, names, title)
        self._attention_maps(params, source, out_dir, min(int(self.config.eval.num_attention_maps), len(source)))
        return summary

    def attention_views(self, params, batch: dict) -> tuple[np.ndarray, viz.AttentionViews]:
        """(probs [B, C], viz.AttentionViews: every map the fusion variant offers) for a host batch."""
        if "sow" not in self._eval_cache:  # one compile per task (per input shape)
            sow = self.build_model(sow_weights=True)
            apply = jax.jit(lambda p, b: sow.apply({"params": p}, b, mutable=["intermediates"]))
            self._eval_cache["sow"] = (sow, apply)
        sow, apply = self._eval_cache["sow"]
        out, variables = apply(params, batch)
        probs = np.asarray(jax.nn.softmax(out["logits"]))
        encode = lambda p, b: sow.apply({"params": p}, b, method=lambda m, b: m.image_encoder(b["image"])[0])  # noqa: E731
        tokens = jax.eval_shape(encode, params, {"image": batch["image"]})
        intermediates = jax.device_get(variables.get("intermediates", {}))
        fusion = self.config.model.fusion.name
        views = viz.attention_views(intermediates, batch["text_mask"], int(tokens.shape[1]), fusion)
        return probs, views

    def token_grids(self) -> list[tuple[int, int]]:
        """(h, w) of each scale's image-token grid, in token order (one entry unless image_encoder.scales)."""
        spec = self.model.model_config
        encoder = models.get_image_encoder(spec["image_encoder"], shared_settings(spec))
        return [tuple(g) for g in vision.token_grids(encoder, (self.image_size, self.image_size))]

    def _host_batch(self, images_uint8: np.ndarray, questions: list[str]) -> dict:
        return {"image": self.normalize(images_uint8), **self.tokenizer(questions)}

    def _attention_maps(self, params, source, out_dir: str, n: int) -> None:
        """attention_XX.png for the first ``n`` examples and attention_maps.json: per PNG the question, the
        prediction, the panels drawn and the gate values of gated variants."""
        if n <= 0:
            return
        records = [source[i] for i in range(n)]
        images = np.stack([reader.resize(np.asarray(rec["image"]), self.image_size) for rec in records])
        questions = [reader._text(rec[self.meta["text_key"]]) for rec in records]
        batch = self._host_batch(images, questions)
        probs, views = self.attention_views(params, batch)
        fusion = self.config.model.fusion.name
        if views.text_to_image is None:
            print(f"fusion {fusion!r} has no question-to-image attention: no attention maps")
            return
        grids = self.token_grids()
        gates = viz.gate_values(params["fusion"]) if models.fusion_info(fusion).has_gates else []
        gate_note = f"\ngates tanh(alpha) per layer: {', '.join(f'{g:+.3f}' for g in gates)}" if gates else ""
        names, index = self.meta["label_names"], {}
        for i in range(n):
            ids = batch["text_ids"][i][batch["text_mask"][i]]
            tokens = [self.tokenizer.decode([t]) or "[special]" for t in ids]  # [CLS] / [SEP] decode to ""
            pred = names[int(np.argmax(probs[i]))]
            title = f"{fusion}: Q: {questions[i]}\npredicted: {pred}{gate_note}"
            png = f"attention_{i:02d}.png"
            with (epath.Path(out_dir) / png).open("wb") as f:
                panels = viz.save_attention_figure(f, images[i], views, i, grids, tokens, title)
            index[png] = {"question": questions[i], "prediction": pred, "fusion": fusion, "panels": panels}
            index[png].update({"gates": gates} if gates else {})
        (epath.Path(out_dir) / "attention_maps.json").write_text(json.dumps(index, indent=2))

    def predict(self, params, image_path: str, question: str, attention_map: str | None = None, top_k: int = 5):
        """Answers ``question`` about the image at ``image_path``.

        Returns:
          {"answer": str, "top": [(answer, probability), ...]}.

        Raises:
          PredictError: unreadable image, empty question, or an attention map asked of a variant without one.
        """
        if not question or not question.strip():
            raise PredictError("the question is empty")
        img = reader.resize(read_image(image_path), self.image_size)
        probs, views = self.attention_views(params, self._host_batch(img[None], [question.strip()]))
        names = self.meta["label_names"]
        order = np.argsort(-probs[0])[:top_k]
        if attention_map:
            if views.text_to_image is None:
                raise PredictError(f"fusion {self.config.model.fusion.name!r} has no question-to-image attention")
            q = question.strip()
            q = q if len(q) <= 200 else q[:200] + "..."  # a title, not the 100,000-character question
            title = f"Q: {q}\nA: {names[int(order[0])]}"
            viz.save_attention_map(attention_map, img, views.text_to_image[0], title, self.token_grids())
        return {"answer": names[int(order[0])], "top": [(names[int(k)], float(probs[0, k])) for k in order]}
