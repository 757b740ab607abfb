"""The train step's matmuls replayed one by one in XLA and in PyTorch: how much of the CPU gap is the GEMM kernels?

    python benchmarks/matmul_shapes.py --config=configs/perf.py --out=results/perf/cpu_matmul_shapes.json
    python benchmarks/matmul_shapes.py --config=configs/perf.py:preset=tiny --rounds=2    # smoke

Compiles our train step (benchmarks/train_step.py, the config's sizes) and reads every dot of the optimised HLO:
operand shapes and dimension numbers, and the engine XLA:CPU chose (a YNNPACK / XNNPACK fusion, or XLA's own Eigen
dot). Each distinct dot is then replayed alone on random float32 operands of those shapes, as ``jax.lax.dot_general``
with the same dimension numbers under ``jax.jit`` and as the torch call PyTorch's training step makes for it
(``torch.mm`` on transposed views, as autograd does for ``nn.Linear``; ``torch.einsum`` for batched dots), with the
same thread count, timed alternately in one process. Both results are compared (they must agree to float32
rounding).

Output (JSON): per dot its count in the step, GFLOP, ms and GFLOP/s in each library and the ratio torch / XLA; and
the step's matmul time with each library's kernels, sum of count x time. benchmarks/torch_peer.py gives the
step-time ratio; this gives the part of it the GEMM kernels alone explain. Counts are HLO occurrences: for an
unrolled step (configs/perf.py's default) that is per step; a scanned layer body is counted once.
Each call is timed after a short idle (``--pause``), as a dot runs inside a step between other work: absolute
GFLOP/s come out below a back-to-back loop's, for both libraries alike; read the torch / XLA ratio.
Runs on jax + numpy + torch.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import time
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_args  # noqa: E402  (benchmarks/bench_args.py, stdlib only)

_DIMS = ("lhs_batch_dims", "lhs_contracting_dims", "rhs_batch_dims", "rhs_contracting_dims")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def step_dots(hlo_text: str) -> list[dict]:
    """Every float dot of an optimised HLO module, grouped by (engine, shapes, dimension numbers), with its count.

    Each entry: {"lhs": [..], "rhs": [..], "out": [..], "dims": {lhs_batch_dims: (..), ...}, "engine": "ynn/xnn" |
    "eigen", "count": n, "flops": 2 x output elements x contracted size}."""
    shapes: dict[str, list[int]] = {}
    custom_called: set[str] = set()  # computations called by a YNNPACK / XNNPACK / oneDNN fusion
    dots = []  # (computation, line)
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = f\w*\[([\d,]*)\]", line)
        if m:
            shapes[m.group(1)] = list(_ints(m.group(2)))
        if "kind=kCustom" in line or re.search(r'"kind":"__\w+_fusion"', line):
            called = re.search(r"calls=%([\w.\-]+)", line)
            if called:
                custom_called.add(called.group(1))
        if " dot(" in line and current is not None:
            dots.append((current, line))
    groups: dict[tuple, dict] = {}
    for comp, line in dots:
        ops = re.search(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        out = re.search(r"= f\w*\[([\d,]*)\]", line)
        if not ops or not out or ops.group(1) not in shapes or ops.group(2) not in shapes:
            continue  # not a float dot with known operand shapes
        dims = {}
        for d in _DIMS:
            m = re.search(d + r"=\{([\d,]*)\}", line)
            dims[d] = _ints(m.group(1)) if m else ()
        lhs, rhs, out_shape = shapes[ops.group(1)], shapes[ops.group(2)], list(_ints(out.group(1)))
        engine = "ynn/xnn" if comp in custom_called else "eigen"
        key = (engine, tuple(lhs), tuple(rhs), tuple(sorted(dims.items())))
        if key not in groups:
            k = int(np.prod([lhs[i] for i in dims["lhs_contracting_dims"]]))
            flops = 2 * int(np.prod(out_shape)) * k
            groups[key] = {
                "lhs": lhs,
                "rhs": rhs,
                "out": out_shape,
                "dims": dims,
                "engine": engine,
                "count": 0,
                "flops": flops,
            }
        groups[key]["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"] * g["flops"])


def signature(d: dict) -> str:
    """A short readable name: engine, 'x^T dy'-style pass, shapes."""
    dims = d["dims"]
    if not dims["lhs_batch_dims"] and len(d["lhs"]) == 2 and len(d["rhs"]) == 2:
        lt = "^T" if dims["lhs_contracting_dims"] == (0,) else ""
        rt = "^T" if dims["rhs_contracting_dims"] == (1,) else ""
        form = f"A{lt} B{rt}"
    else:
        form = "batched"
    return f"{d['engine']} {form} {d['lhs']} x {d['rhs']} -> {d['out']}"


def _einsum_spec(d: dict) -> str:
    """The torch.einsum equation of an HLO dot (output order: batch, lhs free, rhs free)."""
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    dims = d["dims"]
    lhs = [next(letters) for _ in d["lhs"]]
    rhs = [""] * len(d["rhs"])
    for lb, rb in zip(dims["lhs_batch_dims"], dims["rhs_batch_dims"], strict=True):
        rhs[rb] = lhs[lb]
    for lc, rc in zip(dims["lhs_contracting_dims"], dims["rhs_contracting_dims"], strict=True):
        rhs[rc] = lhs[lc]
    rhs = [c or next(letters) for c in rhs]
    batch = [lhs[i] for i in dims["lhs_batch_dims"]]
    lfree = [c for i, c in enumerate(lhs) if i not in dims["lhs_batch_dims"] + dims["lhs_contracting_dims"]]
    rfree = [c for i, c in enumerate(rhs) if i not in dims["rhs_batch_dims"] + dims["rhs_contracting_dims"]]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(batch + lfree + rfree)}"


def torch_fn(d: dict):
    """The torch call for a dot: torch.mm on transposed views for 2-D dots (as autograd does for nn.Linear),
    torch.einsum otherwise."""
    import torch

    dims = d["dims"]
    if not dims["lhs_batch_dims"] and len(d["lhs"]) == 2 and len(d["rhs"]) == 2:
        lt, rt = dims["lhs_contracting_dims"] == (0,), dims["rhs_contracting_dims"] == (1,)
        return lambda a, b: torch.mm(a.t() if lt else a, b.t() if rt else b)
    spec = _einsum_spec(d)
    return lambda a, b: torch.einsum(spec, a, b)


def time_dot(d: dict, rounds: int, reps: int, pause_s: float, rng: np.random.Generator) -> dict:
    """Times one dot in jax and in torch (alternating, order rotating by round) on ``reps`` operand pairs."""
    import jax
    import torch

    a = [rng.standard_normal(d["lhs"], dtype=np.float32) for _ in range(reps)]
    b = [rng.standard_normal(d["rhs"], dtype=np.float32) for _ in range(reps)]
    dims = d["dims"]
    dn = (
        (dims["lhs_contracting_dims"], dims["rhs_contracting_dims"]),
        (dims["lhs_batch_dims"], dims["rhs_batch_dims"]),
    )
    ja, jb = [jax.device_put(x) for x in a], [jax.device_put(x) for x in b]
    jf = jax.jit(lambda xs, ys: [jax.lax.dot_general(x, y, dn) for x, y in zip(xs, ys, strict=True)])
    ta, tb = [torch.from_numpy(x) for x in a], [torch.from_numpy(x) for x in b]
    tf = torch_fn(d)
    y_jax, y_torch = np.asarray(jf(ja, jb)[0]), tf(ta[0], tb[0]).numpy()
    scale = float(np.abs(y_torch).max()) or 1.0
    sides = {
        "xla": lambda: jax.block_until_ready(jf(ja, jb)),
        "torch": lambda: [tf(x, y) for x, y in zip(ta, tb, strict=True)],
    }
    for fn in sides.values():
        fn()  # warm-up (and jax's compile)
    times = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for k in names[r % 2 :] + names[: r % 2]:
            time.sleep(pause_s)
            t0 = time.perf_counter()
            sides[k]()
            times[k].append((time.perf_counter() - t0) / reps)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {
        **d,
        "name": signature(d),
        "ms": ms,
        "gflop_per_s": {k: d["flops"] / (v / 1e3) / 1e9 for k, v in ms.items()},
        "torch_over_xla_time": ms["torch"] / ms["xla"],
        "max_abs_diff_over_scale": float(np.abs(y_jax - y_torch).max()) / scale,
    }


def replay(dots: list[dict], rounds: int, reps: int, pause_s: float, seed: int = 0) -> list[dict]:
    """``time_dot`` for every dot, with progress on stderr."""
    rng = np.random.default_rng(seed)
    out = []
    for i, d in enumerate(dots):
        out.append(time_dot(d, rounds, reps, pause_s, rng))
        print(
            f"[{i + 1}/{len(dots)}] {out[-1]['name']}: torch / xla {out[-1]['torch_over_xla_time']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return out


def summarize(timed: list[dict]) -> dict:
    """The step's matmul time with each library's kernels, and by XLA engine."""
    total = {k: sum(d["count"] * d["ms"][k] for d in timed) for k in ("xla", "torch")}
    gflop = sum(d["count"] * d["flops"] for d in timed) / 1e9
    by_engine = collections.defaultdict(lambda: {"xla_ms": 0.0, "torch_ms": 0.0, "gflop": 0.0})
    for d in timed:
        e = by_engine[d["engine"]]
        e["xla_ms"] += d["count"] * d["ms"]["xla"]
        e["torch_ms"] += d["count"] * d["ms"]["torch"]
        e["gflop"] += d["count"] * d["flops"] / 1e9
    return {
        "step_dot_gflop": gflop,
        "step_dot_ms": total,
        "step_dot_gflop_per_s": {k: gflop / (v / 1e3) for k, v in total.items()},
        "torch_over_xla_time": total["torch"] / total["xla"],
        "by_xla_engine": dict(by_engine),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = bench_args.parser(__doc__)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per dot and library")
    p.add_argument("--reps", type=int, default=4, help="independent operand pairs per timed call")
    p.add_argument("--pause", type=float, default=0.01, help="seconds of idle before each timed call")
    args, overrides = bench_args.parse(p, argv)
    import torch
    import train_step as jax_bench

    from vtfusion_jax import speed

    cfg = jax_bench.load_config(args.config, overrides)
    env = bench_args.prepare(args)
    torch.set_num_threads(os.cpu_count() or 1)  # the thread count XLA:CPU uses
    bench = jax_bench.Bench(cfg)
    bench.compile()
    dots = step_dots(bench.compiled.as_text())
    load0 = speed.loadavg()
    timed = replay(dots, args.rounds, args.reps, args.pause, int(cfg["seed"]))
    result = {
        "benchmark": "matmul_shapes",
        "command": "python benchmarks/matmul_shapes.py " + " ".join(argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": speed.host_info(),
        "torch": torch.__version__,
        "threads": {"torch": torch.get_num_threads(), "xla_cpu_count": os.cpu_count()},
        "loadavg_start": load0,
        "config": cfg,
        "rounds": args.rounds,
        "reps": args.reps,
        "flops_per_step_train": jax_bench.analytic_flops(cfg)["train"] * int(cfg["bench"]["batch_size"]),
        **summarize(timed),
        "dots": timed,
        "loadavg_end": speed.loadavg(),
        **env,
    }
    return speed.emit_result(result, args.out)


if __name__ == "__main__":
    main()
