"""The Dense kernel gradient on CPU: ``x^T @ dy`` as one dot vs the transposed operand materialised first.

    python benchmarks/weight_grad.py --config=configs/perf.py --out=results/perf/cpu_weight_grad.json
    python benchmarks/weight_grad.py --config=configs/perf.py:preset=tiny --rounds=2     # smoke

Times the library's step with ``linear.CPU_TRANSPOSED_WEIGHT_GRAD`` off (``plain``) and on (``transposed``) from the
same state, alternately (why: vtfusion_jax/linear.py). JSON: median and min step per side, their ratio, the number
of ``A^T B`` dots in each compiled step and both final losses. Runs on jax + flax + optax + numpy.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as jax_bench  # noqa: E402  (benchmarks/train_step.py)

from vtfusion_jax import linear, speed  # noqa: E402

SIDES = ("plain", "transposed")


def lhs_transposed_dots(hlo_text: str) -> int:
    """Unbatched dots of a compiled program that contract the lhs on its leading axis (``A^T B``)."""
    return len(re.findall(r"dot\([^\n]*lhs_contracting_dims=\{0\}(?![^\n]*lhs_batch_dims)", hlo_text))


def run(cfg: dict, rounds: int, pause_s: float, command: str = "") -> dict:
    """Builds both sides, times them alternately; returns the JSON-able result."""
    load_start = speed.loadavg()
    benches = {}
    for side in SIDES:
        with mock.patch.object(linear, "CPU_TRANSPOSED_WEIGHT_GRAD", side == "transposed"):
            benches[side] = jax_bench.Bench(cfg)  # same seed: the same initial state (each side donates its own)
            benches[side].compile()  # the switch is read while tracing
    runners = {side: benches[side].step for side in SIDES}
    times = jax_bench.alternate(runners, rounds, pause_s, warmup=max(1, int(cfg["bench"]["warmup"])))
    med = {s: float(np.median(t)) for s, t in times.items()}
    r = dict(jax_bench.record("weight_grad", command, cfg, load_start), rounds=rounds, pause_between_steps_s=pause_s)
    r.update(step_s_median=med, step_s_min={s: float(min(t)) for s, t in times.items()}, step_s_all=times)
    r["plain_over_transposed"] = med["plain"] / med["transposed"]
    r["lhs_transposed_dots"] = {s: lhs_transposed_dots(b.compiled.as_text()) for s, b in benches.items()}
    return r | {"final_loss": {s: b.loss() for s, b in benches.items()}}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: the shared benchmark flags plus --rounds / --pause."""
    p = jax_bench.parser(__doc__)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each side per round)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, cfg, env, command = jax_bench.cli(p, argv, "weight_grad.py")
    return speed.emit_result({**run(cfg, args.rounds, args.pause, command), **env}, args.out)


if __name__ == "__main__":
    main()
