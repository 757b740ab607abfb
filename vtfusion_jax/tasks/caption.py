"""Captioning task: teacher-forced training with label smoothing and the captioning evaluation.

Training: input [BOS] w1 .. wn, target w1 .. wn [EOS]; loss = mean label-smoothed cross-entropy over the target
tokens (padding excluded). Evaluation decodes every image greedily and with beam search (decoding.py, KV cache) and
scores the captions against the references with BLEU-4, CIDEr-D and exact match (metrics_caption.py). With
``eval.measure_cache_speedup`` the greedy decoding of the split is also timed without the cache (same tokens
required) and the speed ratio is reported.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vtfusion_jax import decoding, losses, metrics_caption
from vtfusion_jax.models.caption import CaptionModel
from vtfusion_jax.tasks.retrieval import CaptionDataTask

PROTOCOL = (
    "captions tokenised lowercase without punctuation; BLEU-4 corpus-level (closest reference length), "
    "CIDEr-D (coco-caption, sigma 6, idf from this split's references), exact match = equal to a reference"
)


class CaptionTask(CaptionDataTask):
    main_metric = "greedy_cider_d"

    def build_model(self, sow_weights: bool = False):
        if self.config.model.head.max_len < self.config.dataset.max_len:
            raise ValueError("model.head.max_len must be >= dataset.max_len")
        return CaptionModel(self.config.model.to_dict(), self.tokenizer.size)

    def init_batch(self):
        s = self.stored_image_size()
        return {
            "image": jnp.zeros((1, s, s, 3), jnp.float32),
            "caption_in": jnp.zeros((1, self.config.dataset.max_len - 1), jnp.int32),
        }

    def loss(self, params, batch, rng):
        ids = batch["text_ids"]  # [B, L]: [BOS] words [EOS] [PAD]...; input [BOS] w1 .. wn, target w1 .. wn [EOS]
        inputs = {"image": batch["image"], "caption_in": ids[:, :-1]}
        logits = self.model.apply({"params": params}, inputs, train=True, rngs={"dropout": rng})["logits"]
        loss, acc = losses.sequence_loss(logits, ids[:, 1:], self.tokenizer.pad_id, self.config.train.label_smoothing)
        return loss, {"token_accuracy": acc}

    def _decoder(self, method: str, use_cache: bool = True):
        """(params, normalised images [B, H, W, 3]) -> (tokens [B, T], scores [B]); one compile per (method, cache)."""
        key = ("decode", method, use_cache)
        if key not in self._eval_cache:
            e = self.config.eval

            def fn(p, x):
                out = decoding.decode_captions(
                    self.model, p, x, method=method, max_len=self.config.dataset.max_len - 1,
                    bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                    beam_size=int(e.beam_size), length_penalty=float(e.length_penalty), use_cache=use_cache,
                )  # fmt: skip
                return out["tokens"], out["score"]

            self._eval_cache[key] = fn
        return self._eval_cache[key]

    def captions(self, params, split: str, method: str, use_cache: bool = True) -> list[str]:
        """Decoded captions of every image of ``split``, in index order."""
        toks, _ = self.map_images(self._decoder(method, use_cache), params, split)
        return [self.tokenizer.decode(t) for t in toks]

    def caption_image(self, params, image_uint8: np.ndarray, method: str = "beam") -> dict:
        """{"caption", "score"} of one image uint8 [H, W, 3]."""
        with jax.set_mesh(self.mesh):
            toks, scores = jax.device_get(jax.jit(self._decoder(method))(params, self.normalize(image_uint8[None])))
        return {"caption": self.tokenizer.decode(toks[0]), "score": float(scores[0])}

    def evaluate(self, params, split: str, out_dir: str | None = None) -> dict:
        """Caption metrics on ``split``: greedy while training; with ``out_dir`` (eval.py) beam search too, the
        captions (captions.jsonl) and, with ``eval.measure_cache_speedup``, the KV cache's speed-up."""
        refs = self.split_index(split).captions
        out: dict = {"num_images": len(refs)}
        decoded = {}
        for method in ("greedy", "beam") if out_dir else ("greedy",):
            t0 = time.time()
            decoded[method] = self.captions(params, split, method)
            out[f"{method}_seconds"] = time.time() - t0
            out.update({f"{method}_{k}": v for k, v in metrics_caption.caption_scores(decoded[method], refs).items()})
        if out_dir is None:
            return out
        if self.config.eval.measure_cache_speedup:  # compiled above / once here; a second pass of each is timed
            self.captions(params, split, "greedy", use_cache=False)
            seconds = {}
            for cache in (True, False):
                t0 = time.time()
                decoded[cache] = self.captions(params, split, "greedy", use_cache=cache)
                seconds[cache] = time.time() - t0
            out["kv_cache_same_captions"] = float(
                np.mean([a == b for a, b in zip(decoded[True], decoded[False], strict=True)])
            )
            out["kv_cache_seconds"], out["no_cache_seconds"] = seconds[True], seconds[False]
            out["kv_cache_speedup"] = seconds[False] / max(seconds[True], 1e-9)
        out.update(beam_size=int(self.config.eval.beam_size), length_penalty=float(self.config.eval.length_penalty))
        out["protocol"] = PROTOCOL
        if jax.process_index() == 0:
            with (epath.Path(out_dir) / "captions.jsonl").open("w") as f:
                for i, r in enumerate(refs):
                    f.write(json.dumps({"index": i, "references": r, "greedy": decoded["greedy"][i],
                                        "beam": decoded["beam"][i]}) + "\n")  # fmt: skip
        return out
