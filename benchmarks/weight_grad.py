"""The Dense kernel gradient on CPU: ``x^T @ dy`` as one dot vs the transposed operand materialised first.

    python benchmarks/weight_grad.py --config=configs/perf.py --out=results/perf/cpu_weight_grad.json
    python benchmarks/weight_grad.py --config=configs/perf.py:preset=tiny --rounds=2     # smoke

XLA:CPU runs a dot that contracts its lhs on the leading axis (``A^T B``, the kernel gradient of every Dense layer)
in its Eigen dot, not in the YNNPACK / XNNPACK fusions that take ``A B`` and ``A B^T``. vtfusion_jax/linear.py
therefore transposes the smaller of ``x`` and ``dy`` first on CPU (``linear.CPU_TRANSPOSED_WEIGHT_GRAD``). One
process builds the train step (benchmarks/train_step.py) twice on the same batch and initial state, with that path
(``transposed``) and without it (``plain``), and times the two alternately (rotating order, a pause between steps).
Output (JSON): median and min step per side, the ratio plain / transposed, each step's dots by XLA engine and form
(benchmarks/matmul_shapes.py), and both sides' final losses (the same products: equal to float32 rounding).
Runs on jax + flax + optax + numpy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_args  # noqa: E402  (benchmarks/bench_args.py, stdlib only)

SIDES = ("plain", "transposed")


def dot_forms(hlo_text: str) -> dict:
    """GFLOP of the compiled step's dots by engine ("ynn/xnn" | "eigen") and, for unbatched (Dense) dots, whether
    the lhs is contracted on its leading axis (``A^T B``, the plain kernel gradient)."""
    import matmul_shapes

    out: dict[str, float] = {}
    for d in matmul_shapes.step_dots(hlo_text):
        dims = d["dims"]
        form = (
            "batched"
            if dims["lhs_batch_dims"]
            else ("A^T B" if dims["lhs_contracting_dims"] == (0,) else "A B or A B^T")
        )
        key = f"{d['engine']} {form}"
        out[key] = out.get(key, 0.0) + d["count"] * d["flops"] / 1e9
    return dict(sorted(out.items()))


def run(cfg: dict, rounds: int, pause_s: float, command: str = "") -> dict:
    import train_step as jax_bench

    from vtfusion_jax import linear, speed

    load_start = speed.loadavg()
    benches = {}
    for side in SIDES:
        with mock.patch.object(linear, "CPU_TRANSPOSED_WEIGHT_GRAD", side == "transposed"):
            benches[side] = jax_bench.Bench(cfg)  # same seed: the same initial state (each side donates its own)
            benches[side].compile()
    runners = {side: benches[side].step for side in SIDES}
    times = bench_args.alternate(runners, rounds, pause_s, warmup=max(1, int(cfg["bench"]["warmup"])))
    med = {s: float(np.median(t)) for s, t in times.items()}
    return {
        **bench_args.record("weight_grad", command, cfg, load_start),
        "rounds": rounds,
        "pause_between_steps_s": pause_s,
        "step_s_median": med,
        "step_s_min": {s: float(min(t)) for s, t in times.items()},
        "step_s_all": times,
        "plain_over_transposed": med["plain"] / med["transposed"],
        "dot_gflop_by_form": {s: dot_forms(b.compiled.as_text()) for s, b in benches.items()},
        "final_loss": {s: b.loss() for s, b in benches.items()},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = bench_args.parser(__doc__)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each side per round)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, overrides = bench_args.parse(p, argv)
    import train_step as jax_bench

    from vtfusion_jax import speed

    cfg = jax_bench.load_config(args.config, overrides)
    env = bench_args.prepare(args)
    result = run(cfg, args.rounds, args.pause, "python benchmarks/weight_grad.py " + " ".join(argv))
    return speed.emit_result({**result, **env}, args.out)


if __name__ == "__main__":
    main()
