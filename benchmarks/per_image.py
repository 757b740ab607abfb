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
    r = jax_bench.side_by_side("per_image", benches, cfg, rounds, pause_s, command, load_start)
    med, n = r["step_s_median"], int(cfg["bench"]["batch_size"])
    r.update(questions_per_s={s: n / m for s, m in med.items()}, speedup=med["gathered"] / med["per_image"])
    r["xla_flops_per_step"] = {s: b.compile()["xla_flops_per_step"] for s, b in benches.items()}
    return r


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: the shared benchmark flags plus --rounds (default 10) / --pause."""
    return jax_bench.comparison_main(__doc__, argv, "per_image.py", run, rounds=10)


if __name__ == "__main__":
    main()
