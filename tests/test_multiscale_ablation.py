"""scripts/multiscale_ablation.py: the rows differ only in image_encoder.scales, and its docs writer replaces its own
section of docs/results.md and nothing else (the Sort-of-CLEVR table shares the file)."""

import importlib.util
import json
import os

import pytest

from vtfusion_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "multiscale_ablation", os.path.join(REPO, "scripts", "multiscale_ablation.py")
)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def _summary(acc, per_type, scales, tokens):
    return {
        "accuracy": acc,
        "per_type": per_type,
        "train_seconds": 123.4,
        "load_average_1min": {"mean": 2.5, "max": 3.0},
        "commands": ["python train.py --config=configs/multiscale.py:base=x --workdir=w", "python eval.py"],
        "model_size": {"params": 1234567, "forward_flops_per_example": 2.5e8, "image_tokens": tokens, "scales": scales},
    }


def test_rows_differ_only_in_scales():
    rows = ablation.rows()
    assert sorted(r["name"] for r in rows) == [
        "easy_vqa_multi", "easy_vqa_single", "sort_of_clevr_multi", "sort_of_clevr_single"
    ]  # fmt: skip
    for dataset in ("easy_vqa", "sort_of_clevr"):
        single, multi = (next(r for r in rows if r["name"] == f"{dataset}_{k}") for k in ("single", "multi"))
        assert single["overrides"] == multi["overrides"]
        a, b = (load_config(os.path.join(REPO, r["config"])).to_dict() for r in (single, multi))
        assert a["model"]["image_encoder"].pop("scales") == () and b["model"]["image_encoder"].pop("scales") == (-2, -1)
        assert a == b  # everything else identical, fusion cross in both
        assert a["model"]["fusion"]["name"] == "cross"


def test_writer_replaces_only_its_section(tmp_path):
    other = "<!-- sort_of_clevr:begin -->\n| variant | acc |\n|---|---|\n| cross | 97 |\n<!-- sort_of_clevr:end -->\n"
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nIntro text.\n\n" + other + "\nTrailing notes.\n")
    results = tmp_path / "multiscale"

    for name, s in {
        "easy_vqa_single": _summary(0.9, {"yes_no": 0.8, "color": 1.0, "shape": 1.0}, [], 64),
        "sort_of_clevr_multi": _summary(0.7, {"relational": 0.6, "non_relational": 0.8}, [-2, -1], 461),
    }.items():
        (results / name).mkdir(parents=True)
        (results / name / "summary.json").write_text(json.dumps(s))
    first = ablation.write_docs(str(results), str(docs))
    assert first.startswith("# Results\n\nIntro text.\n\n" + other + "\nTrailing notes.\n")
    section = first[first.index(ablation.BEGIN) : first.index(ablation.END)]
    assert (
        "| single (last) | 64 | 90.00 | 80.00 | 100.00 | 100.00 | 1,234,567 | 250.0 | 123 | 2.5 (max 3.0) |" in section
    )
    assert "| multi (-2, -1) | 461 | 70.00 | 60.00 | 80.00 |" in section
    assert "| multi | not run |" in section and "| single | not run |" in section
    assert "Multi minus single" not in section  # no complete pair yet
    # A second write (new numbers) replaces the section in place; the other table and the text stay byte-identical.
    docs.write_text(first.replace("Trailing notes.", "Trailing notes, edited by someone else."))
    (results / "easy_vqa_single" / "summary.json").write_text(
        json.dumps(_summary(0.95, {"yes_no": 0.9, "color": 1.0, "shape": 1.0}, [], 64))
    )
    second = ablation.write_docs(str(results), str(docs))
    assert second.count(ablation.BEGIN) == 1 and "| 64 | 95.00 |" in second and "| 64 | 90.00 |" not in second
    assert other in second and "edited by someone else" in second
    (results / "easy_vqa_multi").mkdir()
    (results / "easy_vqa_multi" / "summary.json").write_text(
        json.dumps(_summary(0.97, {"yes_no": 0.95, "color": 1.0, "shape": 1.0}, [-2, -1], 320))
    )
    third = ablation.write_docs(str(results), str(docs))
    assert "Multi minus single: +2.00 points test accuracy (yes_no +5.00, color +0.00, shape +0.00)" in third
    assert second.index(ablation.BEGIN) > second.index("Trailing notes")  # appended once, then kept in place


def test_half_a_marker_pair_is_an_error():
    with pytest.raises(ValueError, match="only one of"):
        ablation.replace_section(f"x\n{ablation.BEGIN}\nold\n", "new")
