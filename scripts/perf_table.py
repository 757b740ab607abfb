"""Writes docs/performance.md from the benchmark JSON files in results/perf/ (never typed by hand).

Run: python scripts/perf_table.py [--results=results/perf] [--out=docs/performance.md]

File names say what a result is (scripts/perf_runs.sh writes them): cpu_torch_peer[_<host>].json,
cpu_matmul_shapes[_<host>].json, cpu_step_ceiling[_<host>].json, cpu_profile.json, cpu_fusion_<variant>.json,
cpu_switch_<switch>.json, cpu_compile_depth<N>_<scan|unrolled>.json, gpu_<impl>.json. Every row names the command
that produced it and the load average it ran under. Targets are issue 8's; each is stated as met or missed with the
measured figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

TARGET_SPEEDUP = 1.25  # ours vs torch eager and torch.compile, CPU, float32, shared size
TARGET_COMPILE_S = 10.0  # 12 layers per tower, scan_layers
TARGET_COMPILE_RATIO = 1.3  # 24 vs 12 layers
TARGET_GPU_MFU = 0.45  # of the 989 TFLOP/s datasheet peak, bf16, cuDNN attention

FUSION_ORDER = ("co_attention", "merged", "cross", "gated_cross", "bottleneck", "query", "concat", "rn")
SWITCH_ORDER = ("scan", "remat_minimal", "remat_full", "bf16", "attention_reference")

FORMULA = """\
**FLOPs** (`vtfusion_jax/flops.py`, `model_flops`): every matrix multiply and convolution at 2 FLOPs per
multiply-add, attention score (QK^T) and value (PV) products included for self- and cross-attention; element-wise
work (LayerNorm, softmax, GELU, the optimiser) and embedding gathers are not counted. One training step costs
3x the forward pass (activation gradients + weight gradients). Per example, with D the width, M the MLP width,
`h` heads:

| Piece | Forward FLOPs |
|---|---|
| attention, Lq queries, Lk keys | 2·Lq·D·D (q) + 2·2·Lk·D·D (k, v) + 2·Lq·D·D (out) + 2·2·Lq·Lk·D (scores, values) |
| MLP over L tokens | 2·2·L·D·M |
| Transformer block (self [+ cross]) | attention(L, L) + MLP(L) [+ attention(L, Lk)] |
| k x k convolution, Cin -> Cout | 2·Hout·Wout·k·k·Cin·Cout |
| ViT | patch conv 2·N·p·p·3·D + depth x block(N [+1 CLS]) |
| BERT | depth x block(L) (embeddings are gathers) |
| GRU, per direction | L·2·3·(Din·H + H·H), + projection 2·L·dirs·H·D |
| fusion | the variant's `flops_per_example` (models/fusion.py) + input projections |
| head | 2·P·hidden + 2·hidden·C |

tests/test_flops.py checks the formula exactly against the matmuls of the traced program for every encoder and
fusion variant (scanned and unrolled), and within 10 % of XLA's `cost_analysis` (forward and training) for two
variants. The benchmark prints XLA's count of the compiled step beside the formula (`XLA / formula`; XLA also counts
element-wise work, and counts a scanned layer body once).

**MFU** = formula FLOPs per step / median step time / peak. The peak is measured on the spot by the benchmark:
the best FLOP/s of a jitted chain of 8 square matmuls (side 2048 on CPU, 8192 on GPU) in the model's dtype
(`vtfusion_jax/speed.py`, `matmul_peak`); on GPU also the datasheet peak (989 TFLOP/s dense bf16 for H100/H200).
"""


def _load(results: str) -> dict[str, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["_file"] = os.path.basename(path)  # runs renamed after the fact (host suffixes) keep their command
        out[os.path.splitext(r["_file"])[0]] = r
    return out


def _ms(x) -> str:
    return f"{1e3 * x:,.0f}" if x is not None else "-"


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if x is not None else "-"


def _load_str(r: dict) -> str:
    a, b = r.get("loadavg_start"), r.get("loadavg_end")
    if not a:
        return "-"
    return f"{a[0]:.2f}" + (f" / {b[0]:.2f}" if b else "")


def _cmd(r: dict) -> str:
    """The command that produced a run, and the file's present name where it was renamed since (the command's
    --out names the file it wrote)."""
    cmd = r.get("command", "?").strip()
    wrote = re.search(r"--out[= ](\S+)", cmd)
    if wrote and r.get("_file") and os.path.basename(wrote.group(1)) != r["_file"]:
        return f"`{cmd}` (the file was renamed since: {r['_file']})"
    return f"`{cmd}`"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _step_row(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['examples_per_s']:.1f} | {_ms(r['step_s_median'])} | {_ms(r['step_s_min'])} "
        f"| {r['flops_per_step_train'] / 1e9:.1f} | {r['xla_over_analytic']:.3f} "
        f"| {r['achieved_flops_per_s'] / 1e9:.0f} | {_pct(r.get('mfu_measured_peak'))} "
        f"| {r['compile']['total_s']:.1f} | {r['num_params'] / 1e6:.2f} | {_load_str(r)} | {_cmd(r)} |"
    )


STEP_HEADER = (
    "| {first} | examples/s | step ms (median) | step ms (min) | GFLOP / step | XLA / formula | GFLOP/s "
    "| MFU (measured peak) | compile s | params (M) | load 1-min (start / end) | command |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _cpu(r: dict) -> str:
    """The CPU of a run: its model name, plus family, model and widest SIMD where the run recorded them (runs
    before speed.cpu_identity have the name alone; a masked name such as "AMD EPYC" spans CPUs 2x apart)."""
    h = r.get("host", {})
    name = h.get("cpu", "?")
    if not h.get("cpu_family"):
        return f"{name} (earlier host, family not recorded)" if h.get("cpu") else name
    return f"{name} (family {h['cpu_family']} model {h.get('cpu_model', '?')}, {h.get('cpu_isa') or 'ISA ?'})"


def _host(r: dict) -> str:
    h = r.get("host", {})
    return (
        f"{_cpu(r)}, {h.get('cpu_count', '?')} cores, backend {h.get('backend', '?')} "
        f"({h.get('device_kind', '?')}), jax {h.get('jax', '?')}, flax {h.get('flax', '?')}, "
        f"optax {h.get('optax', '?')}"
    )


PROFILE_BUCKETS = ("matmul", "attention", "mlp", "layernorm", "embeddings", "optimizer+loss", "other model")


def _profile_section(prof: dict) -> list[str]:
    """'Where the time goes': benchmarks/profile_step.py's one-core buckets, ours beside torch eager."""
    ours, torch = prof["ours"], prof.get("torch_eager")
    gflop = prof["flops_per_step_train"] / 1e9
    out = [
        "## Where the time goes (CPU, one core, co_attention, shared size, batch 32)",
        "",
        "`benchmarks/profile_step.py` pins itself to one core, so that XLA:CPU runs one thunk at a time and each "
        "thunk's time in a `jax.profiler` trace is its own cost; PyTorch eager (the same model, one thread) is "
        "profiled with `torch.profiler` in the same process. Buckets: `matmul` = dot thunks / aten mm, addmm, bmm, "
        "convolution; `attention` = softmax, masking and head transposes (torch: its fused SDPA kernel, which "
        "includes the score and value products); `mlp` = GELU and bias; the rest by where the op sits "
        f"(benchmarks/profile_step.py). {prof['steps']} profiled steps per side; load average (1-min) "
        f"{_load_str(prof)}.",
        "",
        "| Bucket | ours ms / step | torch eager ms / step |",
        "|---|---:|---:|",
    ]
    for b in PROFILE_BUCKETS:
        t = f"{torch['bucket_ms'][b]:,.0f}" if torch else "-"
        out.append(f"| {b} | {ours['bucket_ms'][b]:,.0f} | {t} |")
    t_total = f"{torch['total_ms']:,.0f}" if torch else "-"
    t_step = f"{torch['step_ms']:,.0f}" if torch else "-"
    out += [
        f"| **sum of profiled ops** | **{ours['total_ms']:,.0f}** | **{t_total}** |",
        f"| step wall time (unprofiled) | {ours['step_ms']:,.0f} | {t_step} |",
        "",
        f"Our dot thunks run {ours['matmul_gflop']:.1f} GFLOP per step (the formula: {gflop:.1f}) at "
        f"{ours['matmul_gflop_per_s']:.0f} GFLOP/s on one core. Minor page faults per step: "
        f"{ours['page_faults_per_step']:,.0f} (host memory reuse: "
        f"{'on' if prof['host_memory'].get('applied') else 'off'}, `vtfusion_jax/host_memory.py`). Slowest dot "
        "shapes (engine, pass, lhs -> output):",
        "",
        "| Dot | count | ms / step | GFLOP/s |",
        "|---|---:|---:|---:|",
    ]
    for d in ours["top_dots"][:8]:
        out.append(f"| `{d['dot']}` | {d['count']} | {d['ms']:,.1f} | {d['gflop_per_s']:.0f} |")
    out += ["", f"Command: {_cmd(prof)}", ""]
    return out


def _peer_section(peer: dict, verdicts: list[str], several: bool) -> list[str]:
    """One benchmarks/torch_peer.py run: the step times side by side, and the speed verdicts for its host."""
    med, mn, mfu = peer["step_s_median"], peer["step_s_min"], peer["mfu_measured_peak"]
    peaks = peer["peak_flops_per_s"]
    cpu = _cpu(peer)
    out = [f"### {cpu}", ""] if several else []
    out += [
        "Same architecture in `benchmarks/torch_peer.py` (ViT + BERT towers, co-attention fusion, classification "
        f"head; {peer['num_params']['torch']:,d} parameters in torch, {peer['num_params']['jax']:,d} in ours), "
        "AdamW + global-norm clipping, same synthetic batch and thread count "
        f"({peer['threads']['torch']} torch threads, {peer['threads']['xla_cpu_count']} cores for XLA), "
        f"timed alternately in one process ({len(peer['step_s_all']['jax'])} rounds, order rotating). "
        f"Host: {_host(peer)}. "
        f"Formula: {peer['flops_per_step_train'] / 1e9:.1f} GFLOP per step; torch's FLOP counter: "
        f"{peer['torch_flop_counter_per_step'] / 1e9:.1f} GFLOP (forward + backward). "
        f"Matmul peaks measured in the same run: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, "
        f"torch {peaks['torch'] / 1e9:.0f} GFLOP/s. Load average (1-min) {_load_str(peer)}.",
        "",
        "| Implementation | step ms (median) | step ms (min) | MFU (own measured peak) | torch / ours (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in ("jax", "torch_eager", "torch_compile"):
        if n in med:
            ratio = "1.00" if n == "jax" else f"{peer['speedup_vs'][n]:.2f}x"
            label = {"jax": "ours (jax)", "torch_eager": "PyTorch eager", "torch_compile": "torch.compile"}[n]
            out.append(f"| {label} | {_ms(med[n])} | {_ms(mn[n])} | {_pct(mfu[n])} | {ratio} |")
    out += ["", f"Command: {_cmd(peer)}", ""]
    where = f" on {cpu}" if several else ""
    for n in ("torch_eager", "torch_compile"):
        if n in peer["speedup_vs"]:
            s = peer["speedup_vs"][n]
            verdicts.append(
                f"- Ours >= {TARGET_SPEEDUP}x faster than {n.replace('_', ' ')} (CPU{where}): "
                f"{_verdict(s >= TARGET_SPEEDUP)}"
                f" — measured {s:.2f}x (median step {_ms(med['jax'])} ms vs {_ms(med[n])} ms; float32 matmul peaks "
                f"measured in the run: jax {peaks['jax'] / 1e9:.0f}, torch {peaks['torch'] / 1e9:.0f} GFLOP/s)."
            )
    return out


def _matmul_section(r: dict) -> list[str]:
    """benchmarks/matmul_shapes.py: the step's dots replayed alone in XLA and in torch."""
    ms, rate = r["step_dot_ms"], r["step_dot_gflop_per_s"]
    eng = r["by_xla_engine"]
    out = [
        f"### The step's matmuls alone: XLA's kernels vs PyTorch's ({_cpu(r)})",
        "",
        "`benchmarks/matmul_shapes.py` reads every dot of our compiled train step (shapes, dimension numbers, and "
        "the engine XLA:CPU picked: a YNNPACK/XNNPACK fusion or XLA's Eigen dot) and replays each alone, in jax and "
        "as the torch call PyTorch's step makes for it (`torch.mm` on transposed views, `einsum` for batched dots), "
        f"same thread count ({r['threads']['torch']}), alternating, {r['rounds']} rounds; both results agree to "
        f"float32 rounding (largest difference {max(d['max_abs_diff_over_scale'] for d in r['dots']):.1e} of the "
        f"output's scale). Host: {_host(r)}. Load average (1-min) {_load_str(r)}.",
        "",
        f"The step's {r['step_dot_gflop']:.1f} GFLOP of dots take **{ms['xla']:,.0f} ms with XLA's kernels** "
        f"({rate['xla']:.0f} GFLOP/s) and **{ms['torch']:,.0f} ms with PyTorch's** ({rate['torch']:.0f} GFLOP/s): "
        f"torch / XLA time {r['torch_over_xla_time']:.2f}. By XLA engine: "
        + "; ".join(
            f"{name} {e['gflop']:.1f} GFLOP, {e['xla_ms']:,.0f} ms in XLA vs {e['torch_ms']:,.0f} ms in torch"
            for name, e in sorted(eng.items())
        )
        + ". Largest dots of the step (count x time):",
        "",
        "| Dot (engine, form, lhs x rhs -> out) | count | XLA GFLOP/s | torch GFLOP/s | XLA ms / step "
        "| torch ms / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    top = sorted(r["dots"], key=lambda d: -d["count"] * d["ms"]["xla"])[:12]
    for d in top:
        out.append(
            f"| `{d['name']}` | {d['count']} | {d['gflop_per_s']['xla']:.0f} | {d['gflop_per_s']['torch']:.0f} "
            f"| {d['count'] * d['ms']['xla']:,.1f} | {d['count'] * d['ms']['torch']:,.1f} |"
        )
    out += ["", f"Command: {_cmd(r)}", ""]
    return out


def _ceiling_section(r: dict) -> list[str]:
    """benchmarks/step_ceiling.py: the in-step time of the Dense GEMMs and of the rest of the step, ours and torch
    eager's, and what that leaves for the speed target."""
    sides, peak = r["sides"], r["peak_flops_per_s"]
    out = [
        f"### Dense GEMMs vs the rest of the step, inside the step ({_cpu(r)})",
        "",
        "`benchmarks/step_ceiling.py` times four steps alternately in one process: ours and torch eager's, each as "
        "is and with every Dense-layer matmul (forward and both gradients) replaced by a stand-in that reads its "
        "operands and writes an output of the same shape without the multiply-adds. The difference is the Dense "
        f"GEMMs' time in the step; their FLOPs ({r['dense_gflop']:.1f} of the step's {r['step_dot_gflop']:.1f} GFLOP "
        "of dots: the rest are the attention score and value products) are read from the compiled HLO; convolutions "
        "(the ViT patch embedding) are not dots and stay in both steps. "
        "Ceiling = the step without Dense GEMMs + their FLOPs at the measured peak (a lower bound: nothing else "
        f"gets faster). {r['rounds']} rounds, {r['pause_between_steps_s'] * 1e3:.0f} ms pause between steps. "
        f"Host: {_host(r)}. Load average (1-min) {_load_str(r)}.",
        "",
        "| Step | step ms | without Dense GEMMs ms | Dense GEMMs ms | Dense GFLOP/s | % of measured peak "
        "| ceiling ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(v: float) -> str:  # the run records milliseconds; _ms takes seconds
        return _ms(v / 1e3)

    for name, lib in (("jax", "jax"), ("torch_eager", "torch")):
        x = sides[name]
        rate = f"{x['dense_gflop_per_s']:.0f}" if x["dense_gflop_per_s"] else "n/a"
        frac = _pct(x["dense_fraction_of_peak"]) if x["dense_fraction_of_peak"] else "n/a"
        out.append(
            f"| {'ours' if name == 'jax' else 'torch eager'} (peak {peak[lib] / 1e9:.0f} GFLOP/s) "
            f"| {ms(x['step_ms'])} | {ms(x['no_dense_ms'])} | {ms(x['dense_ms'])} | {rate} | {frac} "
            f"| {ms(x['ceiling_ms'])} |"
        )
    ours = sides["jax"]
    allowed = sides["torch_eager"]["step_ms"] / TARGET_SPEEDUP
    dense_at_peak = ours["ceiling_ms"] - ours["no_dense_ms"]
    verdict = f"Against this run's torch eager step the {TARGET_SPEEDUP}x target allows our step {ms(allowed)} ms."
    if ours["step_ms"] <= allowed:
        verdict += f" Our step in this run, {ms(ours['step_ms'])} ms, is within it."
    elif ours["ceiling_ms"] <= allowed:
        verdict += (
            f" Our ceiling (every Dense GEMM at the measured peak) is {ms(ours['ceiling_ms'])} ms, below it: "
            "faster Dense GEMMs alone could meet the target here."
        )
    else:
        verdict += (
            f" Our ceiling, every Dense GEMM at jax's measured peak and the rest unchanged, is "
            f"**{ms(ours['ceiling_ms'])} ms: above it**."
        )
        budget = allowed - ours["no_dense_ms"]  # what the Dense GEMMs could take beside the rest of our step
        if budget > 0:
            rate = r["dense_gflop"] * 1e9 / (budget / 1e3)
            verdict += (
                f" Beside the {ms(ours['no_dense_ms'])} ms the rest of our step takes, the Dense GEMMs would have "
                f"{ms(budget)} ms: {rate / 1e9:.0f} GFLOP/s, {_pct(rate / peak['jax'])} of the measured peak."
            )
        else:
            verdict += f" The rest of our step alone takes {ms(ours['no_dense_ms'])} ms."
        if allowed > dense_at_peak:
            verdict += (
                f" With the GEMMs at the peak, the rest would have to shrink to {ms(allowed - dense_at_peak)} ms."
            )
        else:
            verdict += f" The Dense GEMMs at the peak alone take {ms(dense_at_peak)} ms."
    out += ["", verdict]
    return out + ["", f"Command: {_cmd(r)}", ""]


def _weight_grad_section(r: dict) -> list[str]:
    """benchmarks/weight_grad.py: the Dense kernel gradient as XLA's ``A^T B`` dot vs with its operand transposed
    first (vtfusion_jax/linear.py), the same step timed alternately."""
    med, low = r["step_s_median"], r["step_s_min"]
    forms = r["dot_gflop_by_form"]
    names = sorted({f for side in forms.values() for f in side})
    out = [
        f"### The Dense kernel gradient's dot form ({_cpu(r)})",
        "",
        "`benchmarks/weight_grad.py` builds our train step twice, with the kernel gradient `x^T @ dy` as one dot "
        "(`plain`: XLA:CPU runs it in its Eigen dot, which contracts the lhs on its leading axis) and with the "
        "smaller operand transposed first (`transposed`, the default on CPU: `vtfusion_jax/linear.py`; the dot then "
        "runs in a YNNPACK/XNNPACK fusion), and times them alternately in one process "
        f"({r['rounds']} rounds). Final losses: {r['final_loss']['plain']:.6f} / {r['final_loss']['transposed']:.6f}. "
        f"Host: {_host(r)}. Load average (1-min) {_load_str(r)}.",
        "",
        "| Kernel gradient | step ms (median) | step ms (min) | " + " | ".join(f"GFLOP in {n}" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for side in ("plain", "transposed"):
        out.append(
            f"| {side} | {_ms(med[side])} | {_ms(low[side])} | "
            + " | ".join(f"{forms[side].get(n, 0.0):.1f}" for n in names)
            + " |"
        )
    out += [
        "",
        f"Step time plain / transposed: **{r['plain_over_transposed']:.2f}x**.",
        "",
        f"Command: {_cmd(r)}",
        "",
    ]
    return out


def _target_needs(peer: dict, mm: dict) -> list[str]:
    """What the CPU speed target asks of the GEMM kernels on one host (a torch-peer run and a matmul_shapes run
    with the same CPU): the step time the target allows, and our step estimated with PyTorch's kernels in place of
    XLA's (our measured step scaled by the two libraries' time ratio on the step's dots, measured in isolation)."""
    med = peer["step_s_median"]
    torch_names = [n for n in ("torch_eager", "torch_compile") if n in med]
    if not torch_names or "jax" not in med:
        return []
    fastest = min(torch_names, key=lambda n: med[n])
    allowed = med[fastest] / TARGET_SPEEDUP
    flops = peer["flops_per_step_train"]
    peak = peer["peak_flops_per_s"]["jax"]
    dots, ratio = mm["step_dot_ms"], mm["torch_over_xla_time"]  # ratio: torch / XLA time on the step's dots
    with_torch_kernels = med["jax"] * ratio
    out = [
        f"**What the {TARGET_SPEEDUP}x target needs here ({_cpu(peer)}).** The faster PyTorch "
        f"step is {fastest.replace('_', ' ')} at {_ms(med[fastest])} ms, so the target allows our step at most "
        f"{_ms(allowed)} ms: {flops / allowed / 1e9:.0f} GFLOP/s, {_pct(flops / allowed / peak)} of jax's measured "
        f"matmul peak ({peak / 1e9:.0f} GFLOP/s). The step's dots alone, replayed one by one, take "
        f"{dots['xla']:,.0f} ms with XLA's kernels and {dots['torch']:,.0f} ms with PyTorch's (the section above): "
        f"time ratio {ratio:.2f}. Our {_ms(med['jax'])} ms step scaled by that ratio estimates it with PyTorch's "
        f"kernels at {_ms(with_torch_kernels)} ms."
    ]
    if med["jax"] <= allowed:
        out[-1] += f" Our step, {_ms(med['jax'])} ms, is within the allowed step with XLA's kernels."
    elif with_torch_kernels > allowed:
        out[-1] += (
            " That is still above the allowed step: on this host the target needs float32 GEMMs faster than "
            "PyTorch's, not only as fast."
        )
    return out + [""]


def build(results: dict[str, dict]) -> str:
    lines = [
        "# Performance",
        "",
        "Generated by `python scripts/perf_table.py` from the JSON files in `results/perf/`; every row names the "
        "command that produced it (`bash scripts/perf_runs.sh` runs them all). Do not edit by hand.",
        "",
    ]
    verdicts: list[str] = []
    fusions = {k[len("cpu_fusion_") :]: v for k, v in results.items() if k.startswith("cpu_fusion_")}
    # Runs may come from different sessions on different hosts: name every CPU host and the runs it measured, so
    # that no figure is read against another machine's.
    by_host: dict[str, list[str]] = {}
    for key, r in sorted(results.items()):
        if key.startswith("cpu_"):
            by_host.setdefault(_host(r), []).append(key)
    if len(by_host) == 1:
        lines += [f"CPU runs: {next(iter(by_host))}. Peak: the measured float32 matmul peak of each run.", ""]
    elif by_host:
        lines += ["CPU runs on more than one host (compare rows only within one host; ratios inside a run hold):", ""]
        lines += [f"- {host}: {', '.join(f'`{k}`' for k in keys)}" for host, keys in by_host.items()]
        lines += ["", "Peak: the measured float32 matmul peak of each run.", ""]
    n_head = len(lines)

    # --- PyTorch peer (one run per host: cpu_torch_peer.json, cpu_torch_peer_<host>.json) ------------------------
    lines += ["## Ours vs PyTorch (CPU, float32, shared size, batch 32)", ""]
    peers = [results[k] for k in sorted(results) if k.startswith("cpu_torch_peer")]
    for peer in peers:
        lines += _peer_section(peer, verdicts, several=len(peers) > 1)
    if not peers:
        lines += ["Not measured yet.", ""]
    for key in sorted(k for k in results if k.startswith("cpu_matmul_shapes")):
        mm = results[key]
        lines += _matmul_section(mm)
        same_host = [p for p in peers if _cpu(p) == _cpu(mm)]
        if same_host:
            lines += _target_needs(same_host[0], mm)
    for key in sorted(k for k in results if k.startswith("cpu_step_ceiling")):
        lines += _ceiling_section(results[key])
    for key in sorted(k for k in results if k.startswith("cpu_weight_grad")):
        lines += _weight_grad_section(results[key])

    # --- profile ----------------------------------------------------------------------------------------------
    prof = results.get("cpu_profile")
    if prof:
        lines += _profile_section(prof)

    # --- fusion variants --------------------------------------------------------------------------------------
    lines += [
        "## Fusion variants (CPU, float32, shared size, batch 32)",
        "",
        "ViT (64 px, patch 8: 64 image tokens) and BERT (16 text tokens) towers of 4 layers, 4 fusion layers, D=256, "
        "MLP 1024, 4 heads, unrolled, no remat (`configs/perf.py`). Only the fusion changes between rows.",
        "",
        STEP_HEADER.format(first="Fusion"),
    ]
    for name in sorted(fusions, key=lambda n: FUSION_ORDER.index(n) if n in FUSION_ORDER else 99):
        lines.append(_step_row(f"`{name}`", fusions[name]))
    lines.append("")

    # --- switches ---------------------------------------------------------------------------------------------
    switches = {k[len("cpu_switch_") :]: v for k, v in results.items() if k.startswith("cpu_switch_")}
    lines += [
        "## Speed switches (CPU, co_attention, shared size, batch 32)",
        "",
        "Each switch keeps the results (tests/test_speed_switches.py, tests/test_layers.py); the baseline is the "
        "`co_attention` row above (float32, unrolled, no remat, XLA attention).",
        "",
        STEP_HEADER.format(first="Switch"),
    ]
    if "co_attention" in fusions:
        lines.append(_step_row("baseline", fusions["co_attention"]))
    for name in sorted(switches, key=lambda n: SWITCH_ORDER.index(n) if n in SWITCH_ORDER else 99):
        lines.append(_step_row(f"`{name}`", switches[name]))
    lines.append("")

    # --- compile time -----------------------------------------------------------------------------------------
    comp = {k[len("cpu_compile_") :]: v for k, v in results.items() if k.startswith("cpu_compile_")}
    lines += [
        "## Compile time (CPU)",
        "",
        "Lowering + XLA compilation of the whole train step (forward, backward, AdamW), measured in a fresh process "
        "without the persistent compilation cache (`cold-cache` / `warm-cache`: a first process fills "
        "`bench.compilation_cache_dir`, a second loads the executable from it). Depth = layers in each of the image "
        "tower, text tower and fusion.",
        "",
        "| Depth per tower | layers | trace s | compile s | total s | params (M) | load 1-min | command |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    cache = {k[len("cpu_cache_") :]: v for k, v in results.items() if k.startswith("cpu_cache_")}
    for name in ("cold", "warm"):
        if name in cache:
            comp[f"depth{cache[name]['config']['model']['image_encoder']['depth']}_{name}-cache"] = cache[name]
    for name in sorted(comp, key=lambda n: (int(n.split("_")[0][5:]), n)):
        r = comp[name]
        depth, kind = name.split("_")[0][5:], name.split("_")[1]
        c = r["compile"]
        lines.append(
            f"| {depth} | {kind} | {c['trace_s']:.1f} | {c['compile_s']:.1f} | {c['total_s']:.1f} "
            f"| {r['num_params'] / 1e6:.1f} | {_load_str(r)} | {_cmd(r)} |"
        )
    lines.append("")
    if "depth12_scan" in comp:
        t12 = comp["depth12_scan"]["compile"]["total_s"]
        verdicts.append(
            f"- 12-layer-per-tower model with scan_layers compiles in <= {TARGET_COMPILE_S:.0f} s (CPU): "
            f"{_verdict(t12 <= TARGET_COMPILE_S)} — measured {t12:.1f} s."
        )
        if "depth24_scan" in comp:
            ratio = comp["depth24_scan"]["compile"]["total_s"] / t12
            verdicts.append(
                f"- Doubling the depth costs <= {TARGET_COMPILE_RATIO}x compile time: "
                f"{_verdict(ratio <= TARGET_COMPILE_RATIO)} — measured {ratio:.2f}x."
            )

    # --- GPU --------------------------------------------------------------------------------------------------
    gpu = {k[len("gpu_") :]: v for k, v in results.items() if k.startswith("gpu_") and "step_s_median" in v}
    lines += ["## GPU (bf16, ViT-B/16 + BERT-base + 6 co-attention layers, batch 256)", ""]
    if gpu:
        g0 = next(iter(gpu.values()))
        lines += [
            f"{_host(g0)}. `python benchmarks/gpu_bench.py` (configs/perf.py `gpu` preset).",
            "",
            "| Attention | examples/s | step ms (median) | TFLOP / step | TFLOP/s | MFU (datasheet 989) "
            "| MFU (measured peak) | compile s | params (M) | command |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in sorted(gpu.items()):
            lines.append(
                f"| {name} | {r['examples_per_s']:.0f} | {_ms(r['step_s_median'])} "
                f"| {r['flops_per_step_train'] / 1e12:.1f} | {r['achieved_flops_per_s'] / 1e12:.0f} "
                f"| {_pct(r.get('mfu_datasheet'))} | {_pct(r.get('mfu_measured_peak'))} "
                f"| {r['compile']['total_s']:.0f} | {r['num_params'] / 1e6:.0f} | {_cmd(r)} |"
            )
        lines.append("")
        if "cudnn" in gpu:
            m = gpu["cudnn"].get("mfu_datasheet") or 0.0
            verdicts.append(f"- GPU MFU >= 45 % with cuDNN attention: {_verdict(m >= TARGET_GPU_MFU)} — {_pct(m)}.")
            if "xla" in gpu:
                s = gpu["xla"]["step_s_median"] / gpu["cudnn"]["step_s_median"]
                verdicts.append(f"- cuDNN attention faster than XLA attention: {_verdict(s > 1)} — {s:.2f}x.")
    else:
        lines += [
            "Not measured yet: no GPU was available to the session that wrote these results. Run "
            "`python benchmarks/gpu_bench.py` on one H100/H200 (about 5 minutes), commit `results/perf/gpu_*.json` "
            "and rerun this script.",
            "",
        ]
        verdicts.append("- GPU MFU >= 45 % with cuDNN attention, cuDNN faster than XLA attention: **not measured**.")

    head, body = lines[:n_head], lines[n_head:]
    out = [*head, "## Targets (issue 8)", "", *verdicts, "", *body, "## How the numbers are computed", "", FORMULA]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="results/perf")
    p.add_argument("--out", default="docs/performance.md")
    args = p.parse_args()
    text = build(_load(args.results))
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
