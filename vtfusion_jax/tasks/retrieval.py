"""Image-text retrieval task: ITC + ITM training (models/retrieval.py) and the retrieval evaluation protocol.

Loss = loss.itc_weight * InfoNCE(global batch) + loss.itm_weight * CE(ITM on B positive pairs, B (image, hard
negative text) pairs and B (hard negative image, text) pairs).

Evaluation on a split with I images and T captions (T >= I; several captions per image are allowed):
  1. ITC: score(t, i) = <text_emb_t, image_emb_i> (cosine similarity; the temperature does not change ranks).
  2. ITM re-ranking: for each text query its k best ITC images, and for each image query its k best ITC texts
     (k = eval.rerank_k), are scored by the ITM head, score = logit(match) - logit(no match)
     [+ <text_emb, image_emb> / tau with eval.rerank_score = "itm+itc", the ITC logit of the pair, as BLIP adds the
     ITC similarity to the ITM score]; these candidates rank above every other item, which keep their ITC order (so
     recall@K for K > k equals ITC's). The ITM-only rule is always reported too (``rerank_itm_only_*_R@1``).
  Recall@K (metrics_caption.retrieval_recall): a text query is correct when its image is among the K best; an image
  query when any of its captions is among the K best; ties count against the query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from vtfusion_jax import metrics_caption, pretrained, pretrained_init, sharding
from vtfusion_jax.data import pipeline
from vtfusion_jax.data.captions import CaptionIndex, WordVocab
from vtfusion_jax.models.retrieval import RetrievalModel, sample_hard_negatives
from vtfusion_jax.tasks.base import Task

RERANK_SCORES = ("itm", "itm+itc")
DATASETS = ("sort_of_clevr", "manifest", "coco")


def rerank(itc: np.ndarray, rows: np.ndarray, cols: np.ndarray, itm: np.ndarray, itc_scale: float) -> np.ndarray:
    """Score matrix after re-ranking: entries (rows[j], cols[j]) get big + itm[j] + itc_scale * itc[rows[j], cols[j]]
    (the candidates, above everything else); every other entry keeps its ITC score. Returns a new [T, I] array."""
    out = itc.astype(np.float64)  # a copy
    out[rows, cols] = 1e6 + itm + itc_scale * itc[rows, cols]
    return out


class CaptionDataTask(Task):
    """What the retrieval and captioning tasks share: (image, caption) data through data/captions.py and a word
    vocabulary built from the training captions (saved as workdir/vocab.json; loaded from there afterwards, so
    evaluation never reads the train split)."""

    def __init__(self, config, mesh=None, workdir=None):
        super().__init__(config, mesh, workdir)
        if config.dataset.name not in DATASETS:
            raise ValueError(
                f"the {type(self).__name__} supports datasets {list(DATASETS)}, got {config.dataset.name!r}"
            )
        self._index: dict[str, CaptionIndex] = {}
        path = epath.Path(workdir) / "vocab.json" if workdir else None
        max_len = config.dataset.max_len
        text_init = self.text_checkpoint()
        if text_init:  # a pretrained text tower reads its checkpoint's token ids
            self.tokenizer = pretrained.CheckpointTokenizer(text_init, max_len)
        elif path and path.exists():
            self.tokenizer = WordVocab.load(path, max_len)
        else:
            self.tokenizer = WordVocab.build(self.split_index(config.dataset.train_split).pair_text, max_len)
        self.model = self.build_model()

    def text_checkpoint(self) -> str | None:
        """The text tower's checkpoint, whose tokenizer the task then uses; None: a word vocabulary (captioning has a
        decoder, no text tower)."""
        return None

    def split_index(self, split: str) -> CaptionIndex:
        """The split's images and captions (read once per task)."""
        if split not in self._index:
            d = self.config.dataset
            src = pipeline.get_data_source(
                d.name, split, data_dir=d.data_dir, builder_kwargs=d.builder_kwargs.to_dict()
            )
            self._index[split] = CaptionIndex(src, f"{d.name}/{split}")
        return self._index[split]

    def save_assets(self, workdir: str) -> None:
        if jax.process_index() == 0 and isinstance(self.tokenizer, WordVocab):
            self.tokenizer.save(epath.Path(workdir) / "vocab.json")

    def stored_image_size(self) -> int:
        d = self.config.dataset
        if d.image_size:
            return int(d.image_size)
        if d.name in ("manifest", "coco"):
            return int(d.builder_kwargs.image_size)
        from vtfusion_jax.data import sort_of_clevr

        return sort_of_clevr.IMAGE_SIZE

    def data_kwargs(self, split: str) -> dict:
        return dict(super().data_kwargs(split), captions=self.split_index(split))

    def map_images(self, fn, params, split: str) -> tuple[np.ndarray, ...]:
        """``fn(params, image batch) -> tuple of [B, ...]`` over every image of the split (each once); host outputs
        of the real rows, in index order. ``fn`` is jitted once per task (keep passing the same function)."""
        if fn not in self._eval_cache:
            self._eval_cache[fn] = jax.jit(lambda p, x, v: (fn(p, x), v), out_shardings=sharding.replicated(self.mesh))
        outs = []
        with jax.set_mesh(self.mesh):
            for b in self.eval_batches(split):
                out, keep = jax.device_get(self._eval_cache[fn](params, b["image"], b["valid"]))
                outs.append([np.asarray(o)[np.asarray(keep)] for o in out])
        return tuple(np.concatenate([o[j] for o in outs]) for j in range(len(outs[0])))


class RetrievalTask(CaptionDataTask):
    main_metric = "rerank_mean_R@1"

    def text_checkpoint(self) -> str | None:
        return pretrained_init.init_source(self.config.model.text_encoder)

    def build_model(self, sow_weights: bool = False):
        spec = self.config.model.to_dict()
        spec["text_encoder"] = dict(spec["text_encoder"], vocab_size=self.tokenizer.size)
        return RetrievalModel(pretrained_init.resolve_model_spec(spec))  # init_from towers: the checkpoint's spec

    def init_batch(self):
        length, s = self.config.dataset.max_len, self.stored_image_size()
        return {
            "image": jnp.zeros((1, s, s, 3), jnp.float32),
            "text_ids": jnp.zeros((1, length), jnp.int32),
            "text_mask": jnp.ones((1, length), bool),
        }

    def loss(self, params, batch, rng):
        c = self.config.loss
        m = self.model
        apply = lambda method, *a: m.apply({"params": params}, *a, method=method, rngs={"dropout": rng})  # noqa: E731
        image, image_mask, img_emb = apply(RetrievalModel.encode_image, batch["image"], True)
        text, text_mask, txt_emb = apply(RetrievalModel.encode_text, batch["text_ids"], batch["text_mask"], True)
        tau = apply(RetrievalModel.temperature)
        itc, logits = apply(RetrievalModel.itc, img_emb, txt_emb, batch["image_id"], self.mesh)
        ids = batch["image_id"]
        pos = ids[:, None] == ids[None, :]
        neg_text, neg_image = sample_hard_negatives(rng, logits, pos)
        b = ids.shape[0]
        pair_image = jnp.concatenate([image, image, image[neg_image]])  # [3B, N, D]
        pair_image_mask = jnp.concatenate([image_mask, image_mask, image_mask[neg_image]])
        pair_text = jnp.concatenate([text, text[neg_text], text])  # [3B, L, D]
        pair_text_mask = jnp.concatenate([text_mask, text_mask[neg_text], text_mask])
        itm_logits = apply(RetrievalModel.itm_logits, pair_image, pair_image_mask, pair_text, pair_text_mask, True)
        labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
        itm = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(itm_logits, labels))
        loss = c.itc_weight * itc + c.itm_weight * itm
        itm_acc = jnp.mean(jnp.argmax(itm_logits, -1) == labels)
        return loss, {"itc_loss": itc, "itm_loss": itm, "itm_accuracy": itm_acc, "temperature": tau}

    def _fns(self) -> dict:
        if "fns" in self._eval_cache:
            return self._eval_cache["fns"]
        m = self.model
        enc_img = lambda p, x: m.apply({"params": p}, x, method=RetrievalModel.encode_image)
        # t: text ids and mask stacked, int32 [B, 2, L]
        enc_txt = lambda p, t: m.apply({"params": p}, t[:, 0], t[:, 1] > 0, method=RetrievalModel.encode_text)
        itm = lambda p, a, am, b, bm: m.apply({"params": p}, a, am, b, bm, method=RetrievalModel.itm_logits)
        self._eval_cache["fns"] = {"image": enc_img, "text": jax.jit(enc_txt), "itm": jax.jit(itm)}
        return self._eval_cache["fns"]

    def encode_texts(self, params, texts: list[str]) -> tuple[np.ndarray, ...]:
        """(tokens, mask, embeddings) of texts, host arrays."""
        fn = self._fns()["text"]
        tok = self.tokenizer(texts)
        ids = np.stack([tok["text_ids"], tok["text_mask"].astype(np.int32)], axis=1)  # [T, 2, L]
        with jax.set_mesh(self.mesh):
            return self.map_batches(lambda t: fn(params, self.put(t)), ids, self.config.train.eval_batch_size)

    def itm_scores(self, params, image, image_mask, text, text_mask, img_idx, txt_idx) -> np.ndarray:
        """ITM log-odds of the pairs (img_idx[j], txt_idx[j])."""
        bs = self.config.train.eval_batch_size
        fn = self._fns()["itm"]
        out = []
        with jax.set_mesh(self.mesh):
            for s in range(0, len(img_idx), bs):
                i, t = img_idx[s : s + bs], txt_idx[s : s + bs]
                n = len(i)
                if n < bs:  # one compiled shape: pad the last chunk
                    i, t = np.pad(i, (0, bs - n)), np.pad(t, (0, bs - n))
                args = map(self.put, (image[i], image_mask[i], text[t], text_mask[t]))
                lg = np.asarray(jax.device_get(fn(params, *args)))[:n]
                out.append(lg[:, 1] - lg[:, 0])
        return np.concatenate(out) if out else np.zeros(0)

    def evaluate(self, params, split: str, out_dir: str | None = None) -> dict:
        """Retrieval metrics (ITC and ITM re-ranked) on ``split`` (module docstring)."""
        index = self.split_index(split)
        text_image, texts = index.pair_image, index.pair_text
        image, image_mask, img_emb = self.map_images(self._fns()["image"], params, split)
        text, text_mask, txt_emb = self.encode_texts(params, texts)
        itc = txt_emb @ img_emb.T  # [T, I]
        tau = float(self.model.apply({"params": params}, method=RetrievalModel.temperature))
        k = min(int(self.config.eval.rerank_k), itc.shape[1], itc.shape[0])
        # text -> image: each text's k best images; image -> text: each image's k best texts
        t2i_c = np.argsort(-itc, axis=1, kind="stable")[:, :k]  # [T, k]
        ti = np.repeat(np.arange(len(texts)), k)
        s_t2i = self.itm_scores(params, image, image_mask, text, text_mask, t2i_c.ravel(), ti)
        i2t_c = np.argsort(-itc.T, axis=1, kind="stable")[:, :k]  # [I, k]
        ii = np.repeat(np.arange(itc.shape[1]), k)
        s_i2t = self.itm_scores(params, image, image_mask, text, text_mask, ii, i2t_c.ravel())
        rule = self.config.eval.rerank_score
        if rule not in RERANK_SCORES:
            raise ValueError(f"eval.rerank_score must be one of {RERANK_SCORES}, got {rule!r}")
        scale = 1.0 / tau if rule == "itm+itc" else 0.0
        recall = metrics_caption.retrieval_recall
        r_t2i = recall(rerank(itc, ti, t2i_c.ravel(), s_t2i, scale), text_image)
        r_i2t = recall(rerank(itc, i2t_c.ravel(), ii, s_i2t, scale), text_image)
        out = {f"itc_{key}": v for key, v in recall(itc, text_image).items()}
        out.update({f"rerank_{key}": v for key, v in r_t2i.items() if key.startswith("t2i")})
        out.update({f"rerank_{key}": v for key, v in r_i2t.items() if key.startswith("i2t")})
        out["itc_mean_R@1"] = (out["itc_i2t_R@1"] + out["itc_t2i_R@1"]) / 2
        out["rerank_mean_R@1"] = (out["rerank_i2t_R@1"] + out["rerank_t2i_R@1"]) / 2
        out["rerank_itm_only_t2i_R@1"] = recall(rerank(itc, ti, t2i_c.ravel(), s_t2i, 0.0), text_image)["t2i_R@1"]
        out["rerank_itm_only_i2t_R@1"] = recall(rerank(itc, i2t_c.ravel(), ii, s_i2t, 0.0), text_image)["i2t_R@1"]
        out["temperature"] = tau
        out["num_images"], out["num_texts"], out["rerank_k"] = int(itc.shape[1]), int(itc.shape[0]), k
        out["rerank_score"] = rule
        return out

    def rank_captions(self, params, image_uint8: np.ndarray, captions: list[str]) -> list[dict]:
        """The captions ranked for one image uint8 [H, W, 3]: [{"caption", "itc", "itm"}], best ITM log-odds first."""
        with jax.set_mesh(self.mesh):
            image, image_mask, img_emb = jax.device_get(self._fns()["image"](params, self.normalize(image_uint8[None])))
        text, text_mask, txt_emb = self.encode_texts(params, captions)
        n = len(captions)
        itm = self.itm_scores(params, image, image_mask, text, text_mask, np.zeros(n, int), np.arange(n))
        itc = (txt_emb @ np.asarray(img_emb).T)[:, 0]
        rows = [{"caption": c, "itc": float(a), "itm": float(b)} for c, a, b in zip(captions, itc, itm, strict=True)]
        return sorted(rows, key=lambda r: -r["itm"])
