"""Single-scale vs multi-scale image tokens (issue 10 item 2): runs or collects the ablation, writes its section of
docs/results.md (between ``<!-- multiscale:begin -->`` and ``<!-- multiscale:end -->``; the rest of the file is kept).

  python scripts/multiscale_ablation.py --run [--only=easy_vqa_multi]   # train + eval the rows (one at a time)
  python scripts/multiscale_ablation.py                                 # collect results/multiscale/*/ -> docs

Each row is ``scripts/run_job.py`` on ``configs/multiscale.py`` (the dataset's own config with only
``model.image_encoder.scales`` changed: single = the last conv stage, multi = the last two stages, each projected to the
model width with its own 2-D position embedding and a learned scale embedding), fusion ``cross`` in both rows, and
the same reduced budget (the overrides below) for both rows of a dataset. run_job writes
results/multiscale/<row>/{summary.json, metrics.json, config.json}; this script adds the parameter count and the
analytic FLOPs per example (vtfusion_jax/flops.py) to summary.json, then the table is built from those files only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- multiscale:begin -->", "<!-- multiscale:end -->"
NUM_SCALES = {"single": 1, "multi": 2}

# The same budget for both rows of a dataset. easy-VQA: 300 steps of its main job's image-grouped batches (256
# questions of <= 32 images; ~2.2 epochs instead of 6). Sort-of-CLEVR: 3000 steps of 100 questions from 5 images
# (300,000 questions, ~1.5 epochs of 196,000), validation every 1000 steps.
BUDGETS = {
    "easy_vqa": ["--config.train.num_steps=300", "--config.train.progress_bar=False"],
    "sort_of_clevr": [
        "--config.train.num_steps=3000",
        "--config.train.global_batch_size=100",
        "--config.train.images_per_batch=5",
        "--config.optim.warmup_steps=300",
        "--config.train.eval_every_steps=1000",
        "--config.train.checkpoint_every_steps=1000",
        "--config.train.progress_bar=False",
    ],
}
TYPE_COLUMNS = {  # per-type accuracy columns of each dataset's table (keys of metrics.json per_type)
    "easy_vqa": ["yes_no", "color", "shape"],
    "sort_of_clevr": ["relational", "non_relational"],
}
CHANCE_LIKE = 0.55  # below this a row has not learnt the task (an untrained Sort-of-CLEVR model scores ~47 %)
TITLES = {"easy_vqa": "easy-VQA", "sort_of_clevr": "Sort-of-CLEVR"}


def rows() -> list[dict]:
    """The ablation's rows: name, dataset, kind, config spec and overrides."""
    out = []
    for dataset, overrides in BUDGETS.items():
        for kind, k in NUM_SCALES.items():
            # easy-VQA's config is cross already (and takes no ':' argument); Sort-of-CLEVR picks it.
            fusion = ",fusion=cross" if dataset == "sort_of_clevr" else ""
            base = f"base={dataset}{fusion},num_scales={k}"
            out.append(
                dict(
                    name=f"{dataset}_{kind}",
                    dataset=dataset,
                    kind=kind,
                    config=f"configs/multiscale.py:{base}",
                    overrides=list(overrides),
                )
            )
    return out


def run_row(row: dict, results_dir: str) -> None:
    """Trains + evaluates one row with run_job.py (results/multiscale/<row>/; main() then adds size and FLOPs)."""
    name = f"multiscale/{row['name']}"
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "run_job.py"),
        f"--name={name}",
        f"--config={row['config']}",
        f"--workdir=runs/{name}",
        "--",
        *row["overrides"],
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def add_model_size(folder: str) -> dict:
    """Parameters and analytic forward FLOPs per example of the run's model, from the config.json the run recorded
    (not the config file, which may have changed since), written into its summary.json."""
    import jax

    from vtfusion_jax import eval_lib, flops, train_lib

    config = eval_lib.load_config(folder)  # folder/config.json
    meta = train_lib.get_meta(config)
    tokenizer = train_lib.make_tokenizer(config)
    model = train_lib.build_model(config, meta["num_classes"], tokenizer.vocab_size)
    shapes = jax.eval_shape(model.init, jax.random.key(0), train_lib.init_batch(config, meta))
    side = train_lib.image_size(config, meta)
    f = flops.model_flops(
        train_lib.model_spec(config, tokenizer.vocab_size), (side, side), config.dataset.max_len, meta["num_classes"]
    )
    size = {
        "params": flops.param_count(shapes["params"]),
        "forward_flops_per_example": int(f["forward"]),
        "image_tokens": int(f["image_tokens"]),
        "scales": list(config.model.image_encoder.scales),
    }
    path = os.path.join(folder, "summary.json")
    with open(path) as fh:
        summary = json.load(fh)
    summary["model_size"] = size
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=2)
    return size


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def table(summaries: dict[str, dict]) -> str:
    """The markdown section from {row name: summary.json}; rows missing from ``summaries`` are listed as not run."""
    lines = [
        "## Multi-scale image tokens: single-scale vs multi-scale (issue 10)",
        "",
        "Generated by `python scripts/multiscale_ablation.py` from `results/multiscale/*/summary.json` (do not edit "
        "by hand). Both rows of a dataset use the same config file and fusion (`cross`), the same seed and the same "
        "reduced training budget (the command's overrides); they differ only in `model.image_encoder.scales`: "
        "*single* = the last conv stage, *multi* = the last two stages (each projected to the model width with its "
        "own 2-D position embedding and a learned scale embedding, concatenated). Accuracy is on the test split "
        "(%). FLOPs: analytic forward FLOPs per example (`vtfusion_jax/flops.py`; a training step costs 3x; the "
        "image tower counts once per question, although image-grouped batches encode each image once per batch). "
        "Training time is wall time on a shared 2-core CPU: read it with the load average beside it. Each row's "
        "exact configuration is its `results/multiscale/<row>/config.json` (the two rows of a dataset differ only in "
        "`scales`); the config files may have moved on since the runs, so a rerun of the command can differ.",
        "",
    ]
    for dataset, types in TYPE_COLUMNS.items():
        lines += [f"### {TITLES[dataset]}", ""]
        head = ["scales", "image tokens", "test acc.", *types, "params", "MFLOPs/example", "train s", "load avg"]
        lines += ["| " + " | ".join([*head, "command"]) + " |", "|" + "---|" * (len(head) + 1)]
        for row in (r for r in rows() if r["dataset"] == dataset):
            s = summaries.get(row["name"])
            if s is None:
                lines.append(f"| {row['kind']} | not run | " + " | ".join(["–"] * (len(head) - 2)) + " | – |")
                continue
            size = s.get("model_size", {})
            scales = size.get("scales")
            label = f"{row['kind']} {tuple(scales) if scales else '(last)'}"
            load = s.get("load_average_1min", {})
            cells = [
                label,
                str(size.get("image_tokens", "–")),
                _pct(s["accuracy"]),
                *[_pct(s["per_type"].get(t)) for t in types],
                f"{size['params']:,d}" if "params" in size else "–",
                f"{size['forward_flops_per_example'] / 1e6:,.1f}" if "forward_flops_per_example" in size else "–",
                f"{s['train_seconds']:.0f}",
                f"{load.get('mean', float('nan')):.1f} (max {load.get('max', float('nan')):.1f})",
                f"`{s['commands'][0]}`",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        pair = [summaries.get(f"{dataset}_{k}") for k in NUM_SCALES]
        if all(pair) and all("model_size" in s for s in pair):
            single, multi = pair
            deltas = ", ".join(
                f"{t} {100 * (multi['per_type'][t] - single['per_type'][t]):+.2f}"
                for t in types
                if t in multi["per_type"] and t in single["per_type"]
            )
            params_x, flops_x = (
                multi["model_size"][k] / single["model_size"][k] for k in ("params", "forward_flops_per_example")
            )
            lines += [
                "",
                f"Multi minus single: {100 * (multi['accuracy'] - single['accuracy']):+.2f} points test accuracy "
                f"({deltas}); parameters x{params_x:.2f}, FLOPs/example x{flops_x:.2f}, "
                f"training time x{multi['train_seconds'] / single['train_seconds']:.2f} (at the load averages shown).",
            ]
            if max(single["accuracy"], multi["accuracy"]) < CHANCE_LIKE:
                lines += [
                    "",
                    f"Neither row reaches {100 * CHANCE_LIKE:.0f} % test accuracy within this budget: it is too "
                    "short for this task to separate the two token sets, and the difference above is not evidence "
                    "either way. The comparison needs a budget at which the single-scale row learns the task (the "
                    "Sort-of-CLEVR table's validation curves show when that happens).",
                ]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_section(text: str, body: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the part between ``begin`` and ``end`` replaced by ``body`` (markers appended if absent);
    everything outside the markers is kept byte for byte."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    if begin in text or end in text:
        raise ValueError(f"docs file has only one of {begin} / {end} (or they are out of order): fix it by hand")
    sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}{block}\n"


def collect(results_dir: str) -> dict[str, dict]:
    out = {}
    for row in rows():
        path = os.path.join(results_dir, row["name"], "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                out[row["name"]] = json.load(f)
    return out


def write_docs(results_dir: str, docs: str) -> str:
    text = open(docs).read() if os.path.exists(docs) else "# Results\n"
    new = replace_section(text, table(collect(results_dir)))
    os.makedirs(os.path.dirname(docs) or ".", exist_ok=True)
    with open(docs, "w") as f:
        f.write(new)
    return new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="train + evaluate the rows without a summary.json first")
    p.add_argument("--only", default=None, help="comma-separated row names (e.g. easy_vqa_multi)")
    p.add_argument("--results", default=os.path.join(REPO, "results", "multiscale"))
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "results.md"))
    a = p.parse_args()
    only = set(a.only.split(",")) if a.only else None
    if a.run:
        for row in rows():
            if only and row["name"] not in only:
                continue
            if os.path.exists(os.path.join(a.results, row["name"], "summary.json")):
                print(f"{row['name']}: results exist, skipped", flush=True)
                continue
            run_row(row, a.results)
    for row in rows():  # size and FLOPs from each recorded config.json (a pure function of it)
        folder = os.path.join(a.results, row["name"])
        if os.path.exists(os.path.join(folder, "summary.json")):
            add_model_size(folder)
    write_docs(a.results, a.docs)
    print(f"wrote {a.docs} (section {BEGIN} ... {END})")


if __name__ == "__main__":
    main()
