"""Captioning task: teacher-forced training with label smoothing and the captioning evaluation.

Training: input [BOS] w1 .. wn, target w1 .. wn [EOS]; loss = mean label-smoothed cross-entropy over the target
tokens (padding excluded). Evaluation decodes every image greedily and with beam search (decoding.py, KV cache) and
scores the captions against the references with BLEU-4, CIDEr-D and exact match (metrics_caption.py). With
``eval.measure_cache_speedup`` the greedy decoding of the split is also timed without the cache (same tokens
required) and the speed ratio is reported.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vtfusion_jax import decoding, metrics_caption
from vtfusion_jax.models.caption import CaptionModel
from vtfusion_jax.tasks import data as data_lib
from vtfusion_jax.tasks.common import TaskBase


class CaptionTask(TaskBase):
    main_metric = "greedy_cider_d"

    def build_model(self):
        if self.config.model.head.max_len < self.config.dataset.max_len:
            raise ValueError("model.head.max_len must be >= dataset.max_len")
        return CaptionModel(self.config.model.to_dict(), self.vocab.size)

    def init_batch_extra(self):
        return {"caption_in": jnp.zeros((1, self.config.dataset.max_len - 1), jnp.int32)}

    def host_batch(self, step: int) -> dict:
        d = self.train_data
        rows = data_lib.train_rows(self.config.seed, step, self.config.train.global_batch_size, len(d["text_image"]))
        ids = d["text_ids"][rows]  # [B, L]: [BOS] words [EOS] [PAD]...
        return {
            "image": data_lib.normalise_images(d["image"][d["text_image"][rows]], *self.norm),
            "caption_in": ids[:, :-1],
            "caption_out": ids[:, 1:],
        }

    def loss(self, params, batch, rng):
        out = self.model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})["logits"]  # [B, T, V]
        target = batch["caption_out"]
        valid = (target != self.vocab.pad_id).astype(jnp.float32)
        onehot = optax.smooth_labels(jax.nn.one_hot(target, out.shape[-1]), self.config.train.label_smoothing)
        per = optax.softmax_cross_entropy(out, onehot)
        loss = jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        acc = jnp.sum((jnp.argmax(out, -1) == target) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return loss, {"token_accuracy": acc}

    def decode(self, params, images: np.ndarray, method: str, use_cache: bool = True) -> tuple[list[str], np.ndarray]:
        """Captions of uint8 images [N, H, W, 3] -> (strings, scores [N])."""
        e = self.config.eval
        cache = self.__dict__.setdefault("_decoders", {})  # one compiled decoder per (method, cache)
        fn = cache.get((method, use_cache)) or jax.jit(
            lambda p, x: decoding.decode_captions(
                self.model, p, x, method=method, max_len=self.config.dataset.max_len - 1, bos_id=self.vocab.bos_id,
                eos_id=self.vocab.eos_id, pad_id=self.vocab.pad_id, beam_size=int(e.beam_size),
                length_penalty=float(e.length_penalty), use_cache=use_cache,
            )
        )  # fmt: skip
        cache[(method, use_cache)] = fn
        norm = lambda x: data_lib.normalise_images(x, *self.norm)  # noqa: E731
        with jax.set_mesh(self.mesh):
            toks, scores = self.map_batches(
                lambda x: (lambda o: (o["tokens"], o["score"]))(fn(params, self.put(norm(x)))),
                images,
                int(self.config.train.eval_batch_size),
            )
        return [self.vocab.decode(t) for t in toks], scores

    def evaluate(self, params, split_data: dict, methods=("greedy",), timing: bool = False) -> dict:
        """Caption metrics of each decoding method on a split {"image", "captions"}."""
        out: dict = {}
        refs = split_data["captions"]
        self.last_captions = {}
        for method in methods:
            t0 = time.time()
            caps, _ = self.decode(params, split_data["image"], method)
            secs = time.time() - t0
            self.last_captions[method] = caps
            for k, v in metrics_caption.caption_scores(caps, refs).items():
                out[f"{method}_{k}"] = v
            out[f"{method}_seconds"] = secs
        if timing:  # compile once for each, then time a second pass of each
            imgs = split_data["image"]
            cached, _ = self.decode(params, imgs, "greedy", use_cache=True)
            t0 = time.time()
            cached, _ = self.decode(params, imgs, "greedy", use_cache=True)
            t_cache = time.time() - t0
            uncached, _ = self.decode(params, imgs, "greedy", use_cache=False)
            t0 = time.time()
            uncached, _ = self.decode(params, imgs, "greedy", use_cache=False)
            t_full = time.time() - t0
            out["kv_cache_same_captions"] = float(np.mean([a == b for a, b in zip(cached, uncached, strict=True)]))
            out["kv_cache_seconds"], out["no_cache_seconds"] = t_cache, t_full
            out["kv_cache_speedup"] = t_full / max(t_cache, 1e-9)
        out["num_images"] = len(refs)
        return out
