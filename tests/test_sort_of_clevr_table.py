"""scripts/sort_of_clevr_table.py: the Sort-of-CLEVR table from run summaries.

The fast tests feed the collector hand-made run folders (exact numbers, so the table's arithmetic is checked); the
slow one runs the script end to end (``--run``: build, train, test two variants) on a tiny generated dataset.
The ``rn`` permutation invariance test is tests/test_fusion.py::test_relation_network_is_a_sum_over_object_pairs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "sort_of_clevr_table", os.path.join(ROOT, "scripts/sort_of_clevr_table.py")
)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

KW = dict(num_train=2, num_validation=1, num_test=2, seed=7)  # tiny generated sizes (images; 20 questions each)


def _fake_run(folder, variant, seed, acc, per_type, val, steps=600):
    d = folder / f"{variant}_seed{seed}"
    d.mkdir(parents=True)
    cmd = f"python train.py --config=configs/sort_of_clevr.py:fusion={variant} --workdir=runs/x -- --config.seed={seed}"
    summary = {
        "commands": [cmd, cmd.replace("train.py", "eval.py")],
        "split": "test",
        "accuracy": acc,
        "per_type": per_type,
        "best_val_accuracy": val,
        "train_seconds": 100.0 + seed,
        "load_average_1min": {"mean": 3.0, "max": 5.0, "samples": 4},
        "params": 1000,
        "params_fusion": 10,
        "flops_per_example_forward": 2e6,
    }
    config = {
        "dataset": {"builder_kwargs": KW, "val_split": "validation"},
        "train": {"num_steps": steps, "global_batch_size": 160, "images_per_batch": 8},
    }
    curve = [{"step": 150, "seconds": 30.0, "val_accuracy": 0.5, **dict.fromkeys(table.SUBTYPES, 0.5)}]
    for name, obj in (("summary", summary), ("config", config), ("curve", curve)):
        (d / f"{name}.json").write_text(json.dumps(obj))


def test_families_are_count_weighted_subtype_accuracies():
    counts = table.subtype_counts(KW, "test")
    assert sum(counts.values()) == 20 * KW["num_test"]
    per = {"shape": 1.0, "horizontal": 0.0, "vertical": 0.0, "closest": 1.0, "furthest": 1.0, "count": 0.0}
    out = table.add_families(per, counts)
    non_rel = counts["shape"] / (counts["shape"] + counts["horizontal"] + counts["vertical"])
    rel = (counts["closest"] + counts["furthest"]) / (counts["closest"] + counts["furthest"] + counts["count"])
    assert out["non_relational"] == pytest.approx(non_rel)
    assert out["relational"] == pytest.approx(rel)


def test_table_mean_std_targets_and_markers(tmp_path):
    results = tmp_path / "results"
    per = dict.fromkeys(table.SUBTYPES, 1.0)
    for seed, acc in ((0, 0.5), (1, 0.7)):  # concat: two seeds -> mean ± sample std = 60.0 ± 14.1
        _fake_run(results, "concat", seed, acc, dict(per, closest=0.5), val=acc)
    _fake_run(results, "cross", 0, 0.98, per, val=0.99)
    explore = tmp_path / "explore" / "cross_learned_pos"  # a calibration run: curve + command, not a table row
    explore.mkdir(parents=True)
    (explore / "config.json").write_text(json.dumps({"dataset": {"builder_kwargs": KW, "val_split": "validation"}}))
    (explore / "curve.json").write_text(json.dumps([{"step": 250, "seconds": 99.0, "val_accuracy": 0.51}]))
    (explore / "command.txt").write_text("python train.py --config.model.image_encoder.pos_emb=learn\n")
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nkeep me\n\n<!-- sort_of_clevr:begin -->\nold\n<!-- sort_of_clevr:end -->\n\ntail\n")
    argv = ["--results", str(results), "--out", str(out), "--beyond", str(tmp_path / "none")]
    table.main([*argv, "--explore", str(explore.parent)])
    text = out.read_text()
    assert "keep me" in text and text.rstrip().endswith("tail") and "\nold\n" not in text
    body = text[text.index(table.BEGIN) : text.index(table.END)]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`concat`", "`cross`"]  # table order, not alphabetical
    header = next(line for line in body.splitlines() if line.startswith("| Variant"))
    assert all(len(r.split("|")) == len(header.split("|")) for r in rows)  # well-formed: same column count
    assert "| 60.0 ± 14.1 |" in rows[0] and "| 98.0 |" in rows[1]
    assert "Best attention variant on validation, `cross`" in body and "**met**" in body
    assert "`rn`: no run yet (**not met**)" in body
    assert "600 steps x 160 questions (8 images per batch; 2400.00 epochs of 40 training questions)" in body
    assert body.count("python train.py") == 4  # one command line per run + the calibration run's
    assert f"explore/`: {table.EXPLORE}" in body
    assert "- `cross_learned_pos`: `python train.py --config.model.image_encoder.pos_emb=learn` — " in body
    assert "Flat rows (validation accuracy never rose 3 points above its first point): `concat`, `cross`." in body
    head = table.headline(table.collect(str(results)))  # the README line: best on validation, its test numbers
    assert head.startswith("Sort-of-CLEVR, best of 2 fusion variants on validation: `cross` — test 98.0 % overall")
    assert "100.0 % relational" in head and "is met. 2 of 2 rows never left the answer prior" in head
    # Rewriting replaces the section in place (idempotent).
    table.main([*argv, "--explore", str(explore.parent)])
    assert out.read_text() == text


def test_beyond_budget_run_quotes_its_test_split(tmp_path):
    """A longer run with metrics.json (run_job.py's test output) lists its test accuracy, with the relational /
    non-relational split recomputed from the subtypes weighted by the test split's question counts."""
    d = tmp_path / "cross_seed0_long"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"dataset": {"builder_kwargs": KW, "val_split": "validation"}}))
    (d / "curve.json").write_text(json.dumps([{"step": 400, "seconds": 200.0, "val_accuracy": 0.8}]))
    (d / "command.txt").write_text("python train.py --config.train.num_steps=400\n")
    per = {"shape": 1.0, "horizontal": 1.0, "vertical": 1.0, "closest": 0.0, "furthest": 0.0, "count": 0.0}
    metrics = {"split": "test", "accuracy": 0.5, "checkpoint_step": 300, "per_type": per}
    (d / "metrics.json").write_text(json.dumps(metrics))
    lines = table.beyond_budget(str(tmp_path))
    assert lines[-1] == (
        "- `cross_seed0_long`: `python train.py --config.train.num_steps=400` — step 400 (200 s): 80.0; "
        "test (step-300 checkpoint, best on validation): 50.0/0.0/100.0"
    )
    (d / "metrics.json").unlink()  # not tested: the curve alone
    assert table.beyond_budget(str(tmp_path))[-1].endswith("step 400 (200 s): 80.0")


def test_concat_gap_must_exceed_five_points_and_concat_seed_noise():
    def run(rel):
        per = {**dict.fromkeys(table.SUBTYPES, 0.5), "relational": rel, "non_relational": 0.5}
        return {"accuracy": 0.5, "best_val_accuracy": 0.5, "per_type": per}

    def gap_line(concat_rels, other_rel):
        runs = {"concat": [run(x) for x in concat_rels], "merged": [run(other_rel)]}
        return next(line for line in table.targets(runs) if line.startswith("- `concat`"))

    assert gap_line([0.60], 0.66).endswith("**shown**.")  # +6 points, one seed
    assert gap_line([0.60], 0.64).endswith("**not shown**.")  # +4 points: under 5
    # concat 56.8 ± 8.0 (these three seeds) vs 63.0: +6.2 points, inside concat's seed std -> not shown
    line = gap_line([0.659, 0.534, 0.512], 0.63)
    assert "best other row `merged` 63.0 % (+6.2 points)" in line and line.endswith("**not shown**.")


def test_curve_from_logged_points(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 50, "train/steps_per_sec": 5.0},
        {"step": 100, "train/steps_per_sec": 2.5, "val/accuracy": 0.6, "val/accuracy_count": 0.4},
        {"step": 150, "train/steps_per_sec": 5.0},
    ]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert table.curve_from_metrics(str(log)) == [
        {"step": 100, "seconds": 30.0, "val_accuracy": 0.6, "count": 0.4}  # 50/5 + 50/2.5 s
    ]


@pytest.mark.slow
def test_run_two_variants_end_to_end(tmp_path, monkeypatch):
    """--run on a tiny generated dataset: two variants train, test and land in a well-formed table."""
    # The runs are subprocesses: one CPU device each (conftest's 8 would shard a 2-image batch 8 ways).
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", ""))
    results, out = tmp_path / "results" / "soc", tmp_path / "results.md"
    overrides = [f"--config.dataset.builder_kwargs.{k}={v}" for k, v in KW.items()] + [
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.model.width=16",
        "--config.train.num_steps=2",
        "--config.train.global_batch_size=40",
        "--config.train.images_per_batch=2",
        "--config.train.eval_every_steps=1",
        "--config.train.checkpoint_every_steps=1",
        "--config.train.log_every_steps=1",
        "--config.train.eval_batch_size=40",
        "--config.optim.warmup_steps=1",
        "--config.eval.num_attention_maps=0",
    ]
    argv = [
        "--run",
        "--variants=concat,cross",
        "--results",
        str(results),
        "--out",
        str(out),
        "--beyond",
        "/nonexistent",
        "--explore",
        "/nonexistent",
    ]
    table.main([*argv, "--workdirs", str(tmp_path / "runs"), "--", *overrides])
    for v in ("concat", "cross"):
        files = sorted(os.listdir(results / f"{v}_seed0"))
        assert files == ["config.json", "curve.json", "metrics.json", "summary.json"]  # no checkpoints
        summary = json.loads((results / f"{v}_seed0" / "summary.json").read_text())
        assert summary["params"] > summary["params_fusion"] >= 0 and summary["flops_per_example_forward"] > 0
        assert len(json.loads((results / f"{v}_seed0" / "curve.json").read_text())) == 2  # a validation point per step
    body = out.read_text()
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`concat`", "`cross`"]
    assert all(re.search(r"\| \d+\.\d \| \d+\.\d \| \d+\.\d \|", r) for r in rows)  # overall, rel., non-rel.
