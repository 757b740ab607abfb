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

from vtfusion_jax import metrics_caption
from vtfusion_jax.models.retrieval import RetrievalModel, itc_loss, sample_hard_negatives
from vtfusion_jax.tasks import data as data_lib
from vtfusion_jax.tasks.common import TaskBase

RERANK_SCORES = ("itm", "itm+itc")


def rerank(itc: np.ndarray, rows: np.ndarray, cols: np.ndarray, itm: np.ndarray, itc_scale: float) -> np.ndarray:
    """Score matrix after re-ranking: entries (rows[j], cols[j]) get big + itm[j] + itc_scale * itc[rows[j], cols[j]]
    (the candidates, above everything else); every other entry keeps its ITC score. Returns a new [T, I] array."""
    out = itc.astype(np.float64)  # a copy
    out[rows, cols] = 1e6 + itm + itc_scale * itc[rows, cols]
    return out


class RetrievalTask(TaskBase):
    main_metric = "rerank_mean_R@1"

    def build_model(self):
        spec = self.config.model.to_dict()
        spec["text_encoder"] = dict(spec["text_encoder"], vocab_size=self.vocab.size)
        return RetrievalModel(spec)

    def init_batch_extra(self):
        length = self.config.dataset.max_len
        return {"text_ids": jnp.zeros((1, length), jnp.int32), "text_mask": jnp.ones((1, length), bool)}

    def host_batch(self, step: int) -> dict:
        d = self.train_data
        rows = data_lib.train_rows(self.config.seed, step, self.config.train.global_batch_size, len(d["text_image"]))
        img = d["text_image"][rows]
        ids = d["text_ids"][rows]
        return {
            "image": data_lib.normalise_images(d["image"][img], *self.norm),
            "text_ids": ids,
            "text_mask": ids != self.vocab.pad_id,
            "image_id": img.astype(np.int32),
        }

    def loss(self, params, batch, rng):
        c = self.config.loss
        m = self.model
        apply = lambda method, *a: m.apply({"params": params}, *a, method=method, rngs={"dropout": rng})  # noqa: E731
        image, image_mask = apply(RetrievalModel.encode_image, batch["image"], True)
        text, text_mask = apply(RetrievalModel.encode_text, batch["text_ids"], batch["text_mask"], True)
        img_emb, txt_emb = apply(RetrievalModel.embed, image, image_mask, text, text_mask)
        tau = apply(RetrievalModel.temperature)
        itc, logits = itc_loss(img_emb, txt_emb, tau, batch["image_id"], mesh=self.mesh)
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

    # ------------------------------------------------------------------------------------------- evaluation

    def _jitted(self) -> dict:
        """The evaluation functions, jitted once per task (every validation reuses the compiled programs)."""
        if "_eval_fns" not in self.__dict__:
            m, pad = self.model, self.vocab.pad_id

            def enc_img(p, x):
                tok, mask = m.apply({"params": p}, x, method=RetrievalModel.encode_image)
                return tok, mask, m.apply({"params": p}, tok, mask, method=RetrievalModel.embed_image)

            def enc_txt(p, t):
                tok, mask = m.apply({"params": p}, t, t != pad, method=RetrievalModel.encode_text)
                return tok, mask, m.apply({"params": p}, tok, mask, method=RetrievalModel.embed_text)

            def itm(p, a, am, b, bm):
                return m.apply({"params": p}, a, am, b, bm, method=RetrievalModel.itm_logits)

            self._eval_fns = {"image": jax.jit(enc_img), "text": jax.jit(enc_txt), "itm": jax.jit(itm)}
        return self._eval_fns

    def _encode(self, params, images: np.ndarray, text_ids: np.ndarray):
        """Token outputs and embeddings of all images and texts (host numpy)."""
        bs = self.config.train.eval_batch_size
        enc_img, enc_txt = self._jitted()["image"], self._jitted()["text"]
        norm = lambda x: data_lib.normalise_images(x, *self.norm)  # noqa: E731
        imgs = self.map_batches(lambda x: enc_img(params, self.put(norm(x))), images, bs)
        txts = self.map_batches(lambda t: enc_txt(params, self.put(t)), text_ids, bs)
        return (*imgs, *txts)

    def _itm_scores(self, params, image, image_mask, text, text_mask, img_idx, txt_idx) -> np.ndarray:
        """ITM log-odds of the pairs (img_idx[j], txt_idx[j])."""
        bs = self.config.train.eval_batch_size
        fn = self._jitted()["itm"]
        out = []
        for s in range(0, len(img_idx), bs):
            i, t = img_idx[s : s + bs], txt_idx[s : s + bs]
            n = len(i)
            if n < bs:  # one compiled shape: pad the last chunk
                i, t = np.pad(i, (0, bs - n)), np.pad(t, (0, bs - n))
            lg = np.asarray(
                jax.device_get(fn(params, *map(self.put, (image[i], image_mask[i], text[t], text_mask[t]))))
            )
            lg = lg[:n]
            out.append(lg[:, 1] - lg[:, 0])
        return np.concatenate(out) if out else np.zeros(0)

    def evaluate(self, params, split_data: dict) -> dict:
        """Retrieval metrics (ITC and ITM re-ranked) on a split {"image", "captions"}."""
        text_image, texts = data_lib.pairs(split_data["captions"])
        text_ids = np.stack([self.vocab.encode(t, self.config.dataset.max_len) for t in texts])
        with jax.set_mesh(self.mesh):
            image, image_mask, img_emb, text, text_mask, txt_emb = self._encode(params, split_data["image"], text_ids)
            itc = txt_emb @ img_emb.T  # [T, I]
            tau = float(self.model.apply({"params": params}, method=RetrievalModel.temperature))
            k = min(int(self.config.eval.rerank_k), itc.shape[1], itc.shape[0])
            # text -> image: each text's k best images; image -> text: each image's k best texts
            t2i_c = np.argsort(-itc, axis=1, kind="stable")[:, :k]  # [T, k]
            ti = np.repeat(np.arange(len(texts)), k)
            s_t2i = self._itm_scores(params, image, image_mask, text, text_mask, t2i_c.ravel(), ti)
            i2t_c = np.argsort(-itc.T, axis=1, kind="stable")[:, :k]  # [I, k]
            ii = np.repeat(np.arange(itc.shape[1]), k)
            s_i2t = self._itm_scores(params, image, image_mask, text, text_mask, ii, i2t_c.ravel())
        rule = self.config.eval.get("rerank_score", "itm")
        if rule not in RERANK_SCORES:
            raise ValueError(f"eval.rerank_score must be one of {RERANK_SCORES}, got {rule!r}")
        scale = 1.0 / tau if rule == "itm+itc" else 0.0
        t2i = rerank(itc, ti, t2i_c.ravel(), s_t2i, scale)
        i2t = rerank(itc, i2t_c.ravel(), ii, s_i2t, scale)
        only_t2i = metrics_caption.retrieval_recall(rerank(itc, ti, t2i_c.ravel(), s_t2i, 0.0), text_image)
        only_i2t = metrics_caption.retrieval_recall(rerank(itc, i2t_c.ravel(), ii, s_i2t, 0.0), text_image)
        r_itc = metrics_caption.retrieval_recall(itc, text_image)
        r_t2i = metrics_caption.retrieval_recall(t2i, text_image)
        r_i2t = metrics_caption.retrieval_recall(i2t, text_image)
        out = {f"itc_{key}": v for key, v in r_itc.items()}
        out.update({f"rerank_{key}": v for key, v in r_t2i.items() if key.startswith("t2i")})
        out.update({f"rerank_{key}": v for key, v in r_i2t.items() if key.startswith("i2t")})
        out["itc_mean_R@1"] = (out["itc_i2t_R@1"] + out["itc_t2i_R@1"]) / 2
        out["rerank_mean_R@1"] = (out["rerank_i2t_R@1"] + out["rerank_t2i_R@1"]) / 2
        out["rerank_itm_only_t2i_R@1"], out["rerank_itm_only_i2t_R@1"] = only_t2i["t2i_R@1"], only_i2t["i2t_R@1"]
        out["temperature"] = tau
        out["num_images"], out["num_texts"], out["rerank_k"] = int(itc.shape[1]), int(itc.shape[0]), k
        return out
