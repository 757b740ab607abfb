"""Accuracy of easy-VQA yes/no questions by (asked about colour | shape) x (negated | plain) x (answer), from
eval predictions: shows whether a model has learnt the negated-colour case ("is there not a red shape?" on a red
shape, answer no: 3.6 % of training questions), the main job's last error mode.

  python scripts/easy_vqa_yes_no_breakdown.py runs/easy_vqa/eval/validation/predictions.jsonl [more.jsonl ...]
"""

import collections
import json
import re
import sys

COLOURS = re.compile(r"\b(red|green|blue|black|gray|teal|brown|yellow)\b")


def breakdown(path: str) -> tuple[float, dict[tuple[str, str, str], tuple[int, int]]]:
    """(overall accuracy, {(colour|shape, negated|plain, answer): (correct, total)}) of one predictions.jsonl."""
    rows = [json.loads(line) for line in open(path)]
    if not rows:
        raise ValueError(f"{path}: no predictions")
    cells: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        if r["answer"] not in ("yes", "no"):
            continue
        q = r["question"]
        negated = " not " in q or q.startswith("is no ")
        key = ("colour" if COLOURS.search(q) else "shape", "negated" if negated else "plain", r["answer"])
        cells[key][0] += bool(r["correct"])
        cells[key][1] += 1
    accuracy = sum(bool(r["correct"]) for r in rows) / len(rows)
    return accuracy, {k: (v[0], v[1]) for k, v in sorted(cells.items())}


def by_colour(path: str) -> dict[str, tuple[int, int]]:
    """{asked colour: (correct, total)} over the negated-colour questions answered "no" (the hard cell): shows
    whether a model learnt the case for every colour or colour by colour."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for line in open(path):
        r = json.loads(line)
        q, m = r["question"], COLOURS.search(r["question"])
        if m and r["answer"] == "no" and (" not " in q or q.startswith("is no ")):
            out[m.group(1)][0] += bool(r["correct"])
            out[m.group(1)][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def main(paths: list[str]) -> None:
    for path in paths:
        accuracy, cells = breakdown(path)
        print(f"{path}: accuracy {100 * accuracy:.2f} %")
        for (kind, neg, answer), (ok, n) in cells.items():
            print(f"  {kind:6s} {neg:7s} answer {answer:3s}: {ok:5d} / {n:5d} = {100 * ok / n:6.2f} %")
        colours = by_colour(path)
        print("  negated colour, answer no, by colour: " + ", ".join(f"{c} {ok}/{n}" for c, (ok, n) in colours.items()))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
