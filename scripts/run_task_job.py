"""Runs one retrieval / captioning row end to end and records it: train.py, then eval.py on the test split, timed.

  python scripts/run_task_job.py --name=sort_of_clevr_retrieval --config=configs/sort_of_clevr_retrieval.py \
      [--workdir=runs/NAME] [--nice=19] [-- --config.train.num_steps=2000]

Writes results/<name>/{summary.json, metrics.json, config.json, history.json} (no checkpoints; captions.jsonl for
captioning; history.json = every validation point and the logged training losses, from workdir/metrics.jsonl):
summary.json holds the exact commands, wall times, the 1-minute load average seen during the run (the machine is
shared) and the test metrics. scripts/task_tables.py turns these summaries into the docs/results.md tables.
(scripts/run_job.py is the classification counterpart.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_job import _LoadSampler, _run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def history(metrics_jsonl: str) -> dict:
    """{"validation": [{step, <val metrics>}], "train": [{step, <train metrics>}]} from a task run's metrics.jsonl."""
    val, train = [], []
    with open(metrics_jsonl) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{metrics_jsonl}:{n}: not JSON ({e})") from None
            for prefix, out in (("val/", val), ("train/", train)):
                part = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
                if part:
                    out.append({"step": int(row["step"]), **part})
    return {"validation": val, "train": train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results/<name>/")
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", default=None, help="default: runs/<name> (must not hold an older run)")
    p.add_argument("--split", default="test")
    p.add_argument("--nice", type=int, default=0, help="run train / eval under nice -n N (shared machines)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir (e.g. after train.time_limit_seconds); earlier invocations recorded in "
        "results/<name>/summary.json are kept under previous_runs",
    )
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
    a = p.parse_args()
    workdir = a.workdir or os.path.join("runs", a.name)
    if os.path.exists(os.path.join(REPO, workdir, "checkpoints")) and not a.resume:
        sys.exit(f"{workdir} already holds a run: pick a fresh --workdir so the timing covers a whole run")
    nice = ["nice", "-n", str(a.nice)] if a.nice else []
    py = sys.executable
    train_cmd = [py, "train.py", f"--config={a.config}", f"--workdir={workdir}", *a.overrides]
    eval_cmd = [py, "eval.py", f"--config={a.config}", f"--workdir={workdir}", f"--split={a.split}", *a.overrides]
    with _LoadSampler() as load:
        train_s = _run(nice + train_cmd)
        eval_s = _run(nice + eval_cmd)
    out = os.path.join(REPO, "results", a.name)
    os.makedirs(out, exist_ok=True)
    split_dir = os.path.join(REPO, workdir, "eval", a.split)
    for name in ("metrics.json", "captions.jsonl"):
        if os.path.exists(os.path.join(split_dir, name)):
            shutil.copy(os.path.join(split_dir, name), os.path.join(out, name))
    shutil.copy(os.path.join(REPO, workdir, "config.json"), os.path.join(out, "config.json"))
    previous = []
    if a.resume and os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            old = json.load(f)
        previous = old.get("previous_runs", []) + [
            {k: old[k] for k in ("commands", "train_steps", "train_seconds", "eval_seconds", "load_average_1min")}
        ]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(REPO, workdir, "train_summary.json")) as f:
        train_summary = json.load(f)
    summary = {
        "name": a.name,
        "task": metrics["task"],
        "commands": [" ".join(["python", *c[1:]]) for c in (train_cmd, eval_cmd)],
        "nice": a.nice,
        "split": a.split,
        "metrics": {k: v for k, v in metrics.items() if k != "protocol"},
        "protocol": metrics["protocol"],
        "train_steps": train_summary["step"],
        "best_step": train_summary["best_step"],
        "best_val": train_summary["best_val"],
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_1min": load.summary(),
        "previous_runs": previous,  # earlier invocations of a resumed run (their train time adds up)
        "total_train_seconds": round(train_s + sum(r["train_seconds"] for r in previous), 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history(os.path.join(REPO, workdir, "metrics.jsonl")), f, indent=1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
