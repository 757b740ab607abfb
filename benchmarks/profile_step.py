"""Where the CPU step time goes: ours (per XLA thunk) beside PyTorch eager (per aten op), one core each, one process.

    python benchmarks/profile_step.py --config=configs/perf.py --out=results/perf/cpu_profile.json
    python benchmarks/profile_step.py --config=configs/perf.py:preset=tiny --steps=1 --no_torch     # smoke

The process pins itself to one core before jax starts, so XLA:CPU runs one thunk at a time on one thread and every
thunk's duration in a ``jax.profiler`` trace is its own cost (with two threads, thunks overlap and matmul work done by
pool threads is not attributed). Each thunk is put in one bucket:
  matmul         dot thunks (XLA's YNNPACK / XNNPACK fusions and Eigen dots), with FLOPs from the HLO, so that the
                 JSON also gives GFLOP/s per dot shape;
  attention / mlp / layernorm / embeddings   element-wise fusions whose jax op name is inside that part of the model
                 (softmax, masking, head transposes; GELU and bias; LayerNorm forward and backward);
  optimizer+loss everything outside the model (AdamW, clipping, loss, metrics);
  other model    the rest of the model (residual adds, pooling, ...).
PyTorch eager (benchmarks/torch_peer.py's model, one thread) is profiled with torch.profiler over the same steps:
matmul = aten mm / addmm / bmm / convolution, attention = scaled_dot_product_attention, the rest by op.
It also counts minor page faults per step (the cost vtfusion_jax/host_memory.py removes; applied here as in train.py).
Runs on jax + flax + optax + numpy (+ torch unless --no_torch).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_args  # noqa: E402  (benchmarks/bench_args.py, stdlib only)

THUNK_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")  # trace lines (threads) where XLA:CPU runs thunks
BUCKETS = ("matmul", "attention", "mlp", "layernorm", "embeddings", "optimizer+loss", "other model")


def _pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


# ------------------------------------------------------------------------------------------------ HLO parsing


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[int]]]:
    """Instruction name -> its line, computation name -> its lines, instruction name -> its array shape."""
    lines, comps, shapes = {}, {}, {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            current = m.group(1)
            comps[current] = []
            continue
        if current is not None:
            comps[current].append(line)
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", line)
        if m:
            lines[m.group(1)] = line.strip()
            shapes[m.group(1)] = [int(x) for x in m.group(3).split(",") if x]
    return lines, comps, shapes


def dot_flops(line: str, shapes: dict[str, list[int]]) -> tuple[int, str]:
    """FLOPs (2 per multiply-add) of an HLO dot line and a short signature 'lhs [..] -> out [..]'."""
    m = re.search(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
    lhs = shapes.get(m.group(1), []) if m else []
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    out = [int(x) for x in re.search(r"= \w+\[([\d,]*)\]", line).group(1).split(",") if x]
    k = 1
    for d in (int(x) for x in contracting.group(1).split(",") if x) if contracting else ():
        k *= lhs[d] if d < len(lhs) else 1
    n = 1
    for d in out:
        n *= d
    return 2 * n * k, f"{lhs} -> {out}"


def bucket_of(op_name: str) -> str:
    """The bucket of an element-wise thunk from its jax op name (metadata op_name)."""
    if "VisionTextModel" not in op_name:
        return "optimizer+loss"
    if "embed" in op_name:
        return "embeddings"
    if re.search(r"(_ln|final_ln|/ln|norm)/", op_name):
        return "layernorm"
    if re.search(r"attn|_to_|attention|vmap\(", op_name):
        return "attention"
    if "mlp" in op_name:
        return "mlp"
    return "other model"


def classify_events(durations: dict[str, float], hlo_text: str) -> dict:
    """Buckets thunk durations (ms per step, by HLO instruction name) and rates the dots."""
    lines, comps, shapes = parse_hlo(hlo_text)
    buckets = collections.Counter()
    dots = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0, "n": 0})
    for name, ms in durations.items():
        line = lines.get(name)
        if line is None:
            continue
        dot_line = line if " dot(" in line else None
        if dot_line is None and "kind=kCustom" in line:
            called = re.search(r"calls=%([\w.\-]+)", line)
            inner = [x for x in comps.get(called.group(1), []) if " dot(" in x] if called else []
            dot_line = inner[0] if inner else None
        if dot_line is not None:
            flops, sig = dot_flops(dot_line, shapes)
            engine = "eigen" if " dot(" in line else "ynn/xnn"
            phase = "backward" if "transpose(" in line else "forward"
            d = dots[f"{engine} {phase} {sig}"]
            d["ms"] += ms
            d["gflop"] += flops / 1e9
            d["n"] += 1
            buckets["matmul"] += ms
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        buckets[bucket_of(op.group(1) if op else "")] += ms
    total_dot_ms = sum(d["ms"] for d in dots.values())
    total_dot_gflop = sum(d["gflop"] for d in dots.values())
    top = sorted(dots.items(), key=lambda kv: -kv[1]["ms"])[:12]
    return {
        "bucket_ms": {b: buckets.get(b, 0.0) for b in BUCKETS},
        "total_ms": sum(buckets.values()),
        "matmul_gflop": total_dot_gflop,
        "matmul_gflop_per_s": total_dot_gflop / (total_dot_ms / 1e3) if total_dot_ms else float("nan"),
        "top_dots": [
            {"dot": k, "ms": v["ms"], "count": v["n"], "gflop_per_s": v["gflop"] / (v["ms"] / 1e3)} for k, v in top
        ],
    }


# ------------------------------------------------------------------------------------------------ the two sides


def profile_ours(bench, steps: int) -> dict:
    import jax

    for _ in range(2):
        bench.step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        bench.step()
    wall = (time.perf_counter() - t0) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            bench.step()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
    durations = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            # XLA:CPU runs thunks on its pool thread, and some inline on the client thread that launched the step
            # (how many varies from run to run): count both; each thunk runs, and is traced, on one of them.
            if not line.name.startswith(THUNK_THREADS):
                continue
            for ev in line.events:
                durations[ev.name] += ev.duration_ns / 1e6 / steps
    out = classify_events(durations, bench.compiled.as_text())
    out.update(step_ms=wall * 1e3, page_faults_per_step=faults)
    return out


TORCH_BUCKETS = {
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::convolution_backward": "matmul",
    "aten::mkldnn_convolution": "matmul",
    "aten::gelu": "mlp",
    "aten::gelu_backward": "mlp",
    "aten::native_layer_norm": "layernorm",
    "aten::native_layer_norm_backward": "layernorm",
    "aten::embedding_dense_backward": "embeddings",
    "aten::_fused_adamw_": "optimizer+loss",
}


def profile_torch(cfg: dict, steps: int) -> dict:
    import torch
    import torch_peer
    import train_step as jax_bench
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    torch.manual_seed(int(cfg["seed"]))
    trainer = torch_peer.TorchTrainer(
        torch_peer.TorchModel(cfg), cfg, jax_bench.synthetic_batch(cfg, int(cfg["seed"])), None
    )
    for _ in range(2):
        trainer.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step()
    buckets = collections.Counter()
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / steps
        name = e.key
        if "scaled_dot_product" in name:
            b = "attention"
        elif name in TORCH_BUCKETS:
            b = TORCH_BUCKETS[name]
        elif "Optimizer" in name or "adamw" in name or ("norm" in name and "layer" not in name):  # AdamW, clipping
            b = "optimizer+loss"
        else:
            b = "other model"
        buckets[b] += ms
    return {
        "bucket_ms": {b: buckets.get(b, 0.0) for b in BUCKETS},
        "total_ms": sum(buckets.values()),
        "step_ms": wall * 1e3,
        "torch": torch.__version__,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = bench_args.parser(__doc__)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per side")
    p.add_argument("--no_torch", action="store_true", help="profile ours only")
    args, overrides = bench_args.parse(p, argv)
    core = _pin_one_core()  # before jax starts: XLA sizes its thread pool from the affinity mask
    import train_step as jax_bench

    from vtfusion_jax import speed

    cfg = jax_bench.load_config(args.config, overrides)
    env = bench_args.prepare(args)
    bench = jax_bench.Bench(cfg)
    bench.compile()
    result = {
        "benchmark": "profile_step",
        "command": "python benchmarks/profile_step.py " + " ".join(argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": speed.host_info(),
        "pinned_core": core,
        "loadavg_start": speed.loadavg(),
        "config": cfg,
        "steps": args.steps,
        "flops_per_step_train": jax_bench.analytic_flops(cfg)["train"] * int(cfg["bench"]["batch_size"]),
        "ours": profile_ours(bench, args.steps),
    }
    if not args.no_torch:
        result["torch_eager"] = profile_torch(cfg, args.steps)
    result["loadavg_end"] = speed.loadavg()
    return speed.emit_result({**result, **env}, args.out)


if __name__ == "__main__":
    main()
