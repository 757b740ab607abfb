"""Captioning and retrieval metrics (numpy / pure Python): BLEU-4, CIDEr-D, exact match, recall@K with several
captions per image.

``tokenize``: lowercase, punctuation removed, split on whitespace (coco-caption's PTB tokenizer on plain English,
without Java). BLEU-4 (Papineni et al. 2002), corpus level, no smoothing (NLTK ``corpus_bleu``, coco-caption
``Bleu(4)`` "closest"): clipped n-gram precisions p_n summed over the corpus, exp(mean_n log p_n) times the brevity
penalty exp(1 - r / c) when c < r (r: closest reference length, the shorter on a tie); any p_n = 0 gives 0.
CIDEr-D (Vedantam et al. 2015; coco-caption ``CiderD``): per n = 1..4, tf-idf n-gram vectors with
idf = log(#images) - log(max(1, df)) from the evaluated references, and

    sim_n(c, r) = sum_g min(c_g, r_g) * r_g / (|c| |r|) * exp(-(l_c - l_r)^2 / (2 * 6^2))

CIDEr-D(c) = 10 * mean_n mean_r sim_n(c, r), averaged over images (a candidate equal to its single reference scores
10 unless all its n-grams occur in every image's references, idf 0).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercase words with punctuation removed."""
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (uniform weights, no smoothing) in [0, 1].

    Args:
      candidates, references: per image, one token list and a list of reference token lists.
      max_n: highest n-gram order.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    matched = np.zeros(max_n)
    total = np.zeros(max_n)
    c_len = r_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        c_len += len(cand)
        # closest reference length, the shorter one on a tie
        r_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(cand, n)
            max_ref: Counter = Counter()
            for r in refs:
                max_ref |= _ngrams(r, n)  # element-wise max
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            total[n - 1] += max(len(cand) - n + 1, 0)
    if c_len == 0 or np.any(matched == 0):
        return 0.0
    log_p = np.mean(np.log(matched / total))
    bp = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)
    return float(bp * math.exp(log_p))


def _cider_vec(counts_by_n, df, log_num_images):
    vec, norm, length = [], [], 0
    for n, counts in enumerate(counts_by_n):
        v = {g: tf * (log_num_images - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
        vec.append(v)
        norm.append(math.sqrt(sum(x * x for x in v.values())))
        if n == 1:  # coco-caption counts the length from the bigram order (kept for comparable numbers)
            length += sum(counts.values())
    return vec, norm, length


def cider_d(
    candidates: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """CIDEr-D of each candidate against its references, idf from the references of this corpus.

    Args:
      candidates, references: per image, one token list and a list of reference token lists.
      max_n, sigma: highest n-gram order; width of the Gaussian length penalty.

    Returns:
      (corpus score = mean over images, per-image scores float64 [N]); a perfect caption scores 10.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    ref_counts = [[[_ngrams(r, n) for n in range(1, max_n + 1)] for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({g for r in refs for counts in r for g in counts})  # once per image
    log_n = math.log(float(len(references))) if references else 0.0
    scores = np.zeros(len(candidates))
    for i, (cand, refs) in enumerate(zip(candidates, ref_counts, strict=True)):
        vec, norm, length = _cider_vec([_ngrams(cand, n) for n in range(1, max_n + 1)], df, log_n)
        total = np.zeros(max_n)
        for r in refs:
            vec_r, norm_r, length_r = _cider_vec(r, df, log_n)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                val = sum(min(x, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, x in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    val /= norm[n] * norm_r[n]
                total[n] += val * penalty
        scores[i] = 10.0 * np.mean(total) / len(refs)
    return float(np.mean(scores)) if len(scores) else float("nan"), scores


def exact_match(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> float:
    """Share of candidates equal (after tokenisation) to one of their references."""
    hits = [any(list(c) == list(r) for r in refs) for c, refs in zip(candidates, references, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu4", "cider_d", "exact_match"} for caption strings (tokenised with ``tokenize``)."""
    cand = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in rs] for rs in references]
    return {"bleu4": bleu(cand, refs), "cider_d": cider_d(cand, refs)[0], "exact_match": exact_match(cand, refs)}


def retrieval_recall(scores: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@K with any number of captions per image.

    A text query is right at K when its image is among the K best images; an image query when one of its captions
    is among the K best texts (COCO / Flickr30k protocol). Ties count against the query (constant scores: recall 0).

    Args:
      scores, text_image: float [T, I], score of text t with image i; int [T], the image each text describes.
      ks: cut-offs.

    Returns:
      {"t2i_R@k": ..., "i2t_R@k": ..., "t2i_mean_rank", "i2t_mean_rank"} (ranks 1-based).
    """
    s = np.asarray(scores, np.float64)
    text_image = np.asarray(text_image)
    t, n = s.shape
    pos = np.zeros((t, n), bool)
    pos[np.arange(t), text_image] = True
    # text -> image: rank = number of other images scoring >= the true image
    true = s[np.arange(t), text_image]
    t2i_rank = np.sum((s >= true[:, None]) & ~pos, axis=1)
    # image -> text: rank of the best caption = number of other-image texts scoring >= it
    st = s.T  # [I, T]
    best = np.max(np.where(pos.T, st, -np.inf), axis=1)  # [I]
    has = pos.any(axis=0)
    i2t_rank = np.sum((st >= best[:, None]) & ~pos.T, axis=1)[has]
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_R@{k}"] = float(np.mean(t2i_rank < k))
    out["i2t_mean_rank"] = float(np.mean(i2t_rank + 1))
    out["t2i_mean_rank"] = float(np.mean(t2i_rank + 1))
    return out
