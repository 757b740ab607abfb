"""Image-grouped batches: the fusion's question-independent image work once per image vs once per question.

    python benchmarks/per_image.py --config=configs/sort_of_clevr.py:fusion=co_attention --config.bench.image_size=75 \
        --out=results/perf/cpu_per_image_co_attention.json
    python benchmarks/per_image.py --config=configs/perf.py:preset=tiny --config.bench.images_per_batch=2 --rounds=2

Times the library's train step on one synthetic image-grouped batch (``bench.images_per_batch`` images shared by
``bench.batch_size`` questions) with the image rows gathered per question before the fusion (``gathered``:
``VisionTextModel(per_image_fusion=False)``, the code before issue 30) and with the variant's per-image path
(``per_image``), from the same state, alternately. JSON: median / min step per side, questions/s per side, their
ratio, XLA's FLOP count per step of each side and both final losses (equal: the same maths; tests/test_fusion.py
checks it to 1e-5).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as jax_bench  # noqa: E402  (benchmarks/train_step.py)

from vtfusion_jax import speed  # noqa: E402

SIDES = {"gathered": False, "per_image": True}


def run(cfg: dict, rounds: int, pause_s: float, command: str = "") -> dict:
    """Builds both sides, times them alternately; returns the JSON-able result."""
    if int(cfg["bench"]["images_per_batch"]) <= 0:
        raise SystemExit("error: bench.images_per_batch must be > 0 (an image-grouped batch)")
    load_start = speed.loadavg()
    benches = {side: jax_bench.Bench(cfg, per_image_fusion=on) for side, on in SIDES.items()}  # same seed and state
    times = jax_bench.alternate({s: b.step for s, b in benches.items()}, rounds, pause_s, int(cfg["bench"]["warmup"]))
    med = {s: float(np.median(t)) for s, t in times.items()}
    n = int(cfg["bench"]["batch_size"])
    r = dict(jax_bench.record("per_image", command, cfg, load_start), rounds=rounds, pause_between_steps_s=pause_s)
    r.update(step_s_median=med, step_s_min={s: float(min(t)) for s, t in times.items()}, step_s_all=times)
    r.update(questions_per_s={s: n / m for s, m in med.items()}, speedup=med["gathered"] / med["per_image"])
    r["xla_flops_per_step"] = {s: b.compile()["xla_flops_per_step"] for s, b in benches.items()}
    return r | {"final_loss": {s: b.loss() for s, b in benches.items()}}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: the shared benchmark flags plus --rounds / --pause."""
    p = jax_bench.parser(__doc__)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each side per round)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, cfg, env, command = jax_bench.cli(p, argv, "per_image.py")
    return speed.emit_result({**run(cfg, args.rounds, args.pause, command), **env}, args.out)


if __name__ == "__main__":
    main()
