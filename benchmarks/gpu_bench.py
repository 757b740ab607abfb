"""GPU benchmark: the train step on one H100/H200 with attention_impl auto, xla and cudnn.

    python benchmarks/gpu_bench.py --out_dir=results/perf            # on the GPU machine
    python benchmarks/gpu_bench.py --tiny --out_dir=/tmp/gpu_smoke   # anywhere: the same code path, tiny model

configs/perf.py's ``gpu`` preset (bf16, scanned); writes ``gpu_<impl>.json`` as each finishes, ``auto`` first (with
the kernel it resolved to), then ``xla`` and ``cudnn`` unless "auto" resolved to them ("same_as": "auto") or the time
budget is spent (no GPU: cuDNN recorded as skipped, with the reason). Needs only jax, flax, optax, numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as bench_lib  # noqa: E402  (benchmarks/train_step.py)

from vtfusion_jax import attention, speed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny preset in bf16 (CPU smoke of this script)")
    p.add_argument("--out_dir", default=os.environ.get("OUT", "results/perf"), help="where the JSON files go")
    p.add_argument("--steps", type=int, default=0, help="timed steps (0 = the preset's)")
    p.add_argument("--budget_s", type=float, default=270.0, help="skip the second run if less time is left")
    args = p.parse_args(argv)
    t_start = time.time()
    import jax

    command = "python benchmarks/gpu_bench.py" + (" --tiny" if args.tiny else "")
    spec = os.path.join(REPO, "configs", "perf.py") + (":preset=tiny" if args.tiny else ":preset=gpu")
    prefix = "gpu_tiny_" if args.tiny else "gpu_"  # the JSON files' names
    steps = [f"bench.steps={args.steps}"] if args.steps else []
    overrides = ["model.dtype=bfloat16", "model.scan_layers=True", *steps]
    base = bench_lib.load_config(spec, overrides)
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"command": command, "host": speed.host_info(), "runs": {}}
    print(json.dumps(summary["host"]), flush=True)
    state = None
    heads = base["model"]["image_encoder"]["num_heads"]  # what "auto" picks for the model's attention
    q = jax.ShapeDtypeStruct((1, 1, heads, base["model"]["width"] // heads), jax.numpy.dtype(base["model"]["dtype"]))
    resolved = attention.resolve_implementation("auto", q)
    for impl in ("auto", "xla", "cudnn"):
        elapsed = time.time() - t_start
        if impl == resolved:  # measured as "auto"
            summary["runs"][impl] = {"same_as": "auto"}
            continue
        if impl == "cudnn" and jax.default_backend() != "gpu":
            summary["runs"][impl] = {"skipped": f"cuDNN attention needs a CUDA GPU (backend: {jax.default_backend()})"}
            continue
        if state is not None and elapsed > args.budget_s * 0.55:
            summary["runs"][impl] = {"skipped": f"time budget: {elapsed:.0f} s used of {args.budget_s:.0f} s"}
            continue
        try:
            # --tiny is a smoke run of this script: the unoptimised XLA backend compiles about twice as fast.
            options = {"xla_backend_optimization_level": 0} if args.tiny else None
            cfg = dict(base, model=dict(base["model"], attention_impl=impl))
            bench = bench_lib.Bench(cfg, compiler_options=options, state=state)
            result = bench_lib.run(cfg, bench=bench, command=f"{command}  # attention_impl={impl}")
            state = bench.state
        except Exception as e:  # record and go on: the other implementation may still run
            summary["runs"][impl] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"{impl}: {type(e).__name__}: {e}", flush=True)
            continue
        result["elapsed_s"] = time.time() - t_start
        with open(os.path.join(args.out_dir, f"{prefix}{impl}.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
        keys = ("num_params", "step_s_median", "examples_per_s", "mfu_measured_peak", "mfu_datasheet", "compile")
        summary["runs"][impl] = {k: result.get(k) for k in keys}
        summary["runs"][impl]["resolved_to"] = resolved if impl == "auto" else impl
        print(impl, json.dumps(summary["runs"][impl], default=float), flush=True)
    runs = summary["runs"]
    times = {i: runs[i]["step_s_median"] for i in runs if "step_s_median" in runs[i]}
    times.update({i: times["auto"] for i in runs if "same_as" in runs[i] and "auto" in times})
    if "xla" in times:
        summary.update({f"{i}_speedup_over_xla": times["xla"] / times[i] for i in ("auto", "cudnn") if i in times})
    summary["elapsed_s"] = time.time() - t_start
    with open(os.path.join(args.out_dir, f"{prefix}summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    print(json.dumps({k: v for k, v in summary.items() if k != "host"}, default=float), flush=True)
    return summary


if __name__ == "__main__":
    main()
