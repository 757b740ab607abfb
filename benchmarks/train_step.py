"""Compiles and times the sharded train step on synthetic batches; prints FLOPs, examples/s and MFU as JSON.

    python benchmarks/train_step.py --config=configs/perf.py                       # shared CPU size, co_attention
    python benchmarks/train_step.py --config=configs/perf.py:fusion=merged --out=results/perf/x.json
    python benchmarks/train_step.py --config=configs/perf.py:depth=12 --config.model.scan_layers=True \
        --config.bench.steps=0                                                        # compile time only
    python benchmarks/train_step.py --config=configs/perf.py:preset=tiny            # smoke (seconds)
    python benchmarks/train_step.py --config=configs/easy_vqa.py                    # any training config

Builds the state and the library's jitted step as training does, times the compile and ``bench.steps`` steps on one
synthetic on-device batch. JSON: step times, examples/s, compile time, analytic FLOPs beside XLA's
``cost_analysis``, MFU against an in-process matmul peak (and ``bench.peak_tflops``), provenance. Also the command
line the benchmarks share (parser, parse, cli, alternate, record).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vtfusion_jax import flops as flops_lib  # noqa: E402
from vtfusion_jax import losses, optim, sharding, speed  # noqa: E402
from vtfusion_jax.models.vtfusion import DTYPES, VisionTextModel  # noqa: E402
from vtfusion_jax.train_lib import TrainState, create_train_state, make_train_step, state_layout  # noqa: E402

DEFAULT_VOCAB = 30522


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--config=FILE[:ARG]``, ``--out``, ``--wait_quiet`` (+ --config.KEY=VALUE)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/perf.py", help="config file[:arg] (default configs/perf.py)")
    p.add_argument("--out", default="", help="also write the JSON result here")
    p.add_argument("--wait_quiet", type=float, default=0.0, help="wait up to this many s for 1-min load <= 1.5")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parsed flags and the config overrides as 'KEY=VALUE' strings; any other unknown argument is an error."""
    args, rest = p.parse_known_args(list(argv))
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised argument {bad[0]!r} (overrides are --config.KEY=VALUE)")
    return args, [a[len("--config.") :] for a in rest]


def cli(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, script: str
) -> tuple[argparse.Namespace, dict, dict, str]:
    """Parses ``argv`` (default sys.argv), loads the config, then keeps freed host memory for reuse as train.py does
    and waits up to ``--wait_quiet`` s for a quiet machine. Returns (flags, config, {"host_memory", "quiet_wait"},
    the command line to record)."""
    from vtfusion_jax import host_memory

    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse(p, argv)
    cfg = load_config(args.config, overrides)
    host_mem = host_memory.reuse_freed_memory_on_cpu()
    quiet = speed.wait_for_quiet(max_wait_s=args.wait_quiet) if args.wait_quiet > 0 else None
    command = f"python benchmarks/{script} " + " ".join(argv)
    return args, cfg, {"host_memory": host_mem, "quiet_wait": quiet}, command


def alternate(runners: dict[str, Callable[[], float]], rounds: int, pause_s: float, warmup: int) -> dict:
    """Times several steps side by side: ``warmup`` untimed calls of each, then ``rounds`` rounds calling each runner
    once in an order rotated by one per round, after ``pause_s`` of idle. Returns {name: [seconds per round]}."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(pause_s)
            times[n].append(runners[n]())
    return times


def side_by_side(
    benchmark: str, benches: dict, cfg: dict, rounds: int, pause_s: float, command: str, load_start
) -> dict:
    """Times built Benches (side name -> Bench) alternately (``alternate``, after a warm-up); returns the fields
    every comparison result has: provenance, rounds, each side's median / min / all step times and final loss."""
    times = alternate({s: b.step for s, b in benches.items()}, rounds, pause_s, max(1, int(cfg["bench"]["warmup"])))
    r = dict(record(benchmark, command, cfg, load_start), rounds=rounds, pause_between_steps_s=pause_s)
    r.update(step_s_median={s: float(np.median(t)) for s, t in times.items()}, step_s_all=times)
    r["step_s_min"] = {s: float(min(t)) for s, t in times.items()}
    return r | {"final_loss": {s: b.loss() for s, b in benches.items()}}


def comparison_main(doc: str | None, argv: Sequence[str] | None, script: str, run: Callable, rounds: int) -> dict:
    """The command line of a side-by-side benchmark: the shared flags plus --rounds / --pause; prints (and with
    --out writes) ``run(cfg, rounds, pause_s, command)`` with the host-memory / quiet-wait fields."""
    p = parser(doc)
    p.add_argument("--rounds", type=int, default=rounds, help="timed rounds (one step of each side per round)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, cfg, env, command = cli(p, argv, script)
    return speed.emit_result({**run(cfg, args.rounds, args.pause, command), **env}, args.out)


def record(benchmark: str, command: str, cfg: dict, load_start) -> dict:
    """The fields every benchmark result starts with: provenance (commit, host, command), load and config."""
    prov = speed.provenance(command)
    return {"benchmark": benchmark, **prov, "loadavg_start": load_start, "loadavg_end": speed.loadavg(), "config": cfg}


def load_config(spec: str, overrides: Sequence[str] = ()) -> dict:
    """Reads ``path[:arg]`` into nested plain dicts and applies ``KEY=VALUE`` overrides (dotted keys; SystemExit
    listing the valid keys for an unknown one). ``plain_config(arg)`` (configs/perf.py) needs no ml_collections; a
    ``get_config(arg)`` is converted (``bench`` derived from ``dataset`` / ``train``)."""
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_bench_config", os.path.abspath(path))
    if mod_spec is None or mod_spec.loader is None:
        raise SystemExit(f"error: cannot load config file {path!r}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if hasattr(module, "plain_config"):
        cfg = module.plain_config(arg or None)
    else:
        cfg = _from_train_config(module.get_config(arg or None).to_dict())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not KEY=VALUE")
        _set(cfg, key, value)
    return cfg


def _from_train_config(c: dict) -> dict:
    """A training config (dataset / train sections instead of ``bench``) as a benchmark config."""
    d, t, model = c.get("dataset", {}), c.get("train", {}), c["model"]
    bench = dict(batch_size=t.get("global_batch_size", 32), image_size=d.get("image_size") or 64)
    bench["images_per_batch"] = t.get("images_per_batch", 0)
    bench.update(text_len=d.get("max_len", 16), num_classes=13, warmup=3, steps=20, matmul_size=2048, peak_tflops=0.0)
    bench["distinct_texts"] = 0  # > 0: the batch's questions repeat that many distinct texts (model.text_dedup)
    bench.update(compilation_cache_dir="")
    model["text_encoder"] = {"vocab_size": DEFAULT_VOCAB, **model["text_encoder"]}
    mesh = c.get("mesh_shape", (-1, 1, 1))
    return dict(seed=c.get("seed", 0), mesh_shape=mesh, model=model, optim=c["optim"], bench=bench)


def _set(cfg: dict, key: str, raw: str) -> None:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise SystemExit(f"error: unknown config key {key!r}: {where} has no {part!r}. Valid keys: {valid}")
        if i == len(parts) - 1:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as bfloat16
            if isinstance(node[part], bool) and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes")
            node[part] = value
        node = node[part]


def synthetic_batch(cfg: dict, seed: int = 0) -> dict:
    """A host batch with the model's input shapes: uniform images, random token ids, random text lengths
    (>= half the length; the rest is padding), random labels. ``bench.images_per_batch`` = K > 0: an image-grouped
    batch (data/grouped.py) of K images, question b on image b % K. ``bench.distinct_texts`` = T > 0: T random texts,
    repeated (question b asks text b % T, so all T occur once the batch holds T)."""
    b = cfg["bench"]
    n, s, length = int(b["batch_size"]), int(b["image_size"]), int(b["text_len"])
    k = int(b["images_per_batch"])
    vocab = int(cfg["model"]["text_encoder"].get("vocab_size", DEFAULT_VOCAB))
    rng = np.random.default_rng(seed)
    t = int(b.get("distinct_texts", 0)) or n
    lengths = rng.integers(max(1, length // 2), length + 1, size=t)[np.arange(n) % t]
    grouped = {"image_index": (np.arange(n) % k).astype(np.int32)} if k > 0 else {}
    return grouped | {
        "image": rng.uniform(size=(k or n, s, s, 3)).astype(np.float32),
        "text_ids": rng.integers(1, vocab, size=(t, length)).astype(np.int32)[np.arange(n) % t],
        "text_mask": np.arange(length)[None, :] < lengths[:, None],
        "label": rng.integers(0, int(b["num_classes"]), size=n).astype(np.int32),
        "valid": np.ones(n, bool),
    }


def model_and_optimizer(cfg: dict, **model_kw) -> tuple[VisionTextModel, optax.GradientTransformation, dict]:
    """The model (``model_kw``: VisionTextModel fields) and optimiser of ``cfg`` and a one-row zero batch with its
    input shapes (for init and layouts)."""
    b = cfg["bench"]
    s, length = int(b["image_size"]), int(b["text_len"])
    init = dict(image=jnp.zeros((1, s, s, 3)), text_ids=jnp.zeros((1, length), jnp.int32))
    init["text_mask"] = jnp.ones((1, length), bool)
    tx, _ = optim.make_optimizer(cfg["optim"], 10_000, optim.frozen_towers(cfg["model"]))
    return VisionTextModel(cfg["model"], int(b["num_classes"]), **model_kw), tx, init


def jit_step(model, tx, state_shardings, mesh, **kw) -> Callable:
    """The library's step over the classification loss, jitted with training's shardings and state donation."""
    step = make_train_step(functools.partial(losses.classification_loss, model), tx, **kw)
    io = (state_shardings, sharding.batch_sharding(mesh))
    return jax.jit(step, in_shardings=io, out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def compile_timed(fn, args: Sequence, mesh, options: dict | None = None, rules=False) -> tuple[Any, float, float]:
    """Lowers and compiles ``fn`` for ``args`` under ``mesh`` (``rules``: with the activation sharding rules);
    returns (compiled, trace seconds, compile seconds)."""
    with jax.set_mesh(mesh), sharding.activation_rules() if rules else contextlib.nullcontext():
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        return lowered.compile(options), t1 - t0, time.perf_counter() - t1


class Bench:
    """The built benchmark: model, optimiser, sharded state, on-device batch and the jitted step."""

    def __init__(self, cfg: dict, compiler_options: dict | None = None, state: TrainState | None = None, **model_kw):
        """Builds everything for ``cfg``; ``compiler_options`` (XLA debug options, e.g.
        {"xla_backend_optimization_level": 0}) apply to the step it compiles; ``state`` (of a Bench whose config
        differs only in switches that keep parameter shapes, e.g. attention_impl) skips initialisation;
        ``model_kw``: VisionTextModel fields (e.g. per_image_fusion=False)."""
        self.cfg, self.compiler_options = cfg, compiler_options
        self.mesh = sharding.make_mesh(cfg["mesh_shape"])
        self.model, self.tx, init_batch = model_and_optimizer(cfg, **model_kw)
        layout = (self.model, init_batch, self.tx, self.mesh)
        if state is None:  # the sharded initialisation training does
            state, self.state_shardings = create_train_state(*layout, int(cfg["seed"]))
        else:
            self.state_shardings = state_layout(*layout)[1]
        self.state, self.num_params = state, flops_lib.param_count(state.params)
        self.batch = jax.device_put(synthetic_batch(cfg, int(cfg["seed"])), sharding.batch_sharding(self.mesh))
        self.step_fn = jit_step(self.model, self.tx, self.state_shardings, self.mesh, skip_nonfinite=False)
        self.compiled = self.compile_info = self.last_metrics = None

    def compile(self) -> dict:
        """Lowers and compiles the step (once). Returns {"trace_s", "compile_s", "total_s", "xla_flops_per_step"}."""
        if self.compile_info is not None:
            return self.compile_info
        args = (self.step_fn, (self.state, self.batch), self.mesh, self.compiler_options)
        self.compiled, trace_s, compile_s = compile_timed(*args)
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla = float(cost.get("flops", float("nan"))) if cost else float("nan")
        total = trace_s + compile_s
        self.compile_info = {"trace_s": trace_s, "compile_s": compile_s, "total_s": total, "xla_flops_per_step": xla}
        return self.compile_info

    def step(self) -> float:
        """Runs one step to completion; returns its wall time in seconds."""
        if self.compiled is None:
            self.compile()
        t0 = time.perf_counter()
        self.state, self.last_metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.last_metrics))
        return time.perf_counter() - t0

    def loss(self) -> float:
        return float(self.last_metrics["loss"]) if self.last_metrics is not None else float("nan")


def analytic_flops(cfg: dict) -> dict:
    """flops.model_flops for this config's input sizes."""
    b, s = cfg["bench"], int(cfg["bench"]["image_size"])
    return flops_lib.model_flops(cfg["model"], (s, s), int(b["text_len"]), int(b["num_classes"]))


def run(cfg: dict, *, command: str = "", bench: Bench | None = None) -> dict:
    """Builds (unless ``bench`` is given), compiles and times the step of ``cfg``; returns the JSON-able result with
    step-time statistics, throughput and MFU (per-device peaks multiplied by the device count) when steps ran."""
    b = cfg["bench"]
    if b["compilation_cache_dir"]:
        speed.enable_compilation_cache(b["compilation_cache_dir"])
    load_start = speed.loadavg()
    fl = analytic_flops(cfg)
    bench = bench or Bench(cfg)
    comp = bench.compile()
    for _ in range(int(b["warmup"])):
        bench.step()
    times = [bench.step() for _ in range(int(b["steps"]))]
    peak = speed.matmul_peak(DTYPES[cfg["model"].get("dtype", "float32")], int(b["matmul_size"])) if times else None
    analytic_step = fl["train"] * int(b["batch_size"])
    out = dict(record("train_step", command, cfg, load_start), num_params=bench.num_params, flops_per_example=fl)
    out.update(flops_per_step_train=analytic_step, compile=comp)
    out.update(xla_over_analytic=comp["xla_flops_per_step"] / analytic_step, peak=peak, final_loss=bench.loss())
    if times:
        med, n_devices = float(np.median(times)), bench.mesh.size
        achieved = analytic_step / med
        out.update(step_s_median=med, step_s_min=float(np.min(times)), step_s_all=[float(t) for t in times])
        out.update(examples_per_s=int(b["batch_size"]) / med, achieved_flops_per_s=achieved)
        out["mfu_measured_peak"] = achieved / (peak["flops_per_s"] * n_devices)
        if float(b["peak_tflops"]) > 0:
            out["mfu_datasheet"] = achieved / (float(b["peak_tflops"]) * 1e12 * n_devices)
    return out


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags and its config overrides (see ``parse``)."""
    return parse(parser(__doc__), argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args, cfg, env, command = cli(parser(__doc__), argv, "train_step.py")
    return speed.emit_result({**run(cfg, command=command), **env}, args.out)


if __name__ == "__main__":
    main()
