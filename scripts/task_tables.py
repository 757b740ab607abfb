"""Retrieval and captioning tables from results/*/summary.json (scripts/run_task_job.py), written into
docs/results.md between the ``<!-- task-tables:start -->`` / ``<!-- task-tables:end -->`` markers.

  python scripts/task_tables.py            # rewrite the section
  python scripts/task_tables.py --check    # exit 1 if the section is stale
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "results.md")
START, END = "<!-- task-tables:start -->", "<!-- task-tables:end -->"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _load(task: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(REPO, "results", "*", "summary.json"))):
        with open(path) as f:
            s = json.load(f)
        if s.get("task") == task:
            rows.append(s)
    return rows


def _common(s: dict) -> str:
    load = s["load_average_1min"]
    secs = f"{s.get('total_train_seconds', s['train_seconds']):.0f} + {s['eval_seconds']:.0f}"
    if s.get("previous_runs"):
        secs += f" ({len(s['previous_runs']) + 1} runs)"
    return f"{s['train_steps']} | {secs} | {load['mean']} | `{s['commands'][0]}`"


def retrieval_table(rows: list[dict]) -> str:
    head = (
        "| run | images / texts | ITC i2t R@1/5/10 | ITC t2i R@1/5/10 | ITM re-ranked i2t R@1/5/10 | "
        "ITM re-ranked t2i R@1/5/10 | ITM-only i2t / t2i R@1 | k | rule | steps | train + eval s | load | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for s in rows:
        m = s["metrics"]

        def r(p, m=m):
            return " / ".join(_pct(m[f"{p}_R@{k}"]) for k in (1, 5, 10))

        only = (
            f"{_pct(m['rerank_itm_only_i2t_R@1'])} / {_pct(m['rerank_itm_only_t2i_R@1'])}"
            if "rerank_itm_only_i2t_R@1" in m
            else "-"
        )
        lines.append(
            f"| {s['name']} | {m['num_images']} / {m['num_texts']} | {r('itc_i2t')} | {r('itc_t2i')} | "
            f"{r('rerank_i2t')} | {r('rerank_t2i')} | {only} | {m['rerank_k']} | {m.get('rerank_score', 'itm')} | "
            f"{_common(s)} |"
        )
    return head + "\n".join(lines)


def caption_table(rows: list[dict]) -> str:
    head = (
        "| run | images | greedy BLEU-4 / CIDEr-D / exact | beam BLEU-4 / CIDEr-D / exact | beam, alpha | "
        "KV cache: same captions, speedup | steps | train + eval s | load | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for s in rows:
        m = s["metrics"]
        g = f"{m['greedy_bleu4']:.3f} / {m['greedy_cider_d']:.3f} / {_pct(m['greedy_exact_match'])} %"
        b = f"{m['beam_bleu4']:.3f} / {m['beam_cider_d']:.3f} / {_pct(m['beam_exact_match'])} %"
        kv = (
            f"{_pct(m['kv_cache_same_captions'])} %, {m['kv_cache_speedup']:.2f}x"
            if "kv_cache_speedup" in m
            else "not measured"
        )
        lines.append(
            f"| {s['name']} | {m['num_images']} | {g} | {b} | {m['beam_size']}, {m['length_penalty']} | {kv} | "
            f"{_common(s)} |"
        )
    return head + "\n".join(lines)


def curves(rows: list[dict]) -> list[str]:
    """One line per run with results/<name>/history.json: the validation metric at each evaluation."""
    keys = {"retrieval": ("itc_mean_R@1", "rerank_mean_R@1"), "caption": ("greedy_exact_match", "greedy_cider_d")}
    out = []
    for s in rows:
        path = os.path.join(REPO, "results", s["name"], "history.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            val = json.load(f)["validation"]
        a, b = keys[s["task"]]
        pts = ", ".join(f"{v['step']}: {v[a]:.3f} / {v[b]:.3f}" for v in val if a in v and b in v)
        out.append(f"- `{s['name']}` validation ({a} / {b}) by step: {pts}.")
    return out


def targets(ret: list[dict], cap: list[dict]) -> list[str]:
    """Issue-7 targets against the recorded runs (the last run of each task; computed, never typed)."""
    out = []
    if ret:
        m = ret[-1]["metrics"]
        ok = m["rerank_t2i_R@1"] >= 0.9 and m["rerank_i2t_R@1"] >= 0.9
        better = m["rerank_mean_R@1"] > m["itc_mean_R@1"]
        out.append(
            f"- Retrieval R@1 >= 90 % both ways with ITM re-ranking: {'met' if ok else 'not met'} "
            f"(t2i {_pct(m['rerank_t2i_R@1'])} %, i2t {_pct(m['rerank_i2t_R@1'])} %); re-ranking improves mean R@1 "
            f"over ITC alone: {'yes' if better else 'no'} "
            f"({_pct(m['rerank_mean_R@1'])} vs {_pct(m['itc_mean_R@1'])} %)."
        )
    if cap:
        m = cap[-1]["metrics"]
        ok = m["beam_exact_match"] >= 0.8
        beam_ok = m["beam_cider_d"] >= m["greedy_cider_d"] and m["beam_bleu4"] >= m["greedy_bleu4"]
        out.append(
            f"- Captioning: beam search reproduces the reference exactly for >= 80 % of test images: "
            f"{'met' if ok else 'not met'} ({_pct(m['beam_exact_match'])} %); beam scores at least as well as greedy "
            f"(BLEU-4 and CIDEr-D): {'yes' if beam_ok else 'no'}."
        )
        if "kv_cache_speedup" in m:
            out.append(
                f"- KV cache: same greedy captions for {_pct(m['kv_cache_same_captions'])} % of test images, "
                f"{m['kv_cache_speedup']:.2f}x faster than recomputing the prefix."
            )
    return out


def section() -> str:
    parts = ["Generated by `python scripts/task_tables.py` from `results/*/summary.json`; do not edit by hand.", ""]
    ret, cap = _load("retrieval"), _load("caption")
    parts += ["**Retrieval** (recall in %, test split)", ""]
    parts += [retrieval_table(ret) if ret else "No retrieval run recorded yet.", ""]
    parts += ["**Captioning** (test split)", ""]
    parts += [caption_table(cap) if cap else "No captioning run recorded yet.", ""]
    if any(curves(ret + cap)):
        parts += ["**Validation curves** (`results/<run>/history.json`)", "", *curves(ret + cap), ""]
    if ret or cap:
        parts += ["**Issue-7 targets** (from the rows above)", "", *targets(ret, cap), ""]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    with open(DOC) as f:
        doc = f.read()
    i, j = doc.index(START) + len(START), doc.index(END)
    new = doc[:i] + "\n" + section() + doc[j:]
    if a.check:
        sys.exit(0 if new == doc else 1)
    with open(DOC, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
