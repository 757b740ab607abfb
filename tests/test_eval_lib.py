"""An easy-VQA smoke run beats the majority answer; eval.py writes its schema (its figures also as TensorBoard images);
predict.py answers a real test image's question correctly and reports bad inputs in one line; the run exported with
jax.export (eval.py --export) gives predict's answers from any batch size."""

import io
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from train_testutil import DATA_DIR, REPO, config_flags, load_config, subprocess_env

from vtfusion_jax import eval_lib, export, metrics, preflight, train_lib
from vtfusion_jax.data import easy_vqa, pipeline, reader

SMOKE = dict(
    train__num_steps=150,  # 0.72 validation accuracy (0.80 at 250 steps); the bar is the majority answer + 0.15
    train__global_batch_size=32,
    train__eval_every_steps=0,
    train__checkpoint_every_steps=1000,
    train__log_every_steps=50,
    optim__lr=3e-3,
    optim__warmup_steps=20,
    dataset__val_split="validation[:512]",
    train__eval_batch_size=256,
)


def run_script(script: str, *args: str, timeout: float = 240, optimized: bool = False) -> subprocess.CompletedProcess:
    """``python <repo>/<script> args`` on one CPU device, as a researcher's machine has (conftest forces 8 for the
    sharding tests; the 8-way partitioned programs cost several times the compile and step time)."""
    env = subprocess_env(optimized)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" not in f)
    cmd = [sys.executable, os.path.join(REPO, script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """train.py on tiny.py for 150 steps, fully optimised (its execution time is what counts)."""
    workdir = tmp_path_factory.mktemp("smoke")
    start = time.time()
    out = run_script(
        "train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *config_flags(**SMOKE), optimized=True
    )
    seconds = time.time() - start
    assert out.returncode == 0, out.stderr[-3000:]
    with open(workdir / "train_summary.json") as f:
        return workdir, json.load(f), seconds


def _answers(split):
    """Answers of an easy-VQA split straight from the package's JSON (no image decoding)."""
    return np.asarray([a for _, a, _ in easy_vqa.split_questions()[split]])


def test_smoke_run_beats_the_majority_answer(smoke_run):
    workdir, result, seconds = smoke_run
    # <= 60 s on an idle machine; the limit stretches with the load other processes put on the shared CPUs.
    limit = 60 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    assert seconds < limit, f"smoke run took {seconds:.0f}s (limit {limit:.0f}s at load {os.getloadavg()[0]:.1f})"
    baseline = metrics.majority_baseline(_answers("train"), _answers("validation"))  # ~0.37 ("yes")
    assert result["val"]["accuracy"] > baseline + 0.15, (result["val"], baseline)
    assert os.path.exists(workdir / "config.json") and os.path.exists(workdir / "metrics.jsonl")


def test_eval_writes_the_schema(smoke_run):
    workdir, _, _ = smoke_run
    out = run_script("eval.py", f"--workdir={workdir}", "--split=test[:600]", "--num_attention_maps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = workdir / "eval" / "test_600"
    with open(folder / "metrics.json") as f:
        m = json.load(f)
    assert isinstance(m["accuracy"], float) and 0.0 <= m["accuracy"] <= 1.0
    assert m["num_examples"] == 600 and m["checkpoint_step"] == SMOKE["train__num_steps"]
    assert set(m["per_type"]) == set(easy_vqa.QUESTION_TYPES)
    rows = [json.loads(line) for line in open(folder / "predictions.jsonl")]
    assert len(rows) == 600 and {"question", "answer", "prediction", "correct", "top5"} <= set(rows[0])
    assert np.isclose(np.mean([r["correct"] for r in rows]), m["accuracy"])
    for png in ("confusion_matrix.png", "attention_00.png", "attention_01.png"):
        assert Image.open(folder / png).size[0] > 100
    # The same figures as TensorBoard images in the eval folder's own run, at the checkpoint's step, same pixels.
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    tags = ["eval/test[:600]/confusion_matrix", "eval/test[:600]/attention_00", "eval/test[:600]/attention_01"]
    assert sorted(events.Tags()["images"]) == sorted(tags)
    for tag in tags:
        (image,) = events.Images(tag)
        decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
        assert image.step == SMOKE["train__num_steps"] and (image.height, image.width) == decoded.shape[:2]
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(folder / f"{tag.split('/')[-1]}.png")))


def test_tensorboard_images_from_arrays(tmp_path):
    """write_images encodes uint8 arrays (RGB, grey) as PNGs TensorBoard decodes to the same pixels."""
    rng = np.random.default_rng(0)
    arrays = {"rgb": rng.integers(0, 256, (5, 7, 3), np.uint8), "grey": rng.integers(0, 256, (4, 6), np.uint8)}
    writer = metrics.MultiWriter([metrics.LoggingWriter(), metrics.TensorBoardWriter(str(tmp_path))])
    writer.write_images(3, arrays)
    writer.close()
    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    for tag, array in arrays.items():
        (image,) = events.Images(tag)
        assert (image.step, image.height, image.width) == (3, *array.shape[:2])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), array)


def test_predict_answers_a_test_question_it_gets_right(smoke_run, tmp_path):
    workdir, _, _ = smoke_run
    folder = workdir / "eval" / "test_600"
    if not (folder / "predictions.jsonl").exists():  # test_eval_writes_the_schema ran on another xdist worker
        out = run_script("eval.py", f"--workdir={workdir}", "--split=test[:600]", "--num_attention_maps=0")
        assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(folder / "predictions.jsonl")]
    right = next(r for r in rows if r["correct"] and r["question_type"] == "color")
    record = pipeline.get_data_source("easy_vqa", "test", data_dir=DATA_DIR)[right["index"]]
    image = os.path.join(easy_vqa.package_data_dir(), "test", "images", f"{int(record['image_id'])}.png")
    att = tmp_path / "att.png"
    out = run_script(
        "predict.py",
        f"--workdir={workdir}",
        f"--image={image}",
        f"--question={right['question']}",
        f"--attention_map={att}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0] == f"answer: {right['answer']}"
    assert len([line for line in out.stdout.splitlines() if line.strip().endswith(tuple(easy_vqa.read_answers()))]) >= 6
    assert Image.open(att).size[0] > 100


BAD_INPUTS = ["missing image", "not an image", "empty question"]


def _bad_input(tmp_path, case):
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    image = {"missing image": str(tmp_path / "nope.png"), "not an image": str(junk)}.get(case, str(junk))
    question = "   " if case == "empty question" else "what color is the shape?"
    return image, question


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_predict_bad_input_is_one_line(smoke_run, tmp_path, case):
    """Each bad input is a PredictError with a one-line message: what predict.py prints (and exits 2) for it."""
    workdir, _, _ = smoke_run
    image, question = _bad_input(tmp_path, case)
    with pytest.raises(eval_lib.PredictError) as e:
        eval_lib.predict(str(workdir), image, question=question)
    assert str(e.value).strip() and "\n" not in str(e.value)


def test_predict_py_bad_input_exits_with_one_line(smoke_run, tmp_path):
    """The command line, on a real run's workdir (test_bad_input.py has it on an unreadable image): nonzero exit,
    no traceback, one stderr line (one subprocess: each costs seconds of imports; the cases above share its path)."""
    workdir, _, _ = smoke_run
    image, question = _bad_input(tmp_path, "missing image")
    out = run_script("predict.py", f"--workdir={workdir}", f"--image={image}", f"--question={question}", timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.png" in lines[0], out.stderr


# Config fields added after the first runs were written (each needs an eval_lib.UPGRADES entry; add new ones here).
ADDED_LATER = (
    "task",
    "train.images_per_batch",
    "train.nan_policy",
    "train.time_limit_seconds",
    "train.steps_per_run",
    "train.early_stopping_patience",
    "train.prefetch",
    "train.data_workers",
    "train.progress_bar",
    "dataset.augment",
    "eval.num_attention_maps",
    "train.compilation_cache_dir",
    "train.profile_steps",
)


def test_old_workdir_config_is_upgraded_once_where_it_is_read(tmp_path):
    """A config.json written before the fields of eval_lib.UPGRADES existed loads with the values that reproduce how
    that run behaved; fields the run did record are kept."""
    new = load_config("tiny")
    old = json.loads(new.to_json_best_effort())

    def node(tree, key):  # (parent dict, leaf name) of a dotted key
        *parents, leaf = key.split(".")
        for p in parents:
            tree = tree[p]
        return tree, leaf

    for key in ADDED_LATER:  # missing, as in the oldest runs; one recorded by the run
        parent, leaf = node(old, key)
        del parent[leaf]
    old["train"]["steps_per_run"] = 7
    (tmp_path / "config.json").write_text(json.dumps(old))
    c = eval_lib.load_config(str(tmp_path))
    for key in ADDED_LATER:
        if key != "train.steps_per_run":
            got, value = getattr(*node(c, key)), eval_lib.UPGRADES[key]
            assert (list(got) if isinstance(got, tuple | list) else got) == (
                list(value) if isinstance(value, tuple) else value
            ), key
    assert (c.task, c.train.nan_policy, c.train.time_limit_seconds, c.dataset.augment) == ("vqa", "stop", 0, False)
    assert c.train.steps_per_run == 7 and list(c.mesh_shape) == list(new.mesh_shape)
    with pytest.raises(AttributeError):
        c.train.not_a_field = 1  # locked


PLATFORMS = ("cpu", "cuda", "tpu")  # all lower on this CPU host; the artifact runs here on cpu


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """(export folder, export.json) of the smoke run's best checkpoint, lowered for PLATFORMS."""
    workdir, _, _ = smoke_run
    out = str(tmp_path_factory.mktemp("export"))
    return out, export.export_model(eval_lib.load_config(str(workdir)), str(workdir), out, "best", PLATFORMS)


@pytest.fixture(scope="module")
def restored(smoke_run):
    """(task, params, step): the smoke run's best checkpoint, as predict.py --workdir restores it."""
    workdir = str(smoke_run[0])
    return train_lib.restore(eval_lib.load_config(workdir), workdir)


def _inputs(tmp_path, n: int) -> list[tuple[str, str]]:
    """(image path, question) pairs: easy-VQA test images (64 px, the model takes 32) and one 50 x 70 JPEG."""
    images = os.path.join(easy_vqa.package_data_dir(), "test", "images")
    pairs = [(os.path.join(images, f"{i}.png"), q) for q, _, i in easy_vqa.split_questions()["test"][:n]]
    jpeg = tmp_path / "odd.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(jpeg)
    return pairs + [(str(jpeg), "  What color is the shape? ")]


def _same(got: dict, want: dict) -> None:
    assert (got["answer"], got["checkpoint_step"]) == (want["answer"], want["checkpoint_step"])
    assert [a for a, _ in got["top"]] == [a for a, _ in want["top"]]
    np.testing.assert_allclose([p for _, p in got["top"]], [p for _, p in want["top"]], rtol=1e-5, atol=1e-7)


def test_exported_model_answers_like_the_workdir(smoke_run, exported, restored, tmp_path):
    (workdir, _, _), (out, meta), (task, params, step) = smoke_run, exported, restored
    assert meta["platforms"] == list(PLATFORMS) and meta["checkpoint_step"] == SMOKE["train__num_steps"]
    assert set(os.listdir(out)) == {"model.jax", "params.msgpack", "tokenizer.json", "export.json"}
    pairs = _inputs(tmp_path, 2)
    _same(export.predict(out, *pairs[0]), eval_lib.predict(str(workdir), pairs[0][0], question=pairs[0][1]))
    for image, question in pairs[1:]:  # the library function behind predict.py --workdir, restored once
        _same(export.predict(out, image, question), dict(task.predict(params, image, question), checkpoint_step=step))


def test_one_exported_model_takes_any_batch_size(exported, restored, tmp_path):
    """Rows of batches of 1, 3 and 5 match the restored model's probabilities on the same examples; the folder's
    tokenizer encodes like the run's (truncation, unknown characters, empty text)."""
    (out, _), (task, params, _) = exported, restored
    model = export.ExportedModel(out)
    pairs = _inputs(tmp_path, 4)
    images = np.stack([reader.resize(eval_lib.read_image(p), model.image_size) for p, _ in pairs])  # [5, S, S, 3]
    questions = [q for _, q in pairs]
    want, _ = task.attention_views(params, {"image": task.normalize(images), **task.tokenizer(questions)})
    for rows in (slice(0, 1), slice(1, 4), slice(0, 5)):
        np.testing.assert_allclose(model.probs(images[rows], questions[rows]), want[rows], rtol=1e-5, atol=1e-7)
    texts = [*questions, "word " * 40, "ünïcödé ☃ 🙂 shapes?", ""]
    for key, value in model.tokenizer(texts).items():
        np.testing.assert_array_equal(value, task.tokenizer(texts)[key])


def test_export_bad_folders_platforms_and_tasks_are_clear_errors(smoke_run, exported, tmp_path, monkeypatch):
    (workdir, _, _), (out, _) = smoke_run, exported
    with monkeypatch.context() as m:
        m.setattr(jax.export, "default_export_platform", lambda: "rocm")
        with pytest.raises(export.ExportError, match=r"exported for \['cpu', 'cuda', 'tpu'\].*runs rocm"):
            export.ExportedModel(out)
    with pytest.raises(FileNotFoundError, match="export.json not found"):
        export.ExportedModel(str(tmp_path))
    for name in ("model.jax", "params.msgpack", "tokenizer.json"):
        (tmp_path / name).write_bytes(open(os.path.join(out, name), "rb").read())
    (tmp_path / "export.json").write_text(json.dumps({"format": 99, "task": "vqa"}))
    with pytest.raises(preflight.CorruptFileError, match="format / task"):
        export.ExportedModel(str(tmp_path))
    with pytest.raises(eval_lib.PredictError, match="question"):
        export.predict(out, _inputs(tmp_path, 1)[0][0], "  ")
    config = load_config("tiny")
    config.task = "retrieval"
    with pytest.raises(export.ExportError, match="'vqa'"):
        export.export_model(config, str(workdir), str(tmp_path / "x"))


@pytest.mark.slow  # ~20 s: four subprocesses
def test_eval_py_exports_and_predict_py_answers_from_it(smoke_run, tmp_path):
    """The command lines: eval.py --export (this backend by default), then predict.py --exported prints what
    predict.py --workdir prints, the checkpoint step included; the folder runs without the model code."""
    workdir, _, _ = smoke_run
    out = tmp_path / "export"
    done = run_script("eval.py", f"--workdir={workdir}", f"--export={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "export.json").read_text())["platforms"] == [jax.default_backend()]
    image, question = _inputs(tmp_path, 1)[0]
    answers = [
        run_script("predict.py", source, f"--image={image}", f"--question={question}")
        for source in (f"--exported={out}", f"--workdir={workdir}")
    ]
    assert all(a.returncode == 0 for a in answers), [a.stderr[-2000:] for a in answers]
    assert answers[0].stdout == answers[1].stdout and answers[0].stdout.startswith("answer: ")
    # Loading and running the folder imports neither TFDS, ml_collections, Orbax nor the model code.
    probe = (
        "import sys, numpy as np; from vtfusion_jax import export; m = export.ExportedModel(sys.argv[1]); "
        "p = m.probs(np.zeros((3, m.image_size, m.image_size, 3), np.uint8), ['what shape?', 'red?', '']); "
        "print(p.shape, sorted(set(sys.modules) & {'tensorflow_datasets', 'ml_collections', 'orbax', "
        "'vtfusion_jax.models', 'vtfusion_jax.tasks', 'vtfusion_jax.train_lib'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(out)], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "(3, 13) []", done.stdout + done.stderr[-2000:]
