"""Repeated questions: the text encoder once per distinct text (model.text_dedup) vs once per question.

    python benchmarks/text_dedup.py --config=configs/easy_vqa.py --config.bench.distinct_texts=96 \
        --out=results/perf/cpu_text_dedup_easy_vqa.json
    python benchmarks/text_dedup.py --config=configs/perf.py:preset=tiny --config.bench.distinct_texts=4 --rounds=2

Times the library's train step on one synthetic batch whose questions repeat ``bench.distinct_texts`` texts (easy-VQA
has 107 distinct questions in all, Sort-of-CLEVR 36) with ``model.text_dedup`` = 0 (``plain``) and as configured
(``dedup``), from the same initial state, alternately. JSON: median / min step per side, questions/s per
side, their ratio and both final losses (equal: tests/test_models.py checks logits, gradients and a jvp).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as jax_bench  # noqa: E402  (benchmarks/train_step.py)

from vtfusion_jax import speed  # noqa: E402


def run(cfg: dict, rounds: int, pause_s: float, command: str = "") -> dict:
    """Builds both sides, times them alternately; returns the JSON-able result."""
    if int(cfg["model"].get("text_dedup", 0)) <= 0 or int(cfg["bench"].get("distinct_texts", 0)) <= 0:
        raise SystemExit("error: set model.text_dedup > 0 and bench.distinct_texts > 0 (a batch of repeated texts)")
    load_start = speed.loadavg()
    plain = copy.deepcopy(cfg)
    plain["model"]["text_dedup"] = 0
    benches = {"plain": jax_bench.Bench(plain), "dedup": jax_bench.Bench(cfg)}  # same seed: the same parameters
    r = jax_bench.side_by_side("text_dedup", benches, cfg, rounds, pause_s, command, load_start)
    med, n = r["step_s_median"], int(cfg["bench"]["batch_size"])
    r.update(questions_per_s={s: n / m for s, m in med.items()}, speedup=med["plain"] / med["dedup"])
    return r


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: the shared benchmark flags plus --rounds (default 10) / --pause."""
    return jax_bench.comparison_main(__doc__, argv, "text_dedup.py", run, rounds=10)


if __name__ == "__main__":
    main()
