"""scripts/run_task_job.history and scripts/task_tables: the curve and table rows come from the run files."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import run_task_job  # noqa: E402
import task_tables  # noqa: E402


def test_history_splits_validation_and_train_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 100, "train/loss": 2.0, "train/itm_loss": 0.6},
        {"step": 200, "val/itc_mean_R@1": 0.25, "val/rerank_mean_R@1": 0.5},
        {"step": 200, "train/loss": 1.0, "train/itm_loss": 0.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    h = run_task_job.history(str(path))
    assert h["validation"] == [{"step": 200, "itc_mean_R@1": 0.25, "rerank_mean_R@1": 0.5}]
    assert [t["step"] for t in h["train"]] == [100, 200] and h["train"][1]["itm_loss"] == 0.5
    path.write_text('{"step": 1}\nnot json\n')
    try:
        run_task_job.history(str(path))
    except SystemExit as e:
        assert "metrics.jsonl:2" in str(e)
    else:
        raise AssertionError("a bad line must name file:line")


def test_retrieval_row_and_targets():
    m = {f"{p}_R@{k}": 0.1 * k for p in ("itc_i2t", "itc_t2i", "rerank_i2t", "rerank_t2i") for k in (1, 5, 10)}
    m.update(num_images=200, num_texts=200, rerank_k=16, rerank_score="itm+itc")
    m.update({"itc_mean_R@1": 0.1, "rerank_mean_R@1": 0.1})
    m.update({"rerank_itm_only_i2t_R@1": 0.05, "rerank_itm_only_t2i_R@1": 0.07})
    s = {"name": "r", "metrics": m, "train_steps": 5, "train_seconds": 1.0, "eval_seconds": 2.0,
         "load_average_1min": {"mean": 1.0}, "commands": ["python train.py"]}  # fmt: skip
    row = task_tables.retrieval_table([s]).splitlines()[-1]
    assert "| 10.0 / 50.0 / 100.0 |" in row and "| 5.0 / 7.0 |" in row and "| itm+itc |" in row
    (line,) = task_tables.targets([s], [])
    assert "not met" in line and "improves mean R@1 over ITC alone: no" in line
    m.update({k: 0.95 for k in ("rerank_t2i_R@1", "rerank_i2t_R@1", "rerank_mean_R@1")})
    (line,) = task_tables.targets([s], [])
    assert ": met" in line and "alone: yes" in line
