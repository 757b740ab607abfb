"""Regenerates the result sections of README.md from run outputs committed under results/.

Each section sits between `<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->` and names the command
that produced its numbers. Run: python scripts/update_readme.py
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def input_pipeline_section() -> str | None:
    folder = os.path.join(ROOT, "results", "input_pipeline")
    if not os.path.exists(os.path.join(folder, "benchmark.jsonl")):
        return None
    rows = _read_jsonl(os.path.join(folder, "benchmark.jsonl"))
    run = _read_json(os.path.join(folder, "run.json"))
    lines = [
        f"Measured by `{run['command']}` on {run['date'][:10]} (this 2-core machine, 1-minute load average "
        f"{run['loadavg_before']}–{run['loadavg_after']} from other jobs, so these are lower bounds); output in "
        "`results/input_pipeline/`.",
        "",
        "| Dataset | Train examples | Build (s, once) | Host decode, 1 thread (ex/s) "
        "| Train iterator, batch 256 (ex/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        build = f"{r['build_s']:.1f}" if r.get("build_s") is not None else "(already built)"
        lines.append(
            f"| {r['dataset']} | {r['num_train_examples']:,d} | {build} | "
            f"{r['host_single_thread_examples_per_s']:,.0f} | {r['iterator_examples_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main_job_section() -> str | None:
    """The easy-VQA main job, from results/easy_vqa/summary.json (written by scripts/run_job.py)."""
    path = os.path.join(ROOT, "results", "easy_vqa", "summary.json")
    if not os.path.exists(path):
        return None
    s = _read_json(path)
    per_type = ", ".join(f"{k} {100 * v:.2f} %" for k, v in s["per_type"].items())
    return "\n".join(
        [
            f"Produced by `python scripts/run_job.py --name=easy_vqa --config=configs/easy_vqa.py`, which runs "
            f"`{s['commands'][0]}` then `{s['commands'][1]}` and times both ({s['machine']}, shared with other "
            "jobs during the run); files in `results/easy_vqa/`.",
            "",
            "| Test accuracy | Per question type | Best validation | Train (s) | Eval (s) | Train + eval | "
            "Dataset build (s, once) |",
            "|---:|---|---:|---:|---:|---:|---:|",
            f"| **{100 * s['accuracy']:.2f} %** ({s['num_examples']:,d} questions) | {per_type} | "
            f"{100 * s['best_val_accuracy']:.2f} % | {s['train_seconds']:.0f} | {s['eval_seconds']:.0f} | "
            f"{s['train_plus_eval_seconds'] / 60:.1f} min | {s['dataset_build_seconds']:.1f} |",
            "",
            "Target (issue 4): >= 98.0 % test accuracy in <= 10 min train + eval on this CPU — **not yet met**.",
        ]
    )


SECTIONS = {"input_pipeline": input_pipeline_section, "main_job": main_job_section}


def main() -> int:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->\n).*?(\n<!-- END generated:{name} -->)", re.S)
        if not pattern.search(text):
            print(f"README.md has no generated:{name} markers; skipped", file=sys.stderr)
            continue
        body = fn()
        if body is None:
            print(f"no results for {name}; section left as is", file=sys.stderr)
            continue
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    with open(readme, "w") as f:
        f.write(text)
    print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
