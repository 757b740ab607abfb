"""CLEVR (data/clevr.py): TFDS's one record per image flattened to one record per question, on tfds.testing.mock_data
(random images and texts; question and answer lists of unequal length) and on a hand-made serialized record."""

import io
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from vtfusion_jax.data import clevr, datasets, grouped, reader


@pytest.mark.parametrize(
    "question, answer, kind",
    [  # CLEVR template wordings
        ("How many large things are either cyan metallic cylinders or yellow blocks?", "1", "count"),
        ("There is a large cube; what number of balls are behind it?", "0", "count"),
        ("What color is the small rubber sphere?", "cyan", "query_attribute"),
        ("What is the material of the big purple object?", "metal", "query_attribute"),
        ("Are there more big green things than large purple shiny cubes?", "yes", "compare_numbers"),
        ("Is the number of red cubes less than the number of balls?", "no", "compare_numbers"),
        ("Are there an equal number of cylinders and gray spheres?", "yes", "compare_numbers"),
        ("Are there fewer tiny cubes than metal spheres?", "no", "compare_numbers"),
        ("Are there any other things that are the same shape as the big metallic object?", "no", "exist"),
        ("Is there a big brown object of the same shape as the green thing?", "yes", "exist"),
        ("There is a cube; are there any spheres to the left of it?", "yes", "exist"),
        ("Are any small cyan things visible?", "no", "exist"),
        ("Does the small ball have the same color as the large cylinder?", "no", "compare_attribute"),
        ("Is the size of the red ball the same as the cube?", "yes", "compare_attribute"),
        ("There is a red ball; is it the same size as the cube?", "yes", "compare_attribute"),
        ("Do the large cube and the blue ball have the same material?", "no", "compare_attribute"),
    ],
)
def test_question_type_rules(question, answer, kind):
    assert clevr.TYPES[clevr.question_type(question, answer)] == kind


def _serialized(image: np.ndarray, pairs) -> bytes:
    """A record laid out as TFDS's clevr builder writes it (the keys checked against tfds's serializer)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGBA").save(buf, format="PNG")
    ex = tf_example_pb2.Example()
    f = ex.features.feature
    f["image"].bytes_list.value.append(buf.getvalue())
    f["file_name"].bytes_list.value.append(b"CLEVR_train_000000.png")
    f["question_answer/question"].bytes_list.value.extend(q.encode() for q, _ in pairs)
    f["question_answer/answer"].bytes_list.value.extend(a.encode() for _, a in pairs)
    return ex.SerializeToString()


def test_serialized_records_parse():
    """The real-data path: questions read without decoding the image; the RGBA PNG decodes to its RGB."""
    features = tfds.features.FeaturesDict(
        {"question_answer": tfds.builder("clevr:3.1.0").info.features["question_answer"]}
    )
    pairs = [("Is there a cube?", "yes"), ("How many spheres?", "3")]
    tfds_keys = tf_example_pb2.Example.FromString(features.serialize_example({"question_answer": [
        dict(question=q, answer=a) for q, a in pairs]})).features.feature.keys()  # fmt: skip
    assert set(tfds_keys) == {"question_answer/question", "question_answer/answer"}
    rgba = np.random.default_rng(0).integers(0, 256, (6, 9, 4), dtype=np.uint8)
    record = _serialized(rgba, pairs)
    assert clevr._questions(record) == (["Is there a cube?", "How many spheres?"], ["yes", "3"])
    np.testing.assert_array_equal(clevr._image(record), rgba[..., :3])


@pytest.fixture()
def mock_clevr(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=5):
        yield data_dir, tfds.builder("clevr:3.1.0", data_dir=data_dir)


def test_one_record_per_question_with_its_image(mock_clevr):
    data_dir, builder = mock_clevr
    images = {s: builder.as_data_source(split=s) for s in ("train", "validation")}
    train_answers = sorted({a for r in range(5) for a in clevr._questions(images["train"].data_source[r])[1]})
    meta = datasets.dataset_meta("clevr", data_dir=data_dir)
    assert meta["label_names"] == train_answers and meta["type_names"] == list(clevr.TYPES)
    src = datasets.get_data_source("clevr", "validation", data_dir=data_dir)
    expect = []  # (image record, question, answer) in flat order
    for r in range(5):
        qs, ans = clevr._questions(images["validation"].data_source[r])
        expect += [(r, q, a) for q, a in zip(qs, ans, strict=True)]
    assert len(src) == len(expect) == meta["num_examples"]["validation"]
    for i in np.random.default_rng(0).choice(len(src), 12, replace=False):
        r, q, a = expect[i]
        rec = src[int(i)]
        assert (rec["image_id"], rec["question"].decode()) == (r, q)
        assert rec["answer"] == train_answers.index(a)
        assert rec["question_type"] == clevr.question_type(q, a)
        np.testing.assert_array_equal(rec["image"], images["validation"].data_source[r]["image"])
    np.testing.assert_array_equal(reader.read_image_ids(src), [r for r, _, _ in expect])


def test_answers_outside_the_train_vocabulary_are_minus_one(mock_clevr):
    data_dir, builder = mock_clevr
    images = builder.as_data_source(split="test")
    index = clevr._index(images, f"{data_dir}/index.npz")
    labels = sorted(set(index["answers"]))[1:]  # one answer missing
    src = clevr.QuestionSource(images, index, labels, "")
    missing = np.asarray([a not in labels for a in index["answers"]])
    assert missing.any() and (src.answers[missing] == -1).all() and (src.answers[~missing] >= 0).all()
    np.testing.assert_array_equal(clevr._index(images, f"{data_dir}/index.npz")["image_record"], index["image_record"])


def test_a_split_without_answers_is_refused(mock_clevr, monkeypatch):
    """CLEVR withholds the test answers (TFDS stores ""): evaluating that split would score 0 %, so it is refused."""
    data_dir, _ = mock_clevr
    real = clevr._index
    withheld = lambda images, cache: (  # noqa: E731
        dict(out := real(images, cache), answers=[""] * len(out["answers"]))
        if os.path.basename(cache).startswith("test")
        else real(images, cache)
    )
    monkeypatch.setattr(clevr, "_index", withheld)
    monkeypatch.setattr(clevr, "_INDEXES", {})
    with pytest.raises(ValueError, match=r"no answers .* validation\[1000:\]"):
        datasets.get_data_source("clevr", "test", data_dir=data_dir)
    assert len(datasets.get_data_source("clevr", "validation", data_dir=data_dir)) > 0


def test_image_grouped_batches_keep_each_images_questions_together(mock_clevr):
    data_dir, _ = mock_clevr
    src = datasets.get_data_source("clevr", "train", data_dir=data_dir)
    ids = reader.read_image_ids(src)
    plan = grouped.GroupPlan(ids, seed=0, global_batch_size=64, images_per_batch=2)
    seen = []
    for step in range(plan.steps_for_epochs(1.0)):
        image_records, questions, slot = plan.batch_at(step)
        real = questions >= 0
        # each question looks at the slot holding its own image, and all of that image's questions are there
        assert (ids[questions[real]] == ids[image_records[slot[real]]]).all()
        for s in np.flatnonzero(image_records >= 0):
            assert sorted(questions[real][slot[real] == s]) == list(np.flatnonzero(ids == ids[image_records[s]]))
        seen += list(questions[real])
    assert sorted(seen) == list(range(len(src)))  # an epoch: every question once


def test_unprepared_clevr_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds build clevr:3.1.0 --file_format=array_record"):
        datasets.get_data_source("clevr", "train", data_dir=str(tmp_path))


@pytest.mark.slow  # ~45 s each on 2 shared CPU cores
@pytest.mark.parametrize("fusion", ["rn", "cross"])
def test_config_trains_3_steps_and_evaluates(mock_clevr, tmp_path, fusion):
    from train_testutil import load_config, train_losses

    from vtfusion_jax import train_lib

    data_dir, _ = mock_clevr
    config = load_config("clevr", f"fusion={fusion}", dataset__image_size=32, train__num_steps=3,
                         train__log_every_steps=1, train__eval_every_steps=0, train__eval_batch_size=64,
                         eval__num_attention_maps=1, mesh_shape=(8, 1, 1))  # fmt: skip
    config.dataset.data_dir = data_dir
    assert train_lib.train_and_evaluate(config, str(tmp_path))["step"] == 3
    losses = train_losses(str(tmp_path))
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    task, params, _ = train_lib.restore(config, str(tmp_path), "latest")
    out = task.evaluate(params, "validation", str(tmp_path))
    assert out["num_examples"] == task.meta["num_examples"]["validation"] and 0 <= out["accuracy"] <= 1
    assert set(out["per_type"]) <= set(clevr.TYPES) and (tmp_path / "predictions.jsonl").exists()
