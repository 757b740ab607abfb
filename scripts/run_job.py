"""Runs one results-table row end to end and records it: train.py, then eval.py on the test split, timed.

  python scripts/run_job.py --name=easy_vqa --config=configs/easy_vqa.py [--workdir=runs/easy_vqa] [-- --config.x=y]
  python scripts/run_job.py --name=easy_vqa --config=configs/easy_vqa.py --eval_only   # finished run, eval again

Writes results/<name>/{summary.json, metrics.json, config.json} (no checkpoints): summary.json holds the exact
commands, the wall time of each (the dataset build is timed separately, since it is a one-time cost) and the test
metrics. scripts/results_table.py turns results/*/summary.json into the markdown tables of README / docs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _LoadSampler:
    """Samples the 1-minute load average every ``period`` s on a thread (the machine may be shared: wall times
    are only comparable together with the load they saw)."""

    def __init__(self, period: float = 15.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)

    def _loop(self, period: float) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(period):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        x = self.samples or [float("nan")]
        return {"mean": round(sum(x) / len(x), 2), "max": round(max(x), 2), "samples": len(self.samples)}


def _run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.time() - start


def model_stats(workdir: str) -> dict:
    """Parameters and analytic forward FLOPs per example (vtfusion_jax/flops.py) of the model a run recorded in
    ``workdir/config.json``: a table row reports its cost beside its accuracy."""
    sys.path.insert(0, REPO)
    import jax

    from vtfusion_jax import eval_lib, flops, train_lib

    config = eval_lib.load_config(workdir)
    meta = train_lib.get_meta(config)
    tokenizer = train_lib.make_tokenizer(config)
    model = train_lib.build_model(config, meta["num_classes"], tokenizer.vocab_size)
    side, text_len = train_lib.image_size(config, meta), int(config.dataset.max_len)
    batch = {
        "image": jax.ShapeDtypeStruct((1, side, side, 3), "float32"),
        "text_ids": jax.ShapeDtypeStruct((1, text_len), "int32"),
        "text_mask": jax.ShapeDtypeStruct((1, text_len), "bool"),
    }
    params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    f = flops.model_flops(
        train_lib.model_spec(config, tokenizer.vocab_size), (side, side), text_len, meta["num_classes"]
    )
    return {
        "params": flops.param_count(params),
        "params_fusion": flops.param_count(params.get("fusion", {})),  # the part that differs between rows
        "flops_per_example_forward": f["forward"],
        "flops_per_example_train": f["train"],
        "flops_by_part": {k: f[k] for k in ("image_encoder", "text_encoder", "fusion", "head")},
        "flops_note": "analytic matmul/conv FLOPs per example (vtfusion_jax/flops.py); the image tower is counted "
        "once per question (image-grouped batches encode each image once per batch: less in practice)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results/<name>/")
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", default=None, help="default: runs/<name> (must not hold an older run)")
    p.add_argument("--split", default="test")
    p.add_argument("--results_dir", default=os.path.join(REPO, "results"), help="writes <results_dir>/<name>/")
    p.add_argument(
        "--eval_only",
        action="store_true",
        help="the workdir holds a finished training run (e.g. its eval failed): evaluate and record it; train "
        "time then comes from workdir/train_summary.json (in-process wall time), the load is sampled during eval "
        "only, and the overrides apply to eval only (to rebuild the trained model if the config file changed since)",
    )
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
    a = p.parse_args()
    workdir = a.workdir or os.path.join("runs", a.name)
    if os.path.exists(os.path.join(REPO, workdir, "checkpoints")) and not a.eval_only:
        sys.exit(f"{workdir} already holds a run: pick a fresh --workdir so the timing covers a whole run")
    if a.eval_only and not os.path.exists(os.path.join(REPO, workdir, "train_summary.json")):
        sys.exit(f"--eval_only: {workdir}/train_summary.json not found (training did not finish)")
    py = sys.executable
    t0 = time.time()
    meta_cmd = [py, os.path.join(REPO, "scripts", "build_dataset.py"), f"--config={a.config}", *a.overrides]
    build_s = _run(meta_cmd)
    train_cmd = [py, "train.py", f"--config={a.config}", f"--workdir={workdir}", *a.overrides]
    eval_cmd = [py, "eval.py", f"--config={a.config}", f"--workdir={workdir}", f"--split={a.split}", *a.overrides]
    if a.eval_only:  # the overrides rebuild the trained model for eval only; training ran without them
        train_cmd = [py, "train.py", f"--config={a.config}", f"--workdir={workdir}"]
    with _LoadSampler() as load:
        train_s = None if a.eval_only else _run(train_cmd)
        eval_s = _run(eval_cmd)
    out = os.path.join(a.results_dir, a.name)
    os.makedirs(out, exist_ok=True)
    split_dir = os.path.join(REPO, workdir, "eval", a.split)
    shutil.copy(os.path.join(split_dir, "metrics.json"), os.path.join(out, "metrics.json"))
    shutil.copy(os.path.join(REPO, workdir, "config.json"), os.path.join(out, "config.json"))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(REPO, workdir, "train_summary.json")) as f:
        train_summary = json.load(f)
    if train_s is None:
        train_s = train_summary["wall_seconds"]
    summary = {
        "name": a.name,
        "commands": [" ".join(["python", *c[1:]]) for c in (train_cmd, eval_cmd)],
        "split": a.split,
        "accuracy": metrics["accuracy"],
        "per_type": metrics["per_type"],
        "num_examples": metrics["num_examples"],
        "checkpoint_step": metrics["checkpoint_step"],
        "best_val_accuracy": train_summary["best_val_accuracy"],
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "train_plus_eval_seconds": round(train_s + eval_s, 1),
        "dataset_build_seconds": round(build_s, 1),
        "total_seconds_with_build": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_1min": load.summary(),  # during train + eval (other jobs share the CPUs when > cpu count)
    }
    summary.update(model_stats(os.path.join(REPO, workdir)))
    if a.eval_only:
        summary["train_seconds_from"] = "train_summary.json wall_seconds (in-process; --eval_only)"
        summary["load_average_1min"]["covers"] = "eval only (--eval_only)"
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
