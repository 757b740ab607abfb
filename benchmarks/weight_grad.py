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
    r = jax_bench.side_by_side("weight_grad", benches, cfg, rounds, pause_s, command, load_start)
    r["plain_over_transposed"] = r["step_s_median"]["plain"] / r["step_s_median"]["transposed"]
    r["lhs_transposed_dots"] = {s: lhs_transposed_dots(b.compiled.as_text()) for s, b in benches.items()}
    return r


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: the shared benchmark flags plus --rounds (default 20) / --pause."""
    return jax_bench.comparison_main(__doc__, argv, "weight_grad.py", run, rounds=20)


if __name__ == "__main__":
    main()
