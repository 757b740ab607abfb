"""BLEU-4, CIDEr-D, exact match and multi-caption recall@K on hand-checkable and published examples."""

import math

import numpy as np
import pytest

from vtfusion_jax import metrics_caption as mc

# NLTK's corpus_bleu docstring example (nltk.translate.bleu_score), published value 0.5920778868801042.
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party".split()
REF1A = "It is a guide to action that ensures that the military will forever heed Party commands".split()
REF1B = "It is the guiding principle which guarantees the military forces always being under the command of the Party".split()  # noqa: E501
REF1C = "It is the practical guide for the army always to heed the directions of the party".split()
HYP2 = "he read the book because he was interested in world history".split()
REF2A = "he was interested in world history because he read the book".split()


def test_bleu_matches_published_nltk_values():
    assert mc.bleu([HYP1, HYP2], [[REF1A, REF1B, REF1C], [REF2A]]) == pytest.approx(0.5920778868801042, abs=1e-12)
    # sentence_bleu docstring example: 0.5045666840058485
    assert mc.bleu([HYP1], [[REF1A, REF1B, REF1C]]) == pytest.approx(0.5045666840058485, abs=1e-12)


def test_bleu_limits_and_brevity_penalty():
    ref = "the cat sat on the mat".split()
    assert mc.bleu([ref], [[ref]]) == 1.0
    assert mc.bleu(["a b c d e".split()], [[ref]]) == 0.0
    # all n-gram precisions 1, candidate 5 tokens vs reference 6: BLEU = BP = exp(1 - 6/5)
    assert mc.bleu([ref[:5]], [[ref]]) == pytest.approx(math.exp(-0.2))
    # closest reference length: 5 (exact) beats 6 -> no penalty
    assert mc.bleu([ref[:5]], [[ref, ref[:5]]]) == pytest.approx(1.0)


def test_cider_d_hand_computed():
    refs4 = [["a b c d".split()], ["e f g h".split()]]
    corpus, per = mc.cider_d(["a b c d".split(), "e f g h".split()], refs4)
    np.testing.assert_allclose(per, [10.0, 10.0])  # identical (>= 4 tokens) -> maximal
    assert mc.cider_d([["x", "y"], ["z", "w"]], refs4)[0] == 0.0  # disjoint -> 0
    refs = [[["a", "b"]], [["c", "d"]]]
    # two tokens have no 3- or 4-grams: an identical 2-token caption gets 10 * mean(1, 1, 0, 0) = 5
    assert mc.cider_d([["a", "b"], ["c", "d"]], refs)[1][0] == pytest.approx(5.0)
    # "a c" vs "a b": idf = log 2 for every n-gram; unigram cosine with clipping = 1/2, no bigram, trigram or
    # 4-gram overlap, equal bigram counts (no length penalty): 10 * mean(0.5, 0, 0, 0) = 1.25
    assert mc.cider_d([["a", "c"], ["c", "d"]], refs)[1][0] == pytest.approx(1.25)
    # Gaussian length penalty: same n-grams, coco length 1 vs 7 bigrams -> exp(-36 / 72) on the shared part
    long_ref = [[["a", "b", "e", "f", "g", "h", "i", "j"]], [["c", "d"]]]
    assert mc.cider_d([["a", "b"], ["c", "d"]], long_ref)[1][0] < 10 * math.exp(-0.5)
    # clipping: repeating a matching word does not raise the score above the un-repeated one
    rep = mc.cider_d([["a", "a", "a", "b"], ["c", "d"]], refs)[1][0]
    assert rep < 10.0


def test_caption_scores_and_exact_match():
    out = mc.caption_scores(
        ["A red square, at the top.", "a blue circle"], [["a red square at the top"], ["a red circle"]]
    )
    assert out["exact_match"] == 0.5
    assert mc.tokenize("A red square, at the top.") == ["a", "red", "square", "at", "the", "top"]


def test_retrieval_recall_known_ranks_several_captions():
    # 3 images, 5 texts: texts 0,1 -> image 0; texts 2,3 -> image 1; text 4 -> image 2.
    text_image = np.array([0, 0, 1, 1, 2])
    s = np.array(
        [
            [0.9, 0.1, 0.0],  # rank 1
            [0.1, 0.9, 0.0],  # image 0 second -> rank 2
            [0.0, 0.9, 0.1],  # rank 1
            [0.0, 0.1, 0.9],  # image 1 second -> rank 2
            [0.0, 0.5, 0.1],  # image 2 third -> rank 2? (0.5 > 0.1 > 0.0): rank 2
        ]
    )
    r = mc.retrieval_recall(s, text_image, ks=(1, 2))
    assert r["t2i_R@1"] == pytest.approx(2 / 5)
    assert r["t2i_R@2"] == pytest.approx(1.0)
    # image 0: best caption text 0 (0.9) beats all others -> rank 1; image 1: best 0.9 (text 2) ties text 1's 0.9
    # -> counted against: rank 2; image 2: best 0.9 (text 3 belongs to image 1? no: column 2) -> see below
    # column 2 scores: texts 0..4 = 0, 0, .1, .9, .1; its caption (text 4) scores .1, text 3 (.9) and text 2 (.1 tie)
    # rank before it -> rank 3.
    assert r["i2t_R@1"] == pytest.approx(1 / 3)
    assert r["i2t_R@2"] == pytest.approx(2 / 3)
    assert r["i2t_mean_rank"] == pytest.approx((1 + 2 + 3) / 3)
    # a constant score matrix retrieves nothing at K=1
    assert mc.retrieval_recall(np.zeros((5, 3)), text_image, ks=(1,))["t2i_R@1"] == 0.0
