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


# The easy-VQA rows of the README results table, in order: results/<name>/ (written by scripts/run_job.py).
MAIN_JOB_ROWS = (
    (
        "easy_vqa",
        "main job: max-pool CNN + 2-layer BERT from scratch, cross fusion + image summary + their product, "
        "focal loss, grouped batches",
    ),
    ("easy_vqa_minilm", "pretrained MiniLM text tower (fine-tuned, lr x0.1), CNN, cross fusion"),
    ("easy_vqa_linear_probe", "the method's baseline: logistic regression on frozen [MiniLM CLS; 8x8 pixels]"),
)


def _config_arg(command: str) -> str:
    return next(a for a in command.split() if a.startswith("--config="))


def _load(s: dict) -> str:
    load = s.get("load_average_1min")
    if not load:
        return "not recorded"
    return f"{load['mean']:.1f} / {load['max']:.1f}" + (f" ({load['covers']})" if "covers" in load else "")


def _epochs(name: str) -> str:
    """Training length from the run's recorded config (results/<name>/config.json)."""
    t = _read_json(os.path.join(ROOT, "results", name, "config.json"))["train"]
    return f"{t['num_steps']} steps" if t["num_steps"] > 0 else f"{t['num_epochs']:g}"


def main_job_section() -> str | None:
    """The easy-VQA rows (MAIN_JOB_ROWS) from results/<name>/summary.json, each naming its command."""
    rows = []
    for name, what in MAIN_JOB_ROWS:
        path = os.path.join(ROOT, "results", name, "summary.json")
        if os.path.exists(path):
            rows.append((_read_json(path), what))
    if not rows:
        return None
    lines = [
        "Each row: `python scripts/run_job.py --name=NAME --config=CONFIG` (below), which runs `python train.py` then "
        "`python eval.py --split=test` with that config and times both; files in `results/NAME/`. The machine "
        f"({rows[0][0]['machine']}) is shared with other jobs: wall times are inflated by the 1-minute load average "
        "they saw (mean / max during train + eval; 2 = the CPUs fully used).",
        "",
        "| Run | Test accuracy | Per question type | Best validation | Epochs | Train (s) | Eval (s) | Train + eval | "
        "Load (mean / max) | Command |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s, what in rows:
        per_type = ", ".join(f"{k} {100 * v:.2f} %" for k, v in s["per_type"].items())
        command = f"`python scripts/run_job.py --name={s['name']} {_config_arg(s['commands'][0])}`"
        if "train_seconds_from" in s:  # run_job.py --eval_only: the two commands that actually ran
            command = f"`{s['commands'][0]}` then `{s['commands'][1]}` (train time: {s['train_seconds_from']})"
        lines.append(
            f"| {s['name']}: {what} | **{100 * s['accuracy']:.2f} %** ({s['num_examples']:,d} questions) | "
            f"{per_type} | {100 * s['best_val_accuracy']:.2f} % | {_epochs(s['name'])} | {s['train_seconds']:.0f} | "
            f"{s['eval_seconds']:.0f} | "
            f"{s['train_plus_eval_seconds'] / 60:.1f} min | {_load(s)} | {command} |"
        )
    main = next((s for s, _ in rows if s["name"] == "easy_vqa"), None)
    if main is not None:
        acc, minutes = 100 * main["accuracy"], main["train_plus_eval_seconds"] / 60
        met = acc >= 98.0 and minutes <= 10.0
        lines += [
            "",
            f"Target (issue 4): >= 98.0 % test accuracy in <= 10 min train + eval on this CPU — "
            f"**{'met' if met else 'not met'}** by the main job ({acc:.2f} % in {minutes:.1f} min).",
        ]
    return "\n".join(lines)


def sort_of_clevr_section() -> str | None:
    """The headline row of the Sort-of-CLEVR table (scripts/sort_of_clevr_table.py, from results/sort_of_clevr/)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sort_of_clevr_table", os.path.join(ROOT, "scripts", "sort_of_clevr_table.py")
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    line = table.headline(table.collect(os.path.join(ROOT, "results", "sort_of_clevr")))
    if line is None:
        return None
    return f"{line} Regenerate: `{table.COMMAND}` (the table), then `python scripts/update_readme.py` (this line)."


def tasks_section() -> str | None:
    """Headline numbers of the retrieval and captioning runs (results/sort_of_clevr_{retrieval,caption}/summary.json,
    written by scripts/run_task_job.py)."""
    parts = []
    ret = os.path.join(ROOT, "results", "sort_of_clevr_retrieval", "summary.json")
    cap = os.path.join(ROOT, "results", "sort_of_clevr_caption", "summary.json")
    if os.path.exists(ret):
        s = _read_json(ret)
        m = s["metrics"]
        parts.append(
            f"Retrieval (`configs/sort_of_clevr_retrieval.py`, {m['num_images']} test images): recall@1 image->text / "
            f"text->image {100 * m['rerank_i2t_R@1']:.1f} / {100 * m['rerank_t2i_R@1']:.1f} % with ITM re-ranking "
            f"({100 * m['itc_i2t_R@1']:.1f} / {100 * m['itc_t2i_R@1']:.1f} % ITC alone; target 90 %), "
            f"{s['train_steps']} steps, {s['train_seconds'] + s['eval_seconds']:.0f} s train + eval."
        )
    if os.path.exists(cap):
        s = _read_json(cap)
        m = s["metrics"]
        parts.append(
            f"Captioning (`configs/sort_of_clevr_caption.py`): beam search reproduces the scene description exactly "
            f"for {100 * m['beam_exact_match']:.1f} % of {m['num_images']} test images (greedy "
            f"{100 * m['greedy_exact_match']:.1f} %), BLEU-4 {m['beam_bleu4']:.3f}, CIDEr-D {m['beam_cider_d']:.2f}; "
            f"the KV cache decodes the same captions {m.get('kv_cache_speedup', float('nan')):.2f}x faster; "
            f"{s['train_steps']} steps, {s['train_seconds'] + s['eval_seconds']:.0f} s train + eval."
        )
    if not parts:
        return None
    return (
        " ".join(parts) + " Each: `python scripts/run_task_job.py --name=NAME --config=CONFIG`; tables: "
        "`python scripts/task_tables.py`; this line: `python scripts/update_readme.py`."
    )


SECTIONS = {
    "input_pipeline": input_pipeline_section,
    "main_job": main_job_section,
    "sort_of_clevr": sort_of_clevr_section,
    "tasks": tasks_section,
}


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
