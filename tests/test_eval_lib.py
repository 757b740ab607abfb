"""An easy-VQA smoke run beats the majority answer; eval.py writes its schema; predict.py answers a real test
image's question correctly and reports bad inputs in one line."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from train_testutil import DATA_DIR, REPO, config_flags, load_config, subprocess_env

from vtfusion_jax import eval_lib, metrics
from vtfusion_jax.data import easy_vqa, pipeline

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
