"""Compiles (never runs) the library's train step of a large model on 8 simulated CPU devices for every mesh layout;
records XLA's per-device memory_analysis() and the collectives it inserted (docs/scaling.md).

    python benchmarks/scaling.py --out_dir=results/scaling                     # ViT-L/16 + BERT-large + 6 co-attn
    python benchmarks/scaling.py --render                                     # docs/scaling.md table from the JSON
    python benchmarks/scaling.py --config=configs/perf.py:preset=tiny --large=0 --layouts=data,fsdp   # smoke

Shapes only: the state is ``train_lib.state_layout``'s abstract ShapeDtypeStructs with their shardings, the batch is
ShapeDtypeStructs; ``jax.jit(make_train_step(...), in/out_shardings, donate).lower(...).compile()`` as training does.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as jax_bench  # noqa: E402  (benchmarks/train_step.py: config loading, synthetic batch, provenance)

from vtfusion_jax import flops, sharding, speed, train_lib  # noqa: E402

LAYOUTS = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "data_fsdp": (2, 4, 1)}
LAYOUTS.update(data_tensor=(4, 1, 2), fsdp_tensor=(1, 4, 2), data_fsdp_tensor=(2, 2, 2))
# ViT-L/16 at 224 px (197 tokens), a BERT-large-size text tower, 6 co-attention layers, all at D=1024 / 16 heads, on
# top of configs/perf.py's gpu preset (bf16 compute, float32 params and AdamW state, scanned layers, 32 text tokens).
LARGE = ["model.width=1024", "model.attention_impl=auto", "model.head.hidden_dim=2048", "model.fusion.num_heads=16"]
TOWERS = ("image_encoder", "text_encoder")
LARGE += [f"model.{t}.{k}={v}" for t in TOWERS for k, v in (("depth", 24), ("num_heads", 16))]
LARGE += [f"model.{t}.mlp_dim=4096" for t in (*TOWERS, "fusion")]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "scaling.md")
GB = 1e9
SUMMARY = ("layout", "remat_policy", "memory_per_device", "collectives", "compile_s")
MEM = ("argument_size", "output_size", "temp_size", "alias_size")
HEAD = "layout|mesh (d,f,t)|remat|ex./dev|state GB|argument GB|output GB|temp GB|alias GB|total GB|code MB".split("|")
ORDER = {n: i for i, n in enumerate(LAYOUTS)}
TARGETS = {"8x H100 80 GB": 80, "256x v5p 95 GB": 95, "256x v5e 16 GB": 16}  # HBM per chip


def count_collectives(hlo: str) -> dict:
    """Static count of each collective instruction (sync or async ``-start``) in compiled HLO text."""
    return {k: len(re.findall(rf"\s{k}(?:-start)?\(", hlo)) for k in COLLECTIVES}


def state_bytes_per_device(abstract, mesh) -> int:
    """Bytes of one device's shard of every leaf of a state of ShapeDtypeStructs carrying shardings."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract)))


def compile_layout(cfg: dict, mesh_shape) -> dict:
    """Lowers and compiles the train step of ``cfg`` on ``mesh_shape``; returns memory, collectives and timings."""
    b, mesh, n = cfg["bench"], sharding.make_mesh(mesh_shape), int(cfg["bench"]["batch_size"])
    model, tx, init = jax_bench.model_and_optimizer(cfg)
    abstract, state_sh = train_lib.state_layout(model, init, tx, mesh)
    host = jax_bench.synthetic_batch(dict(cfg, bench=dict(b, batch_size=1)))  # shapes of one row
    sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype, sharding=sh) for k, v in host.items()}
    fn = jax_bench.jit_step(model, tx, state_sh, mesh)
    compiled, trace_s, compile_s = jax_bench.compile_timed(fn, (abstract, batch), mesh, rules=True)
    mem = compiled.memory_analysis()
    fields = sorted(a for a in dir(mem) if a.endswith("_in_bytes"))
    return {
        "mesh_shape": list(mesh.devices.shape),
        "num_params": flops.param_count(abstract.params),
        "state_bytes_per_device": state_bytes_per_device(abstract, mesh),
        "params_bytes_per_device": state_bytes_per_device(abstract.params, mesh),
        "examples_per_device": n // sharding.mesh_axis_size(mesh, sharding.BATCH_AXES),
        "memory_per_device": {f.removesuffix("_in_bytes"): int(getattr(mem, f)) for f in fields},
        "collectives": count_collectives(compiled.as_text()),
        "trace_s": trace_s,
        "compile_s": compile_s,
    }


def measure(cfg: dict, layouts, remats, command: str = "", out_dir: str = "", tag: str = "") -> list[dict]:
    """``compile_layout`` for every (layout, remat policy); writes out_dir/<layout>[_remat_<policy>]<tag>.json."""
    results = []
    for name in layouts:
        for remat in remats:
            c = dict(cfg, model=dict(cfg["model"], remat_policy=remat))
            res = {"layout": name, "remat_policy": remat, **compile_layout(c, LAYOUTS[name])}
            results.append({**jax_bench.record("scaling", command, c, speed.loadavg()), **res})
            print(json.dumps({k: res[k] for k in SUMMARY}), flush=True)
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                suffix = "" if remat == "none" else f"_remat_{remat}"
                with open(os.path.join(out_dir, f"{name}{suffix}{tag}.json"), "w") as f:
                    json.dump(results[-1], f, indent=1, default=float)
    return results


def md_row(cells) -> str:
    """A markdown table row; floats with 2 decimals (3 below 1)."""
    cells = [f"{c:.{3 if abs(c) < 1 else 2}f}" if isinstance(c, float) else str(c) for c in cells]
    return "| " + " | ".join(cells) + " |"


def total(r: dict) -> int:
    """A device's bytes during the step: arguments + temporaries + outputs not aliased to (donated) arguments."""
    m = r["memory_per_device"]
    return m["argument_size"] + m["temp_size"] + m["output_size"] - m["alias_size"]


def table(results: list[dict]) -> str:
    """The compiled-memory table of docs/scaling.md (GB = 1e9 bytes, per device)."""
    rows = [md_row([*HEAD, *COLLECTIVES, "compile s"]), "|" + "---|" * (len(HEAD) + 6)]
    key = lambda r: (ORDER.get(r["layout"], 99), r["remat_policy"] != "none", -r["examples_per_device"])  # noqa: E731
    for r in sorted(results, key=key):
        m, mesh = r["memory_per_device"], "x".join(map(str, r["mesh_shape"]))
        cells = [r["layout"], mesh, r["remat_policy"], r["examples_per_device"], r["state_bytes_per_device"] / GB]
        cells += [m[k] / GB for k in MEM] + [total(r) / GB, m["generated_code_size"] / 1e6]
        rows.append(md_row(cells + [r["collectives"][k] for k in COLLECTIVES] + [round(r["compile_s"])]))
    r0, b = results[0], results[0]["config"]["bench"]
    cmds = "; ".join(sorted({f"`{r['command']}`" for r in results}))
    commits = ", ".join(sorted({str(r["git_commit"])[:7] for r in results}))
    return "\n".join(rows) + (
        f"\n\n{r0['num_params'] / 1e6:.1f}M parameters; {b['image_size']} px images, {b['text_len']} text tokens, "
        f"{r0['config']['model']['dtype']} compute; jax {r0['host']['jax']} on {r0['host']['cpu']} "
        f"({r0['host']['cpu_count']} cores), {r0['host']['num_devices']} simulated devices; commits {commits}. "
        f"Commands: {cmds}.\n"
    )


def extrapolation(results: list[dict]) -> str:
    """Per layout: state per chip on 8 and 256 chips, activation GB per example (slope between the two measured
    batches) with and without remat, and the largest global batch per chip that fits each target's HBM (a batch shard
    spans the ``tensor`` chips: examples per shard / t)."""
    by = {(r["layout"], r["remat_policy"], r["examples_per_device"]): r for r in results}
    full = max(r["state_bytes_per_device"] for r in results)
    head = "layout|8-chip state GB|256-chip mesh|256-chip state GB|remat|act. GB/ex.|other temp GB".split("|")
    rows = [md_row(head + [f"max batch/chip {n}" for n in TARGETS]), "|" + "---|" * (len(head) + 3)]
    for (name, remat, e1), r1 in sorted(by.items(), key=lambda kv: (ORDER.get(kv[0][0], 99), kv[0][1] != "none")):
        r2 = next((by[k] for k in by if k[:2] == (name, remat) and k[2] < e1), None)
        if r2 is None:
            continue
        d, f, t = r1["mesh_shape"]
        big = (256 // (f * t), 1, t) if f == 1 else (d, 256 // (d * t), t)  # the factor 32 goes to fsdp if sharded
        # state = R (replicated leaves) + (S - R) / (f t): R from the 8-chip value, S = the unsharded state
        s8, k = r1["state_bytes_per_device"], f * t
        rep = (k * s8 - full) / (k - 1) if k > 1 else full
        s256 = rep + (full - rep) / (big[1] * t)
        a = (total(r1) - total(r2)) / (e1 - r2["examples_per_device"])
        other = total(r1) - s8 - a * e1  # gradients, casts, optimiser temporaries: kept at its 8-chip value
        fits = [max(int((hbm * GB - (s8 if "8x" in n else s256) - other) // a), 0) // t for n, hbm in TARGETS.items()]
        rows.append(md_row([name, s8 / GB, "x".join(map(str, big)), s256 / GB, remat, a / GB, other / GB, *fits]))
    return "\n".join(rows) + "\n"


def render(results_dir: str, doc: str = DOC) -> None:
    """Rewrites docs/scaling.md's scaling-table and scaling-extrapolation blocks from results_dir/*.json."""
    results = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(os.path.join(results_dir, "*.json")))]
    text = Path(doc).read_text()
    for name, body in (("table", table(results)), ("extrapolation", extrapolation(results))):
        begin, end = f"<!-- scaling-{name}:begin -->", f"<!-- scaling-{name}:end -->"
        if begin in text:
            pre, rest = text.split(begin, 1)
            text = pre + begin + "\n" + body + end + rest.split(end, 1)[1]
    Path(doc).write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/perf.py:preset=gpu")
    p.add_argument("--large", type=int, default=1, help="apply the ViT-L/16 + BERT-large overrides (LARGE)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--remat", default="none,full", help="remat policies (none | minimal | full)")
    p.add_argument("--out_dir", default="")
    p.add_argument("--tag", default="", help="suffix of the JSON file names (e.g. _b16)")
    p.add_argument("--render", action="store_true", help="only rewrite docs/scaling.md's tables from --results")
    p.add_argument("--results", default="results/scaling")
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = jax_bench.parse(p, argv)
    if args.render:
        return render(args.results)
    cfg = jax_bench.load_config(args.config, (LARGE if args.large else []) + overrides)
    command = "python benchmarks/scaling.py " + " ".join(argv)
    measure(cfg, args.layouts.split(","), args.remat.split(","), command, args.out_dir, args.tag)


if __name__ == "__main__":
    main()
