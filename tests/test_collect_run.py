"""scripts/collect_run.py: a run's small summary into results/ (validation history, strided training metrics)."""

import importlib.util
import json
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "collect_run", os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "collect_run.py")
)
collect_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect_run)


def _write_run(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text('{"seed": 3}')
    return run


def test_collects_validation_and_strided_training_metrics(tmp_path):
    rows = [{"step": s, "train/accuracy": s / 100, "train/loss": 1 - s / 100} for s in range(10, 101, 10)]
    rows.insert(3, {"step": 30, "val/accuracy": 0.5, "val/accuracy_yes_no": 0.25, "val/loss": 2.0})
    rows.append({"step": 100, "val/accuracy": 0.9, "val/loss": 0.1})
    run = _write_run(tmp_path, rows)
    out = tmp_path / "results" / "x"
    collect_run.main([str(run), str(out), "--every=20"])
    h = json.loads((out / "history.json").read_text())
    assert h["validation"] == [
        {"step": 30, "accuracy": 0.5, "accuracy_yes_no": 0.25, "loss": 2.0},
        {"step": 100, "accuracy": 0.9, "loss": 0.1},
    ]
    assert [r["step"] for r in h["train"]] == [20, 40, 60, 80, 100]
    assert h["train"][1] == {"step": 40, "accuracy": 0.4, "loss": 0.6}
    assert json.loads((out / "config.json").read_text()) == {"seed": 3}
    assert not (out / "train_summary.json").exists()  # an unfinished run has none: nothing invented


def test_a_corrupt_line_is_named(tmp_path):
    run = _write_run(tmp_path, [{"step": 1, "val/accuracy": 0.1}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "val/acc\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not JSON"):
        collect_run.main([str(run), str(tmp_path / "out")])


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        collect_run.main([str(tmp_path), str(tmp_path / "out")])
