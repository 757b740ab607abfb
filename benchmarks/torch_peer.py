"""The same model and training step in PyTorch (eager and torch.compile), timed alternately with ours.

    python benchmarks/torch_peer.py --config=configs/perf.py --out=results/perf/cpu_torch_peer.json
    python benchmarks/torch_peer.py --config=configs/perf.py:preset=tiny --compile_backend=none   # smoke

Three trainers on one synthetic batch and thread count, timed alternately: ``jax`` (the library's step),
``torch_eager`` (``config.model``'s ViT, BERT, co-attention, MLP head written in torch below; AdamW, clipping) and
``torch_compile``. Writes one JSON object: step times, torch / ours ratios (> 1: ours faster), each side's MFU
against its own matmul peak, both parameter counts and torch's FLOP counter beside our analytic count.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as jax_bench  # noqa: E402  (benchmarks/train_step.py)

from vtfusion_jax import speed  # noqa: E402


class MHA(nn.Module):
    """q/k/v/out projections with bias around F.scaled_dot_product_attention (heads = width / head_dim)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, xq, xkv=None, key_mask=None):
        xkv = xq if xkv is None else xkv
        b, lq, d = xq.shape
        lk = xkv.shape[1]
        q = self.q(xq).view(b, lq, self.h, -1).transpose(1, 2)
        k = self.k(xkv).view(b, lk, self.h, -1).transpose(1, 2)
        v = self.v(xkv).view(b, lk, self.h, -1).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, lq, d))


class MLP(nn.Sequential):
    def __init__(self, d: int, m: int):
        super().__init__(nn.Linear(d, m), nn.GELU(), nn.Linear(m, d))


class Block(nn.Module):
    """Transformer block: pre-LN (x + f(LN(x))) or post-LN (LN(x + f(x)), BERT)."""

    def __init__(self, d: int, heads: int, m: int, eps: float, post_ln: bool = False):
        super().__init__()
        self.post_ln = post_ln
        self.attn, self.mlp = MHA(d, heads), MLP(d, m)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)

    def forward(self, x, key_mask=None):
        if self.post_ln:
            x = self.ln1(x + self.attn(x, key_mask=key_mask))
            return self.ln2(x + self.mlp(x))
        y = self.ln1(x)
        x = x + self.attn(y, key_mask=key_mask)
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, d: int, spec: dict, image_size: int):
        super().__init__()
        p = spec["patch_size"]
        n = (image_size // p) ** 2
        eps = spec.get("ln_epsilon", 1e-6)
        self.patch = nn.Conv2d(3, d, p, stride=p)
        self.pos = nn.Parameter(torch.randn(n, d) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if spec.get("use_cls", False) else None
        self.blocks = nn.ModuleList(Block(d, spec["num_heads"], spec["mlp_dim"], eps) for _ in range(spec["depth"]))
        self.final_ln = nn.LayerNorm(d, eps=eps)

    def forward(self, image):  # image [B, 3, H, W]
        x = self.patch(image).flatten(2).transpose(1, 2) + self.pos  # [B, N, D]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.final_ln(x)


class Bert(nn.Module):
    def __init__(self, d: int, spec: dict):
        super().__init__()
        eps = spec.get("ln_epsilon", 1e-12)
        self.post_ln = spec.get("post_ln", True)
        self.word = nn.Embedding(spec["vocab_size"], d)
        self.pos = nn.Embedding(spec.get("max_len", 512), d)
        self.token_type = nn.Embedding(spec.get("type_vocab_size", 2), d)
        self.ln = nn.LayerNorm(d, eps=eps)  # embeddings LN (post-LN) or final LN (pre-LN)
        heads, m = spec["num_heads"], spec["mlp_dim"]
        self.blocks = nn.ModuleList(Block(d, heads, m, eps, self.post_ln) for _ in range(spec["depth"]))

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.pos(pos)[None] + self.token_type(torch.zeros_like(ids))
        if self.post_ln:
            x = self.ln(x)
        for blk in self.blocks:
            x = blk(x, key_mask=mask)
        if not self.post_ln:
            x = self.ln(x)
        return x * mask[..., None]


class CoAttentionLayer(nn.Module):
    """Self-attention per stream, cross-attention both ways on the post-self-attention tokens, MLP per stream."""

    def __init__(self, d: int, heads: int, m: int):
        super().__init__()
        self.attn = nn.ModuleDict({n: MHA(d, heads) for n in ("t_self", "i_self", "t2i", "i2t")})
        names = ("t_self", "i_self", "t_cross", "i_cross", "t_mlp", "i_mlp")
        self.ln = nn.ModuleDict({n: nn.LayerNorm(d, eps=1e-6) for n in names})
        self.t_mlp, self.i_mlp = MLP(d, m), MLP(d, m)

    def forward(self, t, i, t_mask):
        t = t + self.attn["t_self"](self.ln["t_self"](t), key_mask=t_mask)
        i = i + self.attn["i_self"](self.ln["i_self"](i))
        tq, iq = self.ln["t_cross"](t), self.ln["i_cross"](i)
        t = t + self.attn["t2i"](tq, iq)
        i = i + self.attn["i2t"](iq, tq, key_mask=t_mask)
        return t + self.t_mlp(self.ln["t_mlp"](t)), i + self.i_mlp(self.ln["i_mlp"](i))


class TorchModel(nn.Module):
    """ViT + BERT + co-attention fusion + classification head, as configs/perf.py describes them."""

    def __init__(self, cfg: dict):
        super().__init__()
        m, b = cfg["model"], cfg["bench"]
        for tower, want in (("image_encoder", "vit"), ("text_encoder", "bert"), ("fusion", "co_attention")):
            if m[tower]["name"] != want:
                raise ValueError(f"torch peer implements {tower}={want!r} only, got {m[tower]['name']!r}")
        d, f = m["width"], m["fusion"]
        self.vit = ViT(d, m["image_encoder"], b["image_size"])
        self.bert = Bert(d, m["text_encoder"])
        self.fusion = nn.ModuleList(CoAttentionLayer(d, f["num_heads"], f["mlp_dim"]) for _ in range(f["num_layers"]))
        self.t_final, self.i_final = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        hidden = m["head"]["hidden_dim"]
        self.head = nn.Sequential(
            nn.LayerNorm(2 * d, eps=1e-6), nn.Linear(2 * d, hidden), nn.GELU(), nn.Linear(hidden, b["num_classes"])
        )

    def forward(self, image, ids, mask):
        i = self.vit(image)
        t = self.bert(ids, mask)
        for layer in self.fusion:
            t, i = layer(t, i, mask)
        t, i = self.t_final(t), self.i_final(i)
        w = mask[..., None].float()
        pooled_t = (t * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(torch.cat([pooled_t, i.mean(1)], -1))


class TorchTrainer:
    """AdamW (decay on matrices only) + global-norm clipping + cross-entropy, like optim.make_optimizer."""

    def __init__(self, model: nn.Module, cfg: dict, batch: dict, compile_backend: str | None):
        o = cfg["optim"]
        self.model = model
        self.fwd = torch.compile(model, backend=compile_backend) if compile_backend else model
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
        try:
            self.opt, self.opt_kind = torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (RuntimeError, TypeError):
            self.opt, self.opt_kind = torch.optim.AdamW(groups, foreach=True, **kw), "foreach"
        self.clip = float(o["grad_clip_norm"])
        self.batch = {
            "image": torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous(),
            "ids": torch.from_numpy(batch["text_ids"]).long(),
            "mask": torch.from_numpy(batch["text_mask"]),
            "label": torch.from_numpy(batch["label"]).long(),
        }
        self.last_loss = float("nan")

    def forward_backward(self):
        b = self.batch
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.fwd(b["image"], b["ids"], b["mask"]), b["label"])
        loss.backward()
        return loss

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.forward_backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.opt.step()
        self.last_loss = float(loss.item())
        return time.perf_counter() - t0


def torch_matmul_peak(n: int, reps: int = 5, inner: int = 8) -> float:
    """Best FLOP/s of ``inner`` chained [n, n] float32 matmuls in torch: measured as vtfusion_jax.speed.matmul_peak
    measures jax's (same n, chain length and best of ``reps``), so that both peaks mean the same thing."""
    a, b = torch.randn(n, n), torch.randn(n, n) / n**0.5

    def chain():
        y = a
        for _ in range(inner):
            y = torch.mm(y, b)
        return y

    chain()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        chain()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 * inner / min(times)


def torch_flops(trainer: TorchTrainer) -> int:
    """FLOPs of one forward + backward by torch's FLOP counter (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.forward_backward()
    return int(counter.get_total_flops())


def run(cfg: dict, compile_backend: str, pause_s: float, command: str = "", bench=None) -> dict:
    """Times ours, torch eager and torch.compile alternately (see the module docstring); ``bench`` reuses a built
    benchmarks/train_step.py Bench. Returns the JSON-able result."""
    b = cfg["bench"]
    if cfg["model"]["dtype"] != "float32":
        raise ValueError(f"the torch peer compares float32 steps; got model.dtype={cfg['model']['dtype']!r}")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(int(cfg["seed"]))
    load_start = speed.loadavg()
    batch = jax_bench.synthetic_batch(cfg, int(cfg["seed"]))

    ours = bench or jax_bench.Bench(cfg)
    compile_info = ours.compile()
    eager_model = TorchModel(cfg)
    trainers = {"torch_eager": TorchTrainer(eager_model, cfg, batch, None)}
    compile_s = None
    if compile_backend != "none":
        trainers["torch_compile"] = TorchTrainer(copy.deepcopy(eager_model), cfg, batch, compile_backend)
        compile_s = trainers["torch_compile"].step()  # the first call compiles (dynamo + inductor)
    runners = {"jax": ours.step, **{n: t.step for n, t in trainers.items()}}
    fl = jax_bench.analytic_flops(cfg)
    fb_flops = torch_flops(trainers["torch_eager"])
    times = jax_bench.alternate(runners, int(b["steps"]), pause_s, warmup=int(b["warmup"]))
    import jax.numpy as jnp

    jax_peak = speed.matmul_peak(jnp.float32, int(b["matmul_size"]))["flops_per_s"]
    t_peak = torch_matmul_peak(int(b["matmul_size"]))
    step_flops = fl["train"] * int(b["batch_size"])
    med = {n: float(np.median(t)) for n, t in times.items()}
    result = {
        **jax_bench.record("torch_peer", command, cfg, load_start),
        "torch": torch.__version__,
        "threads": {"torch": torch.get_num_threads(), "xla_cpu_count": os.cpu_count()},
        "num_params": {"jax": ours.num_params, "torch": sum(p.numel() for p in eager_model.parameters())},
        "flops_per_step_train": step_flops,
        "torch_flop_counter_per_step": fb_flops,
        "jax_compile_s": compile_info["total_s"],
        "torch_compile_first_step_s": compile_s,
        "torch_optimizer": trainers["torch_eager"].opt_kind,
        "pause_between_steps_s": pause_s,
        "step_s_median": med,
        "step_s_min": {n: float(np.min(t)) for n, t in times.items()},
        "step_s_all": times,
        "peak_flops_per_s": {"jax": jax_peak, "torch": t_peak},
        "mfu_measured_peak": {n: step_flops / med[n] / (jax_peak if n == "jax" else t_peak) for n in runners},
        "speedup_vs": {n: med[n] / med["jax"] for n in runners if n != "jax"},
        "final_loss": {"jax": ours.loss(), **{n: trainers[n].last_loss for n in trainers}},
    }
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = jax_bench.parser(__doc__)
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend, or 'none' to skip it")
    p.add_argument("--pause", type=float, default=0.05, help="seconds of idle between timed steps")
    args, overrides = jax_bench.parse(p, argv)
    cfg = jax_bench.load_config(args.config, overrides)
    env = jax_bench.prepare(args)  # host-memory reuse is process-wide: torch runs under it too
    result = run(cfg, args.compile_backend, args.pause, "python benchmarks/torch_peer.py " + " ".join(argv))
    return speed.emit_result({**result, **env}, args.out)


if __name__ == "__main__":
    main()
