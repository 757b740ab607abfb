"""Markdown table of every results/<name>/summary.json (written by scripts/run_job.py); paste-free: the README and
docs include its output verbatim.

  python scripts/results_table.py [results/easy_vqa ...]
"""

import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(s: dict) -> str:
    per_type = ", ".join(f"{k} {100 * v:.2f}" for k, v in s["per_type"].items())
    la = s.get("load_average_1min")  # recorded by run_job.py since issue 5
    load = f"{la['mean']:.1f} / {la['max']:.1f}" if la else "not recorded"
    return (
        f"| {s['name']} | {100 * s['accuracy']:.2f} % ({s['split']}, {s['num_examples']}) | {per_type} | "
        f"{s['train_plus_eval_seconds'] / 60:.1f} min (+{s['dataset_build_seconds']:.0f} s build) | {load} | "
        f"`{s['commands'][0]}` then `{s['commands'][1]}` |"
    )


def main() -> None:
    dirs = sys.argv[1:] or sorted(glob.glob(os.path.join(REPO, "results", "*")))
    print("| run | accuracy | per type (%) | train + eval wall | load (mean / max) | commands |")
    print("| --- | --- | --- | --- | --- | --- |")
    for d in dirs:
        path = os.path.join(d, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                s = json.load(f)
            if s.get("task", "vqa") == "vqa":  # retrieval / captioning rows: scripts/task_tables.py
                print(row(s))


if __name__ == "__main__":
    main()
