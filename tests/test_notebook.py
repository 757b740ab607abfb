"""notebooks/quickstart.ipynb runs top to bottom, headless, in a venv kernel: every cell succeeds, the run writes
its evaluation files, and the answer to the test image's question is one of easy-VQA's answers."""

import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image
from train_testutil import DATA_DIR, REPO, subprocess_env

from vtfusion_jax.data import easy_vqa

pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
STEPS = 4  # FUSION_STEPS in the notebook is then max(2, STEPS // 10) = 2
EVAL_SPLIT = "test[:64]"

# Appended to the in-memory copy only: reports what the notebook computed, and which Python ran it.
REPORT_CELL = """
print("REPORT " + json.dumps({
    "executable": sys.executable,
    "answer": answer["answer"],
    "label_names": meta["label_names"],
    "fusions": sorted(FUSIONS),
    "co_step": co_summary["step"],
    "eval_dir": str(EVAL_DIR),
}))
"""


def _kernel_env(run_dir) -> dict:
    env = subprocess_env()  # unoptimised XLA (fast compiles) + the session's compilation cache
    # One CPU device, as a researcher's kernel has (conftest forces 8 for the sharding tests).
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" not in f)
    env.update(
        QUICKSTART_STEPS=str(STEPS),
        QUICKSTART_DIR=str(run_dir),
        QUICKSTART_DATA_DIR=DATA_DIR,  # the session's easy-VQA build (shared with the training tests)
        QUICKSTART_EVAL_SPLIT=EVAL_SPLIT,
    )
    return env


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    run_dir = tmp_path / "quickstart"
    client = NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    )
    client.execute(env=_kernel_env(run_dir))  # raises CellExecutionError (with the traceback) if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    report_line = next(
        line for o in outputs if o.output_type == "stream" for line in o.text.splitlines() if line.startswith("REPORT ")
    )
    report = json.loads(report_line[len("REPORT ") :])

    # The kernel is this virtualenv's Python (jupyter_client maps the spec's "python" to sys.executable).
    assert os.path.realpath(report["executable"]) == os.path.realpath(sys.executable)
    assert report["label_names"] == easy_vqa.read_answers()
    assert report["answer"] in report["label_names"]
    assert {"concat", "cross", "co_attention"} <= set(report["fusions"])
    assert report["co_step"] == 2

    eval_dir = run_dir / "tiny_cross" / "eval" / "test_64"
    assert report["eval_dir"] == str(eval_dir)
    with open(eval_dir / "metrics.json") as f:
        m = json.load(f)
    assert m["num_examples"] == 64 and m["checkpoint_step"] == STEPS and 0.0 <= m["accuracy"] <= 1.0
    for png in (eval_dir / "confusion_matrix.png", eval_dir / "attention_00.png", run_dir / "my_attention.png"):
        assert Image.open(png).size[0] > 100, png
    # The confusion matrix, the eval attention map, the test image and its attention map are shown inline.
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # + the loss curve
