"""Manifest builder: good rows load (RGB conversion, resize, vocab), each bad row kind errors or is skipped."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vtfusion_jax.data import datasets
from vtfusion_jax.data.manifest import ManifestError
from vtfusion_jax.tasks.vqa import predict_step

SIZE = 16


def _write(folder, name, rows):
    with open(folder / name, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "my data"
    (d / "images" / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(d / "images" / "red.png")
    Image.new("L", (8, 8), 100).save(d / "images" / "gray.png")
    Image.new("RGBA", (8, 8), (0, 0, 255, 0)).save(d / "images" / "clear.png")  # fully transparent blue
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(d / "images" / "sub" / "pal.gif")
    (d / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "outside.png")
    return d


GOOD = [
    {"image": "images/red.png", "text": "what colour?", "label": "red", "caption": "a red square"},
    {"image": "images/gray.png", "text": "and this?", "label": "gray"},
    {"image": "images/clear.png", "text": "transparent", "label": "white"},
    {"image": "images/sub/pal.gif", "text": "palette", "label": "green"},
]


def _build(folder, data_dir, **kw):
    kwargs = dict(path=str(folder), image_size=SIZE, **kw)
    meta = datasets.dataset_meta("manifest", data_dir=str(data_dir), builder_kwargs=kwargs)
    src = datasets.get_data_source("manifest", "train", data_dir=str(data_dir), builder_kwargs=kwargs)
    return meta, {ex["line"]: ex for ex in src.__getitems__(list(range(len(src))))}


def test_good_rows_load(folder, tmp_path):
    _write(folder, "train.jsonl", GOOD)
    _write(folder, "test.jsonl", [GOOD[1], GOOD[0]])
    meta, rows = _build(folder, tmp_path / "tfds")
    assert meta["num_examples"] == {"train": 4, "test": 2}
    assert meta["label_names"] == ["gray", "green", "red", "white"]  # sorted train labels
    assert meta["image_shape"] == (SIZE, SIZE, 3) and meta["skipped_rows"] == {"train": 0, "test": 0}
    expect = {1: (255, 0, 0), 2: (100, 100, 100), 3: (255, 255, 255), 4: (0, 200, 0)}
    for line, rgb in expect.items():
        img = rows[line]["image"]
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert (img == np.array(rgb, np.uint8)).all(), (line, img[0, 0])
        assert meta["label_names"][rows[line]["label"]] == GOOD[line - 1]["label"]
        assert rows[line]["text"].decode() == GOOD[line - 1]["text"]
    assert rows[1]["caption"] == b"a red square" and rows[2]["caption"] == b""
    assert meta["type_names"] == ["all"]


def test_question_types_and_label_ints(folder, tmp_path):
    rows = [dict(GOOD[0], question_type="colour", label=3), dict(GOOD[1], question_type="count", label=10)]
    _write(folder, "train.jsonl", rows)
    meta, built = _build(folder, tmp_path / "tfds")
    assert meta["label_names"] == ["10", "3"] and meta["type_names"] == ["colour", "count"]
    assert built[2]["question_type"] == 1 and built[2]["label"] == 0


BAD = {
    "missing": ({"image": "images/none.png", "text": "t", "label": "x"}, "image file not found"),
    "corrupt": ({"image": "images/corrupt.png", "text": "t", "label": "x"}, "cannot decode image"),
    "empty_label": ({"image": "images/red.png", "text": "t", "label": "  "}, "empty label"),
    "no_label": ({"image": "images/red.png", "text": "t"}, "empty label"),
    "no_text": ({"image": "images/red.png", "label": "red"}, "missing field 'text'"),
    "escape": ({"image": "../outside.png", "text": "t", "label": "x"}, "leaves the dataset folder"),
    "absolute": ({"image": "/etc/hostname", "text": "t", "label": "x"}, "absolute"),
    "json": ("{not json", "invalid JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_row_error_names_line_and_file(folder, tmp_path, kind):
    row, message = BAD[kind]
    _write(folder, "train.jsonl", [GOOD[0], GOOD[1], row])
    with pytest.raises(ManifestError) as err:
        _build(folder, tmp_path / "tfds")
    text = str(err.value)
    assert "train.jsonl:3:" in text and message in text
    if isinstance(row, dict) and "image" in row and kind not in ("no_text",):
        assert os.path.basename(row["image"]) in text


def test_symlink_escape_refused(folder, tmp_path):
    os.symlink(tmp_path / "outside.png", folder / "images" / "link.png")
    _write(folder, "train.jsonl", [GOOD[0], {"image": "images/link.png", "text": "t", "label": "x"}])
    with pytest.raises(ManifestError, match=r"train.jsonl:2: .*link.png.* leaves the dataset folder"):
        _build(folder, tmp_path / "tfds")


def test_unseen_label_in_test_split_is_kept_as_minus_one(folder, tmp_path):
    """A test label never seen in training stays in the split (label -1) so eval counts it wrong, never drops it."""
    _write(folder, "train.jsonl", GOOD[:2])
    _write(folder, "test.jsonl", [GOOD[0], GOOD[2]])
    kwargs = dict(path=str(folder), image_size=SIZE)
    meta = datasets.dataset_meta("manifest", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    assert meta["num_examples"]["test"] == 2 and meta["label_names"] == ["gray", "red"]
    src = datasets.get_data_source("manifest", "test", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    labels = {ex["line"]: ex["label"] for ex in src.__getitems__([0, 1])}
    assert labels == {1: 1, 2: -1}


def test_unseen_labels_are_counted_wrong_by_eval():
    """predict_step gives label -1 rows no loss; evaluate-style metrics count them wrong; the confusion matrix skips
    them."""
    import jax.numpy as jnp

    from vtfusion_jax import metrics

    class Fixed:  # a "model" whose logits are the batch's
        def apply(self, params, batch, train=False):
            return {"logits": batch["logits"]}

    logits = jnp.asarray([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    out = predict_step({}, {"logits": logits, "label": jnp.asarray([0, 1, -1])}, model=Fixed())
    loss = np.asarray(out["loss"])
    assert np.isfinite(loss[:2]).all() and np.isnan(loss[2])
    pred, label = np.asarray(out["pred"]), np.array([0, 1, -1])
    assert metrics.accuracy(pred, label) == pytest.approx(2 / 3)  # the unseen one is wrong whatever is predicted
    cm = metrics.confusion_matrix(pred, label, 3, valid=label >= 0)
    assert cm.sum() == 2 and cm[2].sum() == 0


def test_skip_bad_rows_counts(folder, tmp_path):
    bad = [row for row, _ in BAD.values()]
    _write(folder, "train.jsonl", [GOOD[0], *bad, GOOD[1], "", GOOD[3]])  # blank lines are not rows
    _write(folder, "validation.jsonl", [GOOD[1], dict(GOOD[0], label="unseen"), BAD["corrupt"][0]])
    meta, rows = _build(folder, tmp_path / "tfds", skip_bad_rows=True)
    assert meta["skipped_rows"] == {"train": len(bad), "validation": 1}  # the unseen label is kept (label -1)
    assert meta["num_examples"] == {"train": 3, "validation": 2}
    assert sorted(rows) == [1, 2 + len(bad), 4 + len(bad)]


def test_editing_manifest_gives_new_dataset(folder, tmp_path):
    _write(folder, "train.jsonl", GOOD[:2])
    meta1, _ = _build(folder, tmp_path / "tfds")
    _write(folder, "train.jsonl", GOOD)
    meta2, _ = _build(folder, tmp_path / "tfds")
    assert meta1["num_examples"]["train"] == 2 and meta2["num_examples"]["train"] == 4
    assert meta1["builder_dir"] != meta2["builder_dir"]


def test_single_jsonl_file_and_missing_train(folder, tmp_path):
    _write(folder, "mine.jsonl", GOOD[:1])
    kwargs = dict(path=str(folder / "mine.jsonl"), image_size=SIZE)
    meta = datasets.dataset_meta("manifest", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    assert meta["num_examples"] == {"train": 1}
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        datasets.dataset_meta("manifest", data_dir=str(tmp_path / "tfds"), builder_kwargs=dict(path=str(tmp_path)))


def test_manifest_through_the_pipeline(folder, tmp_path):
    import jax
    from jax.sharding import Mesh

    from vtfusion_jax.data import pipeline
    from vtfusion_jax.data.tokenizer import Tokenizer

    _write(folder, "train.jsonl", GOOD)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    kwargs = dict(path=str(folder), image_size=SIZE)
    ev = pipeline.make_eval_iterator(dataset="manifest", split="train", global_batch_size=8, mesh=mesh,
                                     tokenizer=Tokenizer(max_len=8), data_dir=str(tmp_path / "tfds"),
                                     builder_kwargs=kwargs, image_size=8)  # fmt: skip
    (batch,) = list(ev)
    h = {k: np.asarray(v) for k, v in batch.items()}
    assert h["valid"].tolist() == [True] * 4 + [False] * 4 and h["image"].shape == (8, 8, 8, 3)
    meta = pipeline.dataset_meta("manifest", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    src = pipeline.get_data_source("manifest", "train", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    for row in range(4):
        ex = src[int(h["index"][row])]
        assert meta["label_names"][h["label"][row]] == GOOD[ex["line"] - 1]["label"]
        assert h["question_type"][row] == 0
        rgb = {1: (255, 0, 0), 2: (100, 100, 100), 3: (255, 255, 255), 4: (0, 200, 0)}[ex["line"]]
        np.testing.assert_allclose(h["image"][row], np.broadcast_to(np.array(rgb) / 127.5 - 1, (8, 8, 3)), atol=1e-6)


def test_rows_sharing_an_image_path_share_an_image(folder, tmp_path):
    """Image-grouped batches (data/grouped.py) group manifest rows by their normalised image path."""
    from vtfusion_jax.data import reader

    paths = ["images/red.png", "images/gray.png", "./images/red.png", "images/sub/../gray.png", "images/clear.png"]
    _write(folder, "train.jsonl", [dict(GOOD[0], image=p, text=f"q{i}") for i, p in enumerate(paths)])
    kwargs = dict(path=str(folder), image_size=SIZE)
    src = datasets.get_data_source("manifest", "train", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    line = {i: ex["line"] for i, ex in enumerate(src.__getitems__(list(range(len(src)))))}
    ids = reader.read_image_ids(src)
    image = {i: os.path.normpath(paths[line[i] - 1]) for i in range(len(src))}
    for i in range(len(src)):
        for j in range(len(src)):
            assert (ids[i] == ids[j]) == (image[i] == image[j]), (paths[line[i] - 1], paths[line[j] - 1])
    assert len(set(ids.tolist())) == 3
