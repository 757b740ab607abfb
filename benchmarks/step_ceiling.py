"""How fast could the CPU train step be? Its Dense GEMMs and the rest, measured inside the step, ours and torch's.

    python benchmarks/step_ceiling.py --config=configs/perf.py --out=results/perf/cpu_step_ceiling.json
    python benchmarks/step_ceiling.py --config=configs/perf.py:preset=tiny --rounds=2     # smoke

One process builds four steps on the same synthetic batch and times them alternately (rotating order, a pause
between steps, as benchmarks/torch_peer.py does):
  jax / torch_eager                 the real train steps (benchmarks/train_step.py, benchmarks/torch_peer.py);
  jax_no_dense / torch_eager_no_dense  the same steps with every Dense-layer matmul (``vtfusion_jax.linear`` in
                 ours, ``nn.Linear`` in torch: projections, MLPs, head) replaced, forward and backward, by a stand-in
                 that reads all of its operands and writes an output of the same shape without the multiply-adds
                 (row and column means, broadcast). Everything else (attention scores and values, patch embedding,
                 layer norms, GELU, loss, clipping, AdamW) runs as in the real step.
The difference of the two medians is the in-step time of the Dense GEMMs; their FLOPs are the real step's dots
minus the ablated step's, read from the compiled HLO (benchmarks/matmul_shapes.py). The ablated step keeps only
dots with batch axes, attention's (``unbatched_dots`` in the output counts what is left: a Dense layer outside
``vtfusion_jax.linear`` would show there). Hence the Dense GEMMs' in-step GFLOP/s and share of the measured matmul
peak, and a ceiling for our step: ``no-Dense step + Dense GFLOP / measured peak``, the step if every Dense GEMM ran
at the peak and nothing else changed. The stand-ins change how XLA fuses the neighbouring element-wise work (an
operand read only by a stand-in need not be written out), so the ablated step is if anything faster than the real
step's non-GEMM part and the ceiling a lower bound. torch.compile is left out (a recompile per variant);
benchmarks/torch_peer.py compares it.
Runs on jax + flax + optax + numpy + torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_args  # noqa: E402  (benchmarks/bench_args.py, stdlib only)


# --- the stand-ins ------------------------------------------------------------------------------------------------
def jax_standin():
    """A custom_vjp with ``linear._matmul``'s signature ([M, K] x [K, N] -> [M, N]) and no multiply-adds: every
    output reads a row mean of one operand plus a column mean of the other, in the forward and both gradients."""
    import jax

    @jax.custom_vjp
    def standin(x2, w2):
        return x2.mean(1)[:, None] + w2.mean(0)[None, :]

    def fwd(x2, w2):
        return standin(x2, w2), (x2, w2)

    def bwd(res, dy):
        x2, w2 = res
        return dy.mean(1)[:, None] + w2.mean(1)[None, :], x2.mean(0)[:, None] + dy.mean(0)[None, :]

    standin.defvjp(fwd, bwd)
    return standin


def jax_dense_ablated():
    """A context in which ``vtfusion_jax.linear`` (every Dense layer of the library) traces the stand-in."""
    from vtfusion_jax import linear

    return mock.patch.object(linear, "_matmul", jax_standin())


def torch_standin_linear():
    """``nn.Linear.forward`` with the same stand-in: an autograd Function without multiply-adds."""
    import torch

    class StandIn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):  # x [..., K], w [N, K], b [N] or None
            ctx.save_for_backward(x, w)
            ctx.has_bias = b is not None
            y = x.mean(-1, keepdim=True) + w.mean(1)
            return y + b if b is not None else y

        @staticmethod
        def backward(ctx, dy):
            x, w = ctx.saved_tensors
            lead = tuple(range(dy.ndim - 1))
            dx = dy.mean(-1, keepdim=True) + w.mean(0)
            dw = dy.mean(lead)[:, None] + x.mean(lead)[None, :]
            return dx, dw, (dy.sum(lead) if ctx.has_bias else None)

    def forward(self, x):
        return StandIn.apply(x, self.weight, self.bias)

    return forward


def torch_dense_ablated():
    """A context in which every ``nn.Linear`` runs the stand-in."""
    from torch import nn

    return mock.patch.object(nn.Linear, "forward", torch_standin_linear())


def dot_summary(hlo_text: str) -> dict:
    """The float dots of a compiled step (matmul_shapes.step_dots): their GFLOP (count x 2 x out x contracted) and
    how many are unbatched 2-D products (Dense layers; attention's score and value products carry batch axes)."""
    import matmul_shapes

    dots = matmul_shapes.step_dots(hlo_text)
    return {
        "gflop": sum(d["count"] * d["flops"] for d in dots) / 1e9,
        "unbatched": sum(d["count"] for d in dots if not d["dims"]["lhs_batch_dims"]),
    }


# --- the run ------------------------------------------------------------------------------------------------------
def run(cfg: dict, rounds: int, pause_s: float, command: str = "", bench=None) -> dict:
    """Times the four steps (see the module docstring); ``bench`` reuses a built benchmarks/train_step.py Bench for
    ours. Returns the JSON-able result."""
    import jax.numpy as jnp
    import torch
    import torch_peer
    import train_step as jax_bench

    from vtfusion_jax import speed

    if cfg["model"]["dtype"] != "float32":
        raise ValueError(f"step_ceiling compares float32 steps; got model.dtype={cfg['model']['dtype']!r}")
    b = cfg["bench"]
    torch.set_num_threads(os.cpu_count() or 1)  # the thread count XLA:CPU uses
    torch.manual_seed(int(cfg["seed"]))
    load_start = speed.loadavg()

    ours = bench or jax_bench.Bench(cfg)
    ours.compile()
    with jax_dense_ablated():
        ablated = jax_bench.Bench(cfg, compiler_options=ours.compiler_options)
        ablated.compile()
    dots_all = dot_summary(ours.compiled.as_text())
    dots_left = dot_summary(ablated.compiled.as_text())
    batch = jax_bench.synthetic_batch(cfg, int(cfg["seed"]))
    t_real = torch_peer.TorchTrainer(torch_peer.TorchModel(cfg), cfg, batch, None)
    t_ablated = torch_peer.TorchTrainer(torch_peer.TorchModel(cfg), cfg, batch, None)

    def t_ablated_step() -> float:
        with torch_dense_ablated():
            return t_ablated.step()

    runners = {
        "jax": ours.step,
        "jax_no_dense": ablated.step,
        "torch_eager": t_real.step,
        "torch_eager_no_dense": t_ablated_step,
    }
    times = bench_args.alternate(runners, rounds, pause_s, warmup=max(1, int(b["warmup"])))
    peak = {
        "jax": speed.matmul_peak(jnp.float32, int(b["matmul_size"]))["flops_per_s"],
        "torch": torch_peer.torch_matmul_peak(int(b["matmul_size"])),
    }
    med = {n: float(np.median(t)) for n, t in times.items()}
    dense_gflop = dots_all["gflop"] - dots_left["gflop"]
    sides = {}
    for side, lib in (("jax", "jax"), ("torch_eager", "torch")):
        dense_s = med[side] - med[side + "_no_dense"]
        rate = dense_gflop * 1e9 / dense_s if dense_s > 0 else None  # None: within noise of zero (tiny models)
        sides[side] = {
            "step_ms": med[side] * 1e3,
            "no_dense_ms": med[side + "_no_dense"] * 1e3,
            "dense_ms": dense_s * 1e3,
            "dense_gflop_per_s": rate / 1e9 if rate else None,
            "dense_fraction_of_peak": rate / peak[lib] if rate else None,
            "ceiling_ms": (med[side + "_no_dense"] + dense_gflop * 1e9 / peak[lib]) * 1e3,
        }
    return {
        **bench_args.record("step_ceiling", command, cfg, load_start),
        "torch": torch.__version__,
        "threads": {"torch": torch.get_num_threads(), "xla_cpu_count": os.cpu_count()},
        "rounds": rounds,
        "pause_between_steps_s": pause_s,
        "step_dot_gflop": dots_all["gflop"],
        "dense_gflop": dense_gflop,
        "other_dot_gflop": dots_left["gflop"],
        "unbatched_dots": {"step": dots_all["unbatched"], "ablated_step": dots_left["unbatched"]},
        "step_s_median": med,
        "step_s_all": times,
        "peak_flops_per_s": peak,
        "sides": sides,
        "final_loss": {"jax": ours.loss(), "torch_eager": t_real.last_loss},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = bench_args.parser(__doc__)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of each of the four per round)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, overrides = bench_args.parse(p, argv)
    import train_step as jax_bench

    from vtfusion_jax import speed

    cfg = jax_bench.load_config(args.config, overrides)
    env = bench_args.prepare(args)
    result = run(cfg, args.rounds, args.pause, "python benchmarks/step_ceiling.py " + " ".join(argv))
    return speed.emit_result({**result, **env}, args.out)


if __name__ == "__main__":
    main()
