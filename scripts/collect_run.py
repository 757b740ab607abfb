"""Copies the small summary of a training run into results/ (never checkpoints), for exploration runs.

  python scripts/collect_run.py RUN_DIR results/NAME [--every=60]

Writes results/NAME/config.json, train_summary.json (when the run finished or was preempted) and history.json: the
validation metrics at each evaluation and the training accuracy / loss every ``--every`` steps, read from
RUN_DIR/metrics.jsonl. Notes that quote a run's trajectory quote these files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil


def history(metrics_jsonl: str, every: int) -> dict:
    """{"validation": [{step, accuracy, per_type...}], "train": [{step, accuracy, loss}]} from a metrics.jsonl."""
    val, train = [], []
    with open(metrics_jsonl) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{metrics_jsonl}:{n}: not JSON ({e})") from None
            step = int(row["step"])
            if "val/accuracy" in row:
                val.append({"step": step, **{k[4:]: v for k, v in row.items() if k.startswith("val/")}})
            if "train/accuracy" in row and step % every == 0:
                train.append({"step": step, "accuracy": row["train/accuracy"], "loss": row["train/loss"]})
    return {"validation": val, "train": train}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--every", type=int, default=60, help="training-metric stride in steps")
    a = p.parse_args(argv)
    src = os.path.join(a.run_dir, "metrics.jsonl")
    if not os.path.exists(src):
        raise SystemExit(f"{src}: no such file (is {a.run_dir} a training workdir?)")
    os.makedirs(a.out_dir, exist_ok=True)
    for name in ("config.json", "train_summary.json"):
        if os.path.exists(os.path.join(a.run_dir, name)):
            shutil.copy(os.path.join(a.run_dir, name), os.path.join(a.out_dir, name))
    with open(os.path.join(a.out_dir, "history.json"), "w") as f:
        json.dump(history(src, a.every), f, indent=1)
    print(f"wrote {a.out_dir}")


if __name__ == "__main__":
    main()
