"""Tokenizer: known ids, edge texts, truncation that keeps [SEP], loading from every supported path kind."""

import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtfusion_jax.data.tokenizer import Tokenizer, default_vocab_dir

KNOWN = "What color is the circle?"
KNOWN_IDS = [101, 2054, 3609, 2003, 1996, 4418, 1029, 102]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(max_len=12)


def test_known_ids(tok):
    assert tok.encode(KNOWN) == KNOWN_IDS
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.vocab_size) == (101, 102, 0, 30522)


def test_batch_padding_and_mask(tok):
    out = tok([KNOWN, "yes"])
    assert out["text_ids"].dtype == np.int32 and out["text_mask"].dtype == bool
    assert out["text_ids"].shape == out["text_mask"].shape == (2, 12)
    np.testing.assert_array_equal(out["text_ids"][0], KNOWN_IDS + [0] * 4)
    np.testing.assert_array_equal(out["text_mask"][0], [True] * 8 + [False] * 4)
    assert out["text_ids"][1, :3].tolist() == [101, tok.encode("yes")[1], 102]
    assert out["text_mask"][1].sum() == 3


@pytest.mark.parametrize(
    "text", ["", "   ", "\t\n ", "😀🎉🚀", "Ça coûte 5 € — ok?", "日本語のテキスト", "\u200b\u0000"]
)
def test_edge_texts(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    out = tok([text])
    assert out["text_mask"][0].sum() == len(ids)


def test_empty_and_whitespace_are_cls_sep(tok):
    assert tok.encode("") == [101, 102]
    assert tok.encode("  \t ") == [101, 102]


def test_emoji_is_unknown_not_dropped(tok):
    assert tok.encode("😀") == [101, tok.unk_id, 102]


def test_non_ascii_round_trips(tok):
    # BERT's uncased normaliser lower-cases and, with strip_accents=None, strips accents too (as HF BERT does).
    assert tok.decode(tok.encode("Ça va")) == "ca va"
    assert tok.encode("Ça") == tok.encode("ca")


def test_overlong_keeps_sep():
    tok = Tokenizer(max_len=6)
    words = " ".join(["circle"] * 50)
    ids = tok.encode(words)
    assert len(ids) == 6 and ids[0] == 101 and ids[-1] == 102 and ids[1:-1] == [4418] * 4
    out = tok([words])
    assert out["text_mask"][0].all() and out["text_ids"][0, -1] == 102


def test_truncation_exactly_at_limit():
    tok = Tokenizer(max_len=len(KNOWN_IDS))
    assert tok.encode(KNOWN) == KNOWN_IDS  # fits exactly: nothing dropped
    assert Tokenizer(max_len=len(KNOWN_IDS) - 1).encode(KNOWN) == KNOWN_IDS[:-2] + [102]


def test_vocab_txt_and_hf_folder_match_default(tmp_path):
    src = default_vocab_dir()
    by_vocab = Tokenizer(os.path.join(src, "vocab.txt"))
    assert by_vocab.encode(KNOWN) == KNOWN_IDS
    folder = tmp_path / "hf_model"
    folder.mkdir()
    shutil.copy(os.path.join(src, "vocab.txt"), folder / "vocab.txt")  # folder without tokenizer.json
    assert Tokenizer(str(folder)).encode(KNOWN) == KNOWN_IDS
    assert Tokenizer(os.path.join(src, "tokenizer.json")).encode(KNOWN) == KNOWN_IDS
    assert Tokenizer(src).encode(KNOWN) == KNOWN_IDS


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        Tokenizer(max_len=1)
    with pytest.raises(FileNotFoundError):
        Tokenizer(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError):
        Tokenizer(str(tmp_path))  # empty folder
    with pytest.raises(TypeError):
        Tokenizer()("a single string")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=80), min_size=1, max_size=4), st.integers(2, 20))
def test_batch_invariants(texts, max_len):
    tok = _cached(max_len)
    out = tok(texts)
    ids, mask = out["text_ids"], out["text_mask"]
    assert ids.shape == (len(texts), max_len)
    for row, m, text in zip(ids, mask, texts, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # mask is a prefix
        assert row[0] == 101 and row[n - 1] == 102 and (row[n:] == 0).all()
        assert row[:n].tolist() == tok.encode(text)


_TOKS: dict[int, Tokenizer] = {}


def _cached(max_len):
    if max_len not in _TOKS:
        _TOKS[max_len] = Tokenizer(max_len=max_len)
    return _TOKS[max_len]
