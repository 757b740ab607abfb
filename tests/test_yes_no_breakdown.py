"""scripts/easy_vqa_yes_no_breakdown.py: the yes/no cells and the per-colour view of the negated-colour cell."""

import importlib.util
import json
import os

_spec = importlib.util.spec_from_file_location(
    "breakdown", os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "easy_vqa_yes_no_breakdown.py")
)
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)

ROWS = [
    ("is there not a red shape?", "no", True),
    ("is there not a red shape?", "no", False),
    ("is no blue shape present?", "no", False),
    ("does the image not contain a gray shape?", "yes", True),
    ("is there a red shape?", "yes", True),
    ("is there not a circle?", "no", True),
    ("what color is the shape?", "teal", False),
]


def test_cells_and_colours(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(dict(question=q, answer=a, correct=c)) + "\n" for q, a, c in ROWS))
    accuracy, cells = bd.breakdown(str(path))
    assert accuracy == 4 / 7  # every row counts, the colour question too
    assert cells == {
        ("colour", "negated", "no"): (1, 3),
        ("colour", "negated", "yes"): (1, 1),
        ("colour", "plain", "yes"): (1, 1),
        ("shape", "negated", "no"): (1, 1),
    }
    assert bd.by_colour(str(path)) == {"blue": (0, 1), "red": (1, 2)}
