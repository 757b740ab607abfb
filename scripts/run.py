"""Runs one results row end to end and records it: ``python train.py``, then ``python eval.py``, both timed.

  python scripts/run.py --name=easy_vqa --config=configs/easy_vqa.py [--seed=1] [-- --config.train.num_steps=300]
  python scripts/run.py --name=sort_of_clevr/cross_seed0 --config=configs/sort_of_clevr.py:fusion=cross --seed=0
  python scripts/run.py --name=NAME --config=CONFIG --split=validation     # model selection: never the test split
  python scripts/run.py --name=NAME --config=CONFIG --resume               # continue a run stopped by a time limit
  python scripts/run.py --name=NAME --config=CONFIG --eval_only            # the workdir holds a finished run

Any task. Writes results/NAME/{config,metrics,summary,history}.json (+ captions.jsonl; never checkpoints);
summary.json: metrics, wall times, load average seen, the host's float32 matmul peak (--matmul_size) and
provenance (git commit and dirty flag, CPU model / ISA or accelerator, the command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from vtfusion_jax import metrics, speed  # noqa: E402


@contextlib.contextmanager
def sampled_load(period: float = 15.0):
    """Yields a dict that, on exit, holds {"mean", "max", "samples"} of the 1-minute load average sampled every
    ``period`` s on a thread: wall times on a shared machine are only comparable together with the load they saw."""
    samples, stop, summary = [], threading.Event(), {}

    def loop() -> None:
        while True:
            samples.append(os.getloadavg()[0])
            if stop.wait(period):
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield summary
    finally:
        stop.set()
        thread.join()
        x = samples or [float("nan")]
        summary.update(mean=round(sum(x) / len(x), 2), max=round(max(x), 2), samples=len(samples))


def history(metrics_jsonl: str) -> dict:
    """{"validation": [{step, <val/ metrics>}], "train": [{step, <train/ metrics>}]} from a run's metrics.jsonl."""
    try:
        rows = metrics.read_jsonl(metrics_jsonl)
    except ValueError as e:  # CorruptFileError: "path:line: not JSON ..."
        raise SystemExit(str(e)) from None
    out: dict[str, list[dict]] = {"validation": [], "train": []}
    for row in rows:
        for prefix, key in (("val/", "validation"), ("train/", "train")):
            part = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
            if part:
                out[key].append({"step": int(row["step"]), **part})
    return out


def _timed(cmd: list[str], nice: int) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run((["nice", "-n", str(nice)] if nice else []) + cmd, cwd=REPO, check=True)
    return time.time() - start


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> dict:
    """Parses the flags, runs train + eval, writes results/NAME/ and returns the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="writes <results_dir>/<name>/")
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--seed", type=int, default=None, help="--config.seed=S")
    p.add_argument("--split", default="test", help="the split eval.py scores (validation for model selection)")
    p.add_argument("--workdir", default=None, help="default: runs/<name> (must not hold an older run)")
    p.add_argument("--results_dir", default=os.path.join(REPO, "results"))
    p.add_argument("--nice", type=int, default=0, help="run train / eval under nice -n N")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir (earlier runs are kept)")
    p.add_argument("--eval_only", action="store_true", help="evaluate the finished run in --workdir")
    p.add_argument("--matmul_size", type=int, default=2048, help="float32 matmul peak on [N, N] first (0: skip)")
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
    a = p.parse_args(argv)
    workdir = os.path.join(REPO, a.workdir or os.path.join("runs", a.name))
    if os.path.exists(os.path.join(workdir, "checkpoints")) and not (a.resume or a.eval_only):
        sys.exit(f"{workdir} already holds a run: pick a fresh --workdir (or --resume) so the time covers one run")
    overrides = [*(() if a.seed is None else [f"--config.seed={a.seed}"]), *a.overrides]
    common = [f"--config={a.config}", f"--workdir={workdir}", *overrides]
    train_cmd = [sys.executable, "train.py", *common]
    eval_cmd = [sys.executable, "eval.py", *common, f"--split={a.split}"]
    this = ["python scripts/run.py", *(argv if argv is not None else sys.argv[1:])]
    provenance = speed.provenance(" ".join(this))  # the code the run starts on (a commit during the run must not count)
    # The host's float32 matmul peak (what the times mean on another host; speed.matmul_peak), before the run.
    peak = speed.matmul_peak(n=a.matmul_size) if a.matmul_size else None
    with sampled_load() as load:
        train_s = None if a.eval_only else _timed(train_cmd, a.nice)
        eval_s = _timed(eval_cmd, a.nice)

    out = os.path.join(a.results_dir, a.name)
    os.makedirs(out, exist_ok=True)
    split_dir = os.path.join(workdir, "eval", a.split)
    for name in [n for n in ("metrics.json", "captions.jsonl") if os.path.exists(os.path.join(split_dir, n))]:
        shutil.copy(os.path.join(split_dir, name), os.path.join(out, name))
    shutil.copy(os.path.join(workdir, "config.json"), os.path.join(out, "config.json"))
    train_summary = _read(os.path.join(workdir, "train_summary.json"))
    if train_s is None:  # --eval_only: the in-process wall time train.py recorded
        train_s = train_summary["wall_seconds"]
    previous = []
    if a.resume and os.path.exists(os.path.join(out, "summary.json")):
        old = _read(os.path.join(out, "summary.json"))
        previous = old.get("previous_runs", []) + [{k: old.get(k) for k in ("command", "train_seconds", "load")}]
    commands = [" ".join(["python", *c[1:]]).replace(REPO + os.sep, "") for c in (train_cmd, eval_cmd)]
    summary = dict(name=a.name, split=a.split, commands=commands, metrics=_read(os.path.join(out, "metrics.json")))
    summary["train"] = train_summary  # train.py's own summary: steps, best validation, stop reason
    summary.update(train_seconds=round(train_s, 1), eval_seconds=round(eval_s, 1))
    summary["total_train_seconds"] = round(train_s + sum(r["train_seconds"] or 0 for r in previous), 1)
    summary["load"] = load  # 1-minute load average during train + eval (> CPU count: the times are inflated)
    summary["matmul_peak"] = peak  # {"flops_per_s" (best of 5), "median_flops_per_s", "n", ...} or None
    summary.update(eval_only=a.eval_only, previous_runs=previous, **provenance)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(history(os.path.join(workdir, "metrics.jsonl")), f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "host"}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
