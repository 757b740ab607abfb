"""Caption data helpers: word vocabulary round trip, deterministic epoch-shuffled training rows, multi-caption pairs."""

import numpy as np

from vtfusion_jax.tasks import data as data_lib


def test_vocab_round_trip_and_truncation(tmp_path):
    v = data_lib.WordVocab.build(["A red square at the top left.", "a blue circle at the center"])
    ids = v.encode("A red square, at the top left.", 12)
    assert ids[0] == v.bos_id and ids.shape == (12,) and list(ids).count(v.eos_id) == 1
    assert v.decode(ids) == "a red square at the top left"
    assert v.decode(v.encode("a green square", 8)) == "a [UNK] square"
    short = v.encode("a red square at the top left", 4)  # [BOS] a red [EOS]
    assert short[-1] == v.eos_id and v.decode(short) == "a red"
    v.save(str(tmp_path / "vocab.json"))
    assert data_lib.WordVocab.load(str(tmp_path / "vocab.json")).words == v.words


def test_train_rows_are_epoch_permutations_and_deterministic():
    n, b = 10, 4
    rows = np.concatenate([data_lib.train_rows(0, s, b, n) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    np.testing.assert_array_equal(data_lib.train_rows(0, 3, b, n), data_lib.train_rows(0, 3, b, n))
    assert not np.array_equal(data_lib.train_rows(1, 0, 10, n), data_lib.train_rows(0, 0, 10, n))


def test_pairs_several_captions():
    idx, texts = data_lib.pairs([["a", "b"], ["c"], ["d", "e", "f"]])
    assert list(idx) == [0, 0, 1, 2, 2, 2] and texts == ["a", "b", "c", "d", "e", "f"]
